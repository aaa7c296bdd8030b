import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import trunc_normal_

from . import native
from .precision import in_full_precision

#: Window attention forward and backward in C (CPU), one window (and head) per task, read
#: and written where the Linear layers around it keep their tokens: qkv (B, H, W, 3, heads,
#: d), out (B, H, W, heads, d). Padding and the shift are index arithmetic: a key at a padded
#: position is the projection of zeros, i.e. the qkv bias; queries at padded positions are
#: never computed (they are cropped). table: (heads, (2w-1)^2); lse: (B, heads, H, W).
_C_KERNELS = r"""
/* The window (wy, wx) of the rolled, padded map: each of its w*w slots' position in the
   input (-1: padding) and shift-region label; returns whether labels differ (a mask). */
static int NAME(window)(int wy, int wx, int H, int W, int Hp, int Wp, int w, int s, int64_t *at, int *label) {
    int masked = 0;
    for (int a = 0; a < w; a++) {
        int ry = wy * w + a, y = (ry + s) % Hp;
        int ly = s == 0 ? 0 : (ry < Hp - w ? 0 : (ry < Hp - s ? 1 : 2));
        for (int c = 0; c < w; c++) {
            int rx = wx * w + c, x = (rx + s) % Wp;
            int lx = s == 0 ? 0 : (rx < Wp - w ? 0 : (rx < Wp - s ? 1 : 2));
            at[a * w + c] = (y < H && x < W) ? (int64_t)y * W + x : -1;
            label[a * w + c] = 3 * ly + lx;
            masked |= label[a * w + c] != label[0];
        }
    }
    return masked;
}

/* The table entry (of one head's S x S) of the displacement between window slots i and j */
static inline int NAME(rel_index)(int i, int j, int w) {
    return (i / w - j / w + w - 1) * (2 * w - 1) + (i % w - j % w + w - 1);
}

/* The bias of every (query, key) slot pair of a window, per head: (heads, N, N). */
static scalar_t *NAME(bias_matrices)(const scalar_t *table, int heads, int w) {
    int N = w * w, S = 2 * w - 1;
    scalar_t *bm = (scalar_t *)malloc(sizeof(scalar_t) * (size_t)heads * N * N);
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < N; i++)
            for (int j = 0; j < N; j++)
                bm[((int64_t)h * N + i) * N + j] = table[(int64_t)h * S * S + NAME(rel_index)(i, j, w)];
    return bm;
}

/* Gathers the window's rows: Q (N x d, scaled; zero at padded queries), K and V (N x d), Kt
   and Vt (d x N); padded keys are the bias. Then Sm = Q K^T + bias (+ the shift mask). */
static void NAME(window_logits)(const scalar_t *base, const scalar_t *bias, const scalar_t *bm, const int64_t *at,
                                const int *label, int masked, scalar_t *Q, scalar_t *K, scalar_t *Kt, scalar_t *V,
                                scalar_t *Vt, scalar_t *Sm, scalar_t scale, int ts, int C, int h, int N, int d) {
    for (int j = 0; j < N; j++) {
        const scalar_t *src = at[j] >= 0 ? base + at[j] * ts : bias + h * d;
        for (int c = 0; c < d; c++) {
            Q[j * d + c] = at[j] >= 0 ? src[c] * scale : (scalar_t)0;
            K[j * d + c] = Kt[c * N + j] = src[C + c];
            V[j * d + c] = src[2 * C + c];
            if (Vt) Vt[c * N + j] = src[2 * C + c];
        }
    }
    memcpy(Sm, bm, sizeof(scalar_t) * (size_t)N * N);
    if (masked)
        for (int i = 0; i < N; i++)
            for (int j = 0; j < N; j++) Sm[i * N + j] -= label[i] != label[j] ? (scalar_t)100 : (scalar_t)0;
    NAME(gemm)(N, N, d, Q, d, 1, Kt, N, Sm, N, 1);
}

#define WINDOW_BUFFERS \
    int64_t *at = (int64_t *)malloc(sizeof(int64_t) * N); \
    int *label = (int *)malloc(sizeof(int) * N); \
    scalar_t *buf = (scalar_t *)malloc(sizeof(scalar_t) * ((size_t)9 * N * d + (size_t)2 * N * N + N)); \
    scalar_t *Q = buf, *K = Q + N * d, *Kt = K + N * d, *V = Kt + N * d, *Vt = V + N * d, *dO = Vt + N * d; \
    scalar_t *dQ = dO + N * d, *dK = dQ + N * d, *dV = dK + N * d, *Sm = dV + N * d, *dP = Sm + N * N; \
    scalar_t *rowsum = dP + N * N;

void NAME(wa_forward)(const scalar_t *qkv, const scalar_t *bias, const scalar_t *table, scalar_t *out, scalar_t *lse,
                      scalar_t *scale_, int B, int heads, int H, int W, int d, int w, int s, int nthreads) {
    int C = heads * d, ts = 3 * C, N = w * w;
    int nwy = (H + w - 1) / w, nwx = (W + w - 1) / w, Hp = nwy * w, Wp = nwx * w;
    scalar_t scale = *scale_;
    scalar_t *bm = NAME(bias_matrices)(table, heads, w);
#pragma omp parallel num_threads(nthreads)
    {
        WINDOW_BUFFERS
#pragma omp for schedule(static)
        for (int64_t item = 0; item < (int64_t)B * nwy * nwx; item++) {
            int win = (int)(item % (nwy * nwx)), b = (int)(item / (nwy * nwx));
            int masked = NAME(window)(win / nwx, win % nwx, H, W, Hp, Wp, w, s, at, label);
            for (int h = 0; h < heads; h++) {
                NAME(window_logits)(qkv + (int64_t)b * H * W * ts + h * d, bias, bm + (int64_t)h * N * N, at, label,
                                    masked, Q, K, Kt, V, NULL, Sm, scale, ts, C, h, N, d);
                for (int i = 0; i < N; i++) {
                    scalar_t *row = Sm + i * N, mx = -INFINITY, sum = 0;
                    if (at[i] < 0) {  /* a padded query: its row must only stay finite */
                        memset(row, 0, sizeof(scalar_t) * (size_t)N);
                        continue;
                    }
#pragma omp simd reduction(max:mx)
                    for (int j = 0; j < N; j++) mx = row[j] > mx ? row[j] : mx;
#pragma omp simd reduction(+:sum)
                    for (int j = 0; j < N; j++) {
                        row[j] = EXP(row[j] - mx);
                        sum += row[j];
                    }
                    rowsum[i] = 1 / sum;
                    lse[((int64_t)b * heads + h) * H * W + at[i]] = mx + LOG(sum);
                }
                NAME(gemm)(N, d, N, Sm, N, 1, V, d, dO, d, 0);  /* unnormalised P V */
                for (int i = 0; i < N; i++) {
                    if (at[i] < 0) continue;
                    scalar_t *o = out + ((int64_t)b * H * W + at[i]) * C + h * d;
                    for (int c = 0; c < d; c++) o[c] = dO[i * d + c] * rowsum[i];
                }
            }
        }
        free(at); free(label); free(buf);
    }
    free(bm);
}

/* dqkv: written where queries are (each position's q, k, v slots, once: a window owns its
   positions); dbias (nthreads, 3C) and dtable (nthreads, heads, (2w-1)^2): zeros, one
   accumulator per thread. */
void NAME(wa_backward)(const scalar_t *qkv, const scalar_t *bias, const scalar_t *table, const scalar_t *out,
                       const scalar_t *lse, const scalar_t *dout, scalar_t *dqkv, scalar_t *dbias, scalar_t *dtable,
                       scalar_t *scale_, int B, int heads, int H, int W, int d, int w, int s, int nthreads) {
    int C = heads * d, ts = 3 * C, N = w * w, S = 2 * w - 1;
    int nwy = (H + w - 1) / w, nwx = (W + w - 1) / w, Hp = nwy * w, Wp = nwx * w;
    scalar_t scale = *scale_;
    scalar_t *bm = NAME(bias_matrices)(table, heads, w);
#pragma omp parallel num_threads(nthreads)
    {
        WINDOW_BUFFERS
        int tid = omp_get_thread_num();
        scalar_t *db = dbias + (int64_t)tid * ts, *dt = dtable + (int64_t)tid * heads * S * S;
        /* the bias gradient per (query, key) slot pair and head, folded into the table at the end */
        scalar_t *dbm = (scalar_t *)calloc((size_t)heads * N * N, sizeof(scalar_t));
#pragma omp for schedule(static)
        for (int64_t item = 0; item < (int64_t)B * nwy * nwx; item++) {
            int win = (int)(item % (nwy * nwx)), b = (int)(item / (nwy * nwx));
            int masked = NAME(window)(win / nwx, win % nwx, H, W, Hp, Wp, w, s, at, label);
            for (int h = 0; h < heads; h++) {
                int64_t boff = (int64_t)b * H * W * ts + h * d;
                NAME(window_logits)(qkv + boff, bias, bm + (int64_t)h * N * N, at, label, masked, Q, K, Kt, V, Vt, Sm,
                                    scale, ts, C, h, N, d);
                for (int i = 0; i < N; i++) {  /* dO rows; rowsum holds D = rowsum(dO * O) */
                    scalar_t D = 0;
                    if (at[i] >= 0) {
                        int64_t o = ((int64_t)b * H * W + at[i]) * C + h * d;
                        for (int c = 0; c < d; c++) {
                            dO[i * d + c] = dout[o + c];
                            D += dout[o + c] * out[o + c];
                        }
                    } else {
                        memset(dO + i * d, 0, sizeof(scalar_t) * (size_t)d);
                    }
                    rowsum[i] = D;
                }
                NAME(gemm)(N, N, d, dO, d, 1, Vt, N, dP, N, 0);  /* dP = dO V^T */
                scalar_t *dbh = dbm + (int64_t)h * N * N;
                for (int i = 0; i < N; i++) {
                    scalar_t *row = Sm + i * N, *g = dP + i * N, *dbr = dbh + i * N;
                    if (at[i] < 0) {  /* no gradient reaches padded queries */
                        memset(row, 0, sizeof(scalar_t) * (size_t)N);
                        memset(g, 0, sizeof(scalar_t) * (size_t)N);
                        continue;
                    }
                    scalar_t l = lse[((int64_t)b * heads + h) * H * W + at[i]], D = rowsum[i];
#pragma omp simd
                    for (int j = 0; j < N; j++) {
                        row[j] = EXP(row[j] - l);  /* P */
                        g[j] = row[j] * (g[j] - D);  /* dS, w.r.t. the scaled logits */
                        dbr[j] += g[j];
                    }
                }
                NAME(gemm)(N, d, N, dP, N, 1, K, d, dQ, d, 0);  /* dQ = dS K */
                NAME(gemm)(N, d, N, dP, 1, N, Q, d, dK, d, 0);  /* dK = dS^T Q */
                NAME(gemm)(N, d, N, Sm, 1, N, dO, d, dV, d, 0);  /* dV = P^T dO */
                for (int j = 0; j < N; j++) {
                    if (at[j] >= 0) {
                        scalar_t *dst = dqkv + boff + at[j] * ts;
                        for (int c = 0; c < d; c++) {
                            dst[c] = dQ[j * d + c] * scale;
                            dst[C + c] = dK[j * d + c];
                            dst[2 * C + c] = dV[j * d + c];
                        }
                    } else {
                        for (int c = 0; c < d; c++) {
                            db[C + h * d + c] += dK[j * d + c];
                            db[2 * C + h * d + c] += dV[j * d + c];
                        }
                    }
                }
            }
        }
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < N; i++)
                for (int j = 0; j < N; j++)
                    dt[(int64_t)h * S * S + NAME(rel_index)(i, j, w)] += dbm[((int64_t)h * N + i) * N + j];
        free(dbm);
        free(at); free(label); free(buf);
    }
    free(bm);
}
"""


@functools.lru_cache(maxsize=1)
def native_library():
    """The compiled window-attention kernels, or ``None`` (see :mod:`.native`)."""
    return native.load('window_attention', _C_KERNELS, {'wa_forward': (6, 8), 'wa_backward': (10, 8)})


class _NativeWindowAttentionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, qkv, bias, table, num_heads, window_size, shift_size, scale):
        B, H, W, C3 = qkv.shape
        out, lse = qkv.new_empty(B, H, W, C3 // 3), qkv.new_empty(B, num_heads, H, W)
        scale_ = qkv.new_tensor([scale])
        args = (B, num_heads, H, W, C3 // (3 * num_heads), window_size, shift_size)
        native.function(native_library(), 'wa_forward', qkv.dtype)(
            *native.pointers(qkv, bias, table, out, lse, scale_), *args, torch.get_num_threads())
        ctx.save_for_backward(qkv, bias, table, out, lse, scale_)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, bias, table, out, lse, scale_ = ctx.saved_tensors
        threads = torch.get_num_threads()
        dqkv, dbias, dtable = (torch.empty_like(qkv), bias.new_zeros(threads, *bias.shape),
                               table.new_zeros(threads, *table.shape))
        dout = grad_out.to(qkv.dtype).contiguous()
        native.function(native_library(), 'wa_backward', qkv.dtype)(
            *native.pointers(qkv, bias, table, out, lse, dout, dqkv, dbias, dtable, scale_),
            *ctx.args, threads)
        return dqkv, dbias.sum(0), dtable.sum(0), None, None, None, None


def window_attention_native(qkv: torch.Tensor, qkv_bias: torch.Tensor, table: torch.Tensor, num_heads: int,
                            window_size: int, shift_size: int, scale: float) -> torch.Tensor:
    """(Shifted-)window attention by the C kernels (CPU), same function as ``WindowAttention``'s
    reference path between its two Linear layers.

    Args:
        qkv: ``B x H x W x (3 * heads * d)``: the qkv projection of the unpadded map.
        qkv_bias: ``3 * heads * d``: the projection's bias, i.e. q, k, v at padded positions.
        table: ``heads x (2w-1)^2`` relative position bias.
        num_heads, window_size, shift_size, scale: As the module's.
    Returns:
        ``B x H x W x (heads * d)``. Runs in float32 under autocast.
    """
    return in_full_precision(
        lambda qkv, bias, table: _NativeWindowAttentionFunction.apply(
            qkv.contiguous(), bias.contiguous(), table.contiguous(), num_heads, window_size, shift_size, scale),
        (qkv, qkv_bias, table))


class WindowAttention(nn.Module):
    """Window attention (spec letter ``L``) and its shifted variant (``S``).

    Maps are padded at the bottom and right with zeros to a multiple of the window, and
    cropped after; the padded positions take part as keys, as in the official
    dense-prediction code. The shifted variant rolls by ``ceil(window_size / 2)`` (DAT's
    choice, 4 for a window of 7) and masks pairs of positions that the roll brought
    together from different regions of the padded map.

    Args:
        embed_dims: Channels of the input and output.
        num_heads: Attention heads.
        window_size: Side of the square window.
        shifted: Whether this is the shifted-window variant.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        attn_impl: ``'fast'`` (default): on CPU, ``window_attention_native`` (C kernels, no
            padded, rolled or partitioned copies of the map), elsewhere as ``'reference'``:
            the official formulation in PyTorch ops, which also runs while jit-tracing (FLOP
            counters), when attention dropout is active and without a C compiler. Also an
            attribute.
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size: int = 7, shifted: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0., attn_impl: str = 'fast'):
        super().__init__()
        if attn_impl not in ('fast', 'reference'):
            raise ValueError(f"attn_impl must be 'fast' or 'reference', got {attn_impl!r}")
        self.attn_impl = attn_impl
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = math.ceil(window_size / 2) if shifted else 0
        self.scale = (embed_dims // num_heads) ** -0.5
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.01)

        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                            indexing='ij')).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)
        index = rel[0] * (2 * window_size - 1) + rel[1]
        self.register_buffer('relative_position_index', index, persistent=False)

    def _shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        w, s = self.window_size, self.shift_size
        labels = torch.zeros(height, width, device=device)
        slices = (slice(0, -w), slice(-w, -s), slice(-s, None))
        for i, hs in enumerate(slices):
            for j, ws in enumerate(slices):
                labels[hs, ws] = 3 * i + j
        labels = labels.view(height // w, w, width // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        differs = labels[:, None, :] != labels[:, :, None]
        return differs.float() * -100.0  # nW x N x N

    def _use_native(self, x: torch.Tensor) -> bool:
        return (self.attn_impl == 'fast' and not (self.training and self.attn_drop.p > 0)
                and native.usable(x, native_library))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        w, s = self.window_size, self.shift_size
        if self._use_native(x):
            qkv = self.qkv(x.permute(0, 2, 3, 1))
            out = window_attention_native(qkv, self.qkv.bias, self.relative_position_bias_table.t(), self.num_heads,
                                          w, s, self.scale)
            return self.proj_drop(self.proj(out)).permute(0, 3, 1, 2)
        x = F.pad(x, (0, (-W) % w, 0, (-H) % w))
        Hp, Wp = x.shape[-2:]
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(2, 3))

        nh, nw, N = Hp // w, Wp // w, w * w
        windows = x.view(B, C, nh, w, nw, w).permute(0, 2, 4, 3, 5, 1).reshape(B * nh * nw, N, C)
        qkv = self.qkv(windows).reshape(-1, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # one backward node; three selects would each zero-fill all of qkv
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1)
        if s:
            mask = self._shift_mask(Hp, Wp, x.device).to(attn.dtype)
            attn = (attn.view(B, nh * nw, self.num_heads, N, N) + mask[None, :, None]).view(-1, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(-1, N, C)
        out = self.proj_drop(self.proj(out))
        out = out.view(B, nh, nw, w, w, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, Hp, Wp)

        if s:
            out = torch.roll(out, shifts=(s, s), dims=(2, 3))
        return out[:, :, :H, :W]

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, window_size={self.window_size}, shift_size={self.shift_size}, '
                f'attn_impl={self.attn_impl!r}')
