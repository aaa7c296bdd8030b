import functools
import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import trunc_normal_

from . import native
from .precision import in_full_precision


@functools.lru_cache(maxsize=64)
def _neighborhood(height: int, width: int, kernel_size: int, device: torch.device):
    """Flat key indices (HW x k*k) of each query's neighborhood and their bias indices.

    The window of query ``i`` along an axis of length ``n`` starts at
    ``clamp(i - k // 2, 0, n - k)`` (NATTEN's NA2D with dilation 1); the bias of key ``j`` is
    indexed by ``j - i + k - 1`` along each axis.
    """
    def axis(n):
        q = torch.arange(n, device=device)
        keys = (q - kernel_size // 2).clamp(0, n - kernel_size)[:, None] + torch.arange(kernel_size, device=device)
        return keys, keys - q[:, None] + kernel_size - 1

    rows, rel_rows = axis(height)
    cols, rel_cols = axis(width)
    keys = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(height * width, -1)
    span = 2 * kernel_size - 1
    bias = (rel_rows[:, None, :, None] * span + rel_cols[None, :, None, :]).reshape(height * width, -1)
    return keys, bias


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                           kernel_size: int, attn_drop: Optional[nn.Module] = None) -> torch.Tensor:
    """Pure-PyTorch 2D neighborhood attention.

    Args:
        q, k, v: ``B x heads x H x W x d``; ``q`` already scaled.
        bias_table: ``heads x (2k-1) x (2k-1)`` relative position bias.
        kernel_size: Side ``k`` of the neighborhood; ``H, W >= k``.
    Returns:
        ``B x heads x H x W x d``.
    """
    B, nh, H, W, d = q.shape
    keys, bias_index = _neighborhood(H, W, kernel_size, q.device)
    k_nb = k.reshape(B, nh, H * W, d)[:, :, keys]  # B h HW kk d
    v_nb = v.reshape(B, nh, H * W, d)[:, :, keys]
    attn = torch.einsum('bhnd,bhnkd->bhnk', q.reshape(B, nh, H * W, d), k_nb)
    attn = attn + bias_table.flatten(1)[:, bias_index]
    attn = attn.softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    return torch.einsum('bhnk,bhnkd->bhnd', attn, v_nb).reshape(B, nh, H, W, d)


class _Axis:
    """Halo tiling of one axis: query tiles of ``t`` positions, each with the region of ``r``
    consecutive key positions that holds the windows of all its queries."""

    def __init__(self, n: int, kernel_size: int, tile: int, device):
        self.t = t = min(tile, n)
        self.r = r = min(t + kernel_size - 1, n)
        self.tiles = -(-n // t)
        self.padded = self.tiles * t
        first = torch.arange(self.tiles, device=device) * t
        # window starts are non-decreasing with slope <= 1: a tile's windows lie in
        # [start of its first query, start of its first query + t - 1 + k)
        start = (first - kernel_size // 2).clamp(0, n - kernel_size)
        self.region = start.clamp(max=n - r)  # (tiles,) first key of each region
        keys = self.region[:, None, None] + torch.arange(r, device=device)  # (tiles, 1, r)
        queries = first[:, None] + torch.arange(t, device=device)  # (tiles, t), may run past n
        q_start = (queries - kernel_size // 2).clamp(0, n - kernel_size)[..., None]
        valid = (keys >= q_start) & (keys < q_start + kernel_size)  # (tiles, t, r)
        rel = (keys - queries[..., None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
        # bias-table coordinate of every (tile, query, region key), -1: outside the window
        self.rel = torch.where(valid, rel, -1)


class _Tiling:
    """Halo tiles of an ``H x W`` map for NA2D with kernel ``k``, processed in steps of
    ``nt`` consecutive rows of tiles, and the index tensors that move a step's query tiles
    and key regions in and out of ``(BH, rows * W, c)`` views with one op each."""

    def __init__(self, H: int, W: int, kernel_size: int, tile: int, device, heads: int = 1):
        self.H, self.W, self.k = H, W, kernel_size
        self.rows = rows = _Axis(H, kernel_size, tile, device)
        self.cols = cols = _Axis(W, kernel_size, tile, device)
        th, tw, rh, rw, tc = rows.t, cols.t, rows.r, cols.r, cols.tiles
        # rows of tiles per step: about STEPS_PER_CALL steps of STEP_LOGITS logits or more
        per_row = heads * tc * th * tw * rh * rw
        self.nt = nt = max(1, min(rows.tiles, max(-(-rows.tiles // STEPS_PER_CALL), STEP_LOGITS[0] // per_row),
                                  STEP_LOGITS[1] // per_row))
        self.steps = [range(t, min(t + nt, rows.tiles)) for t in range(0, rows.tiles, nt)]
        ar = functools.partial(torch.arange, device=device)
        # queries of nt rows of tiles (nt*th x padded W) -> (nt, tc, th*tw)
        self.query_index = ((ar(nt)[:, None, None, None] * th + ar(th)[None, None, :, None]) * cols.padded
                            + ar(tc)[None, :, None, None] * tw + ar(tw)[None, None, None, :]).reshape(-1)
        # key columns of the regions (tc, rw); the rows depend on the step
        self.region_cols = cols.region[:, None] + ar(rw)
        # tile rows with the same row pattern (all interior ones) share their bias
        patterns = {}
        self.pattern = [patterns.setdefault(tuple(rows.rel[t].flatten().tolist()), len(patterns))
                        for t in range(rows.tiles)]
        self.pattern_rows = [self.pattern.index(p) for p in range(len(patterns))]

    def key_rows(self, step: range) -> Tuple[int, int, torch.Tensor]:
        """First and end row of the keys a step needs, and the index of its regions
        ``(nt, tc, rh*rw)`` into those rows viewed as ``(rows * W)``."""
        region = self.rows.region[step.start:step.stop]
        first, last = int(region[0]), int(region[-1]) + self.rows.r
        rr = (region - first)[:, None] + torch.arange(self.rows.r, device=region.device)  # (nt, rh)
        index = rr[:, None, :, None] * self.W + self.region_cols[None, :, None, :]  # (nt, tc, rh, rw)
        return first, last, index.reshape(-1)

    def bias_index(self, t: int) -> torch.Tensor:
        """Flat indices ``(tc*th*tw*rh*rw,)`` into the extended table for tile row ``t``."""
        span = 2 * self.k - 1
        ri, ci = self.rows.rel[t], self.cols.rel
        index = ri[None, :, None, :, None] * span + ci[:, None, :, None, :]  # (tc, th, tw, rh, rw)
        invalid = (ri < 0)[None, :, None, :, None] | (ci < 0)[:, None, :, None, :]
        return index.masked_fill_(invalid, span * span).view(-1)


#: Logits per step of rows of tiles: at least about the first and at most the second (when
#: one row of tiles allows), in about STEPS_PER_CALL steps: fewer, larger parallel ops stand
#: up better to a busy CPU, while the bound keeps the buffers small.
STEP_LOGITS, STEPS_PER_CALL = (1 << 19, 1 << 21), 8


#: Logits are floored at max - 80 before exp, which keeps exp off its very slow path for
#: -inf and underflowing inputs (a weight below exp(-80) ~ 2e-35 of the largest is far below
#: float32 / float64 rounding of the sums); keys outside a query's window are then zeroed
#: by a 0 / 1 mask (exact zeros also keep the backward's products out of denormals).
_EXP_FLOOR = -80.


def _extended_table(table: torch.Tensor) -> torch.Tensor:
    """``heads x ((2k-1)^2 + 1)``: the flat bias table and a trailing ``-inf`` entry."""
    return torch.cat([table.flatten(1), table.new_full((table.shape[0], 1), float('-inf'))], 1)


class _NeighborhoodAttentionFunction(torch.autograd.Function):
    """NA2D (with relative position bias) computed over halo tiles, one row of tiles at a time.

    Each ``t x t`` query tile attends, by a dense matmul, to the ``(t+k-1)^2`` keys of the
    region holding all its queries' windows; keys outside a query's window get ``-inf`` and
    weight zero (see ``_EXP_FLOOR``): the NA2D softmax. Only ``q, k, v``, the output and the
    log-sum-exp are kept for the backward pass, which recomputes each row of tiles' logits.
    Buffers are allocated once per call and reused by every row of tiles.
    """

    @staticmethod
    def forward(ctx, q, k, v, table, kernel_size, tile):
        B, nh, H, W, d = q.shape
        BH = B * nh
        tl = _Tiling(H, W, kernel_size, tile, q.device, BH)
        rows, cols = tl.rows, tl.cols
        biases, masks = _pattern_biases(table, tl)
        qp = _padded(q.reshape(BH, H, W, d), rows, cols)
        out = q.new_empty(BH, rows.padded, cols.padded, d)
        lse = q.new_empty(BH, rows.padded, cols.padded, 1)
        buffers = _step_buffers(q, BH, tl, d)
        for step in tl.steps:
            qt, kr, vr, o, S = _gather_step(qp, k, v, step, tl, buffers)
            torch.bmm(qt, kr.transpose(1, 2), out=S)
            _per_pattern(S, step, tl, B, nh, biases, torch.Tensor.add_)
            m = S.amax(-1, keepdim=True)
            S.sub_(m).clamp_min_(_EXP_FLOOR).exp_()
            _per_pattern(S, step, tl, B, nh, masks, torch.Tensor.mul_)
            l = S.sum(-1, keepdim=True)
            torch.bmm(S, vr, out=o)
            _scatter_step(o.div_(l), out, step, tl)
            _scatter_step(m.add_(l.log_()), lse, step, tl)
        ctx.save_for_backward(q, k, v, table, out, lse)
        ctx.args = (kernel_size, tile)
        return out[:, :H, :W].reshape(B, nh, H, W, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, table, out, lse = ctx.saved_tensors
        kernel_size, tile = ctx.args
        B, nh, H, W, d = q.shape
        BH = B * nh
        tl = _Tiling(H, W, kernel_size, tile, q.device, BH)
        rows, cols = tl.rows, tl.cols
        biases, masks = _pattern_biases(table, tl)
        dbiases = [torch.zeros_like(b) for b in biases]
        qp = _padded(q.reshape(BH, H, W, d), rows, cols)
        dout = _padded(grad_out.reshape(BH, H, W, d), rows, cols)
        Dsum = (dout * out).sum(-1, keepdim=True)
        dq = torch.empty_like(qp)
        dk, dv = q.new_zeros(BH, H * W, d), q.new_zeros(BH, H * W, d)
        buffers = _step_buffers(q, BH, tl, d)
        dot, dS, dkr = torch.empty_like(buffers[0]), torch.empty_like(buffers[4]), torch.empty_like(buffers[1])
        lt, Dt = q.new_empty(buffers[0].shape[:-1] + (1,)), q.new_empty(buffers[0].shape[:-1] + (1,))
        for step in tl.steps:
            qt, kr, vr, o, S = _gather_step(qp, k, v, step, tl, buffers)
            n = qt.shape[0]
            dot_, dS_, dkr_, lt_, Dt_ = dot[:n], dS[:n], dkr[:n], lt[:n], Dt[:n]
            for src, dst in ((dout, dot_), (lse, lt_), (Dsum, Dt_)):
                _scatter_step(dst, src, step, tl, gather=True)
            torch.bmm(qt, kr.transpose(1, 2), out=S)
            _per_pattern(S, step, tl, B, nh, biases, torch.Tensor.add_)
            S.sub_(lt_).clamp_min_(_EXP_FLOOR).exp_()
            _per_pattern(S, step, tl, B, nh, masks, torch.Tensor.mul_)  # P
            torch.bmm(dot_, vr.transpose(1, 2), out=dS_)
            dS_.sub_(Dt_).mul_(S)
            _per_pattern(dS_, step, tl, B, nh, dbiases, _accumulate)
            first, last, index = tl.key_rows(step)
            keys = slice(first * W, last * W)
            dv[:, keys].index_add_(1, index, torch.bmm(S.transpose(1, 2), dot_, out=dkr_).view(BH, -1, d))
            dk[:, keys].index_add_(1, index, torch.bmm(dS_.transpose(1, 2), qt, out=dkr_).view(BH, -1, d))
            _scatter_step(torch.bmm(dS_, kr, out=o), dq, step, tl)
        dext = torch.zeros_like(_extended_table(table))
        for t, db in zip(tl.pattern_rows, dbiases):
            index = tl.bias_index(t)
            dext.scatter_add_(1, index.view(1, -1).expand(nh, -1), db.view(nh, -1))
        dtable = dext[:, :-1].view_as(table)
        return dq[:, :H, :W].reshape(q.shape), dk.view(k.shape), dv.view(v.shape), dtable, None, None


def _accumulate(logits: torch.Tensor, into: torch.Tensor):
    """``into (heads, L) += logits (B, heads, L)`` summed over the batch."""
    into += logits.sum(0)


def _per_pattern(S: torch.Tensor, step: range, tl: _Tiling, B: int, nh: int, per_pattern, op):
    """Applies ``op(S rows, per_pattern[p])`` to the logits ``S`` of a step, row of tiles by
    row of tiles, all at once where they share their pattern."""
    logits = S.view(B, nh, len(step), -1)
    patterns = [tl.pattern[t] for t in step]
    if op is _accumulate:
        if len(set(patterns)) == 1:
            _accumulate(logits.sum(2), per_pattern[patterns[0]])
        else:
            for i, p in enumerate(patterns):
                _accumulate(logits[:, :, i], per_pattern[p])
    elif len(set(patterns)) == 1:
        op(logits, per_pattern[patterns[0]].unsqueeze(1))
    else:
        for i, p in enumerate(patterns):
            op(logits[:, :, i], per_pattern[p])


def _pattern_biases(table: torch.Tensor, tl: _Tiling):
    """Per distinct row pattern: the bias, ``-inf`` outside the windows, ``(heads, L)``, and
    the windows as 0 / 1 ``(1, L)``, ``L = tc*th*tw*rh*rw``."""
    ext = _extended_table(table)
    indices = [tl.bias_index(t) for t in tl.pattern_rows]
    inf_index = ext.shape[1] - 1
    return [ext.index_select(1, i) for i in indices], [(i != inf_index).to(table.dtype)[None] for i in indices]


def _padded(x: torch.Tensor, rows: _Axis, cols: _Axis) -> torch.Tensor:
    """``(BH, H, W, c)`` zero-padded at the bottom and right to whole tiles."""
    return F.pad(x, (0, 0, 0, cols.padded - x.shape[2], 0, rows.padded - x.shape[1]))


def _step_buffers(q: torch.Tensor, BH: int, tl: _Tiling, d: int):
    """Query tiles, key and value regions, output tiles and logits of the largest step."""
    rows, cols = tl.rows, tl.cols
    n, queries, keys = BH * tl.nt * cols.tiles, rows.t * cols.t, rows.r * cols.r
    return (q.new_empty(n, queries, d), q.new_empty(n, keys, d), q.new_empty(n, keys, d),
            q.new_empty(n, queries, d), q.new_empty(n, queries, keys))


def _gather_step(qp, k, v, step: range, tl: _Tiling, buffers):
    """A step's query tiles ``(BH*nt*tc, th*tw, d)`` from the padded queries and its key /
    value regions ``(BH*nt*tc, rh*rw, d)`` from ``k``, ``v`` (``(..., H, W, d)``)."""
    BH, d = qp.shape[0], qp.shape[-1]
    n = BH * len(step) * tl.cols.tiles
    qt, kr, vr, o, S = (b[:n] for b in buffers)
    _scatter_step(qt, qp, step, tl, gather=True)
    first, last, index = tl.key_rows(step)
    for src, dst in ((k, kr), (v, vr)):
        src = src.reshape(BH, -1, d)[:, first * tl.W:last * tl.W]
        torch.index_select(src, 1, index, out=dst.view(BH, -1, d))
    return qt, kr, vr, o, S


def _scatter_step(tiles: torch.Tensor, into: torch.Tensor, step: range, tl: _Tiling, gather: bool = False):
    """Query tiles ``(BH*nt*tc, th*tw, c)`` of a step into ``into`` (``(BH, Hp, Wp, c)``), or
    with ``gather`` the other way round."""
    BH, c = into.shape[0], into.shape[-1]
    th = tl.rows.t
    rows = into[:, step.start * th:step.stop * th].reshape(BH, -1, c)
    index = tl.query_index[:rows.shape[1]]
    if gather:
        torch.index_select(rows, 1, index, out=tiles.view(BH, -1, c))
    else:
        rows.index_copy_(1, index, tiles.view(BH, -1, c))


def neighborhood_attention_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                                 kernel_size: int, tile: int = 6) -> torch.Tensor:
    """Memory-lean 2D neighborhood attention, same function as ``neighborhood_attention``.

    Args as ``neighborhood_attention`` (no attention dropout), plus ``tile``: side of the
    query tiles. Runs in float32 under autocast.
    """
    return in_full_precision(
        lambda q, k, v, table: _NeighborhoodAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                                                    table, kernel_size, tile),
        (q, k, v, bias_table))


# ----------------------------------------------------------------------------- native (CPU)

#: NA2D forward and backward in C. Queries are processed a row at a time in blocks of one
#: 64-byte vector of consecutive columns (16 float32 lanes); q, k and v are read channel-major,
#: qkv_t (B, 3, heads, d, H, W) as a matmul writes it, so that for a window offset (a, r) the
#: keys of a block's queries are one shifted vector load of a key row: the logits, the
#: weighted sums and their gradients are vector FMAs over channels without gathers or
#: horizontal sums. Blocks whose lanes' windows are clamped at the map's sides (or that run
#: past it) read zero-padded copies of their key rows and mask the offsets outside each lane's
#: window. out (B, H, W, heads, d) is position-major for the projection after it; lse
#: (B, heads, H, W); rpb (heads, 2k-1, 2k-1). The backward recomputes the logits from lse.
_C_KERNELS = r"""
#ifndef NA_RC
#define NA_RC 8  /* offsets per register block */
#define NA_CC 8  /* channels per register block */
#endif
#undef NA_VB
#define NA_VB ((int)(64 / sizeof(scalar_t)))

/* A block of lanes x0 .. x0 + VB - 1 of a row: each lane's window starts at offset lo (key
   column - query column); returns whether the block is interior (all lanes in the map, all
   windows unclamped); sets the block's offset range [rlo, rlo + R). */
static int NAME(na_block)(int x0, int W, int K, int *lo, int *rlo, int *R) {
    int mn = 1 << 30, mx = -(1 << 30), interior = 1;
    for (int l = 0; l < NA_VB; l++) {
        int x = x0 + l;
        if (x >= W) { lo[l] = 1 << 29; interior = 0; continue; }
        lo[l] = clamp_int(x - K / 2, 0, W - K) - x;
        mn = lo[l] < mn ? lo[l] : mn;
        mx = lo[l] > mx ? lo[l] : mx;
        interior &= lo[l] == -(K / 2);
    }
    *rlo = mn;
    *R = mx + K - mn;
    return interior;
}

/* K rows x d channels of a key plane (channel stride HW, row stride W) around a block, as
   columns x0 + rlo + t, t < Lw, zero outside the map: [a][c][t]. */
static void NAME(na_window_copy)(const scalar_t *plane, int64_t HW, int W, int sy, int K, int d, int col0, int Lw,
                                 scalar_t *dst) {
    for (int a = 0; a < K; a++)
        for (int c = 0; c < d; c++) {
            const scalar_t *src = plane + c * HW + (int64_t)(sy + a) * W;
            scalar_t *o = dst + ((int64_t)a * d + c) * Lw;
            for (int t = 0; t < Lw; t++) {
                int col = col0 + t;
                o[t] = col >= 0 && col < W ? src[col] : (scalar_t)0;
            }
        }
}

/* Adds a block's window accumulator [a][c][t] back into the plane, inside the map only. */
static void NAME(na_window_add)(scalar_t *plane, int64_t HW, int W, int sy, int K, int d, int col0, int Lw,
                                const scalar_t *src) {
    for (int a = 0; a < K; a++)
        for (int c = 0; c < d; c++) {
            scalar_t *o = plane + c * HW + (int64_t)(sy + a) * W;
            const scalar_t *s = src + ((int64_t)a * d + c) * Lw;
            for (int t = 0; t < Lw; t++) {
                int col = col0 + t;
                if (col >= 0 && col < W) o[col] += s[t];
            }
        }
}

/* A block's lanes of a channel-major plane (d x VB, zero past the map) */
static void NAME(na_lanes)(const scalar_t *plane, int64_t HW, int64_t at, int n, int d, scalar_t mul, scalar_t *dst) {
    for (int c = 0; c < d; c++) {
        const scalar_t *src = plane + c * HW + at;
        if (n == NA_VB) {
            *(NAME(vec) *)(dst + c * NA_VB) = *(const NAME(uvec) *)src * mul;
        } else {
            for (int l = 0; l < NA_VB; l++) dst[c * NA_VB + l] = l < n ? src[l] * mul : (scalar_t)0;
        }
    }
}

/* s[a][r] (vectors) = init[a][r] + sum_c xb[c] * key[a][c][r + lane] for r < Rp (a multiple
   of NA_RC); key (a, c, t) at kb[a * rs + c * cs + t]. */
static void NAME(na_dots)(const scalar_t *xb, const scalar_t *kb, int64_t cs, int64_t rs, int K, int Rp, int d,
                          const scalar_t *init, scalar_t *s) {
    for (int a = 0; a < K; a++)
        for (int r0 = 0; r0 < Rp; r0 += NA_RC) {
            NAME(vec) acc[NA_RC];
            for (int i = 0; i < NA_RC; i++) acc[i] = (NAME(vec)){0} + (init ? init[a * Rp + r0 + i] : (scalar_t)0);
            const scalar_t *kr = kb + a * rs + r0;
            for (int c = 0; c < d; c++, kr += cs) {
                NAME(vec) x = *(const NAME(vec) *)(xb + c * NA_VB);
#pragma GCC unroll 8
                for (int i = 0; i < NA_RC; i++) acc[i] += x * *(const NAME(uvec) *)(kr + i);
            }
            for (int i = 0; i < NA_RC; i++) *(NAME(vec) *)(s + ((int64_t)a * Rp + r0 + i) * NA_VB) = acc[i];
        }
}

/* o[c] (vectors) = sum over a, r < R of w[a][r] * val[a][c][r + lane] */
static void NAME(na_weighted)(const scalar_t *w, const scalar_t *vb, int64_t cs, int64_t rs, int K, int R, int Rp,
                              int d, scalar_t *o) {
    int c0 = 0;
    for (; c0 + NA_CC <= d; c0 += NA_CC) {
        NAME(vec) acc[NA_CC];
        for (int i = 0; i < NA_CC; i++) acc[i] = (NAME(vec)){0};
        for (int a = 0; a < K; a++)
            for (int r = 0; r < R; r++) {
                NAME(vec) p = *(const NAME(vec) *)(w + ((int64_t)a * Rp + r) * NA_VB);
                const scalar_t *vr = vb + a * rs + c0 * cs + r;
#pragma GCC unroll 8
                for (int i = 0; i < NA_CC; i++) acc[i] += p * *(const NAME(uvec) *)(vr + i * cs);
            }
        for (int i = 0; i < NA_CC; i++) *(NAME(vec) *)(o + (c0 + i) * NA_VB) = acc[i];
    }
    for (; c0 < d; c0++) {
        NAME(vec) acc = {0};
        for (int a = 0; a < K; a++)
            for (int r = 0; r < R; r++)
                acc += *(const NAME(vec) *)(w + ((int64_t)a * Rp + r) * NA_VB)
                       * *(const NAME(uvec) *)(vb + a * rs + c0 * cs + r);
        *(NAME(vec) *)(o + c0 * NA_VB) = acc;
    }
}

/* val[a][c][r + lane] += w[a][r] * xb[c] for r < R. Offsets outermost: the unaligned
   read-modify-writes of offsets r and r + 1 overlap, and a load that overlaps a store still
   in flight cannot take its data from it; K * d other stores in between let it retire. */
static void NAME(na_scatter)(const scalar_t *w, const scalar_t *xb, scalar_t *vb, int64_t cs, int64_t rs, int K,
                             int R, int Rp, int d) {
    for (int r = 0; r < R; r++)
        for (int a = 0; a < K; a++) {
            NAME(vec) p = *(const NAME(vec) *)(w + ((int64_t)a * Rp + r) * NA_VB);
            scalar_t *vr = vb + a * rs + r;
            for (int c = 0; c < d; c++, vr += cs)
                *(NAME(uvec) *)vr = *(NAME(uvec) *)vr + p * *(const NAME(vec) *)(xb + c * NA_VB);
        }
}

/* Per block: bias init[a][r] (0 past the table), the 0/1 masks of each offset's lanes
   (mask[r], only for blocks that are not interior). */
static void NAME(na_bias)(const scalar_t *bt, int K, int sy, int y, int rlo, int Rp, scalar_t *init) {
    int S = 2 * K - 1;
    for (int a = 0; a < K; a++)
        for (int r = 0; r < Rp; r++) {
            int tx = rlo + r + K - 1;
            init[a * Rp + r] = tx >= 0 && tx < S ? bt[(sy + a - y + K - 1) * S + tx] : (scalar_t)0;
        }
}
static void NAME(na_masks)(const int *lo, int K, int rlo, int R, scalar_t *mask) {
    for (int r = 0; r < R; r++)
        for (int l = 0; l < NA_VB; l++) {
            int t = rlo + r;
            mask[r * NA_VB + l] = lo[l] <= t && t < lo[l] + K ? (scalar_t)1 : (scalar_t)0;
        }
}

/* Row-softmax over a block's logits s[a][r < R]: s becomes exp(s - shift) (masked); shift
   is the max (forward) or given (lse, backward); returns the max in mx and the sum in sum. */
static void NAME(na_exp)(scalar_t *s, const scalar_t *mask, int K, int R, int Rp, const scalar_t *shift,
                         scalar_t *mx, scalar_t *sum) {
    NAME(vec) m;
    if (shift) {
        m = *(const NAME(vec) *)shift;
    } else {
        m = (NAME(vec)){0} - (scalar_t)1e30;
        for (int a = 0; a < K; a++)
            for (int r = 0; r < R; r++) {
                NAME(vec) v = *(NAME(vec) *)(s + ((int64_t)a * Rp + r) * NA_VB);
                if (mask) v -= (1 - *(const NAME(vec) *)(mask + r * NA_VB)) * (scalar_t)1e30;
                for (int l = 0; l < NA_VB; l++) m[l] = v[l] > m[l] ? v[l] : m[l];
            }
        *(NAME(vec) *)mx = m;
    }
    NAME(vec) total = {0};
    for (int a = 0; a < K; a++)
        for (int r = 0; r < R; r++) {
            scalar_t *v = s + ((int64_t)a * Rp + r) * NA_VB;
            NAME(vec) mk;
            if (mask) {  /* masked logits become the shift: exp stays finite, then times 0 */
                mk = *(const NAME(vec) *)(mask + r * NA_VB);
                *(NAME(vec) *)v = *(NAME(vec) *)v * mk + m * (1 - mk);
            }
#pragma omp simd
            for (int l = 0; l < NA_VB; l++) v[l] = EXP(v[l] - m[l]);
            if (mask) *(NAME(vec) *)v *= mk;
            total += *(NAME(vec) *)v;
        }
    if (sum) *(NAME(vec) *)sum = total;
}

/* A block of lanes as the kernels read it: its offset range, whether it is interior, and
   where its keys and values are (in place, or the zero-padded window copies) */
typedef struct {
    int rlo, R, Rp, n, interior;
    int64_t off, cs, rs;  /* in-place offset of key (0, 0, 0); channel and row strides */
    const scalar_t *kb, *vb;
} NAME(na_blk);

/* Sets up the block at (y, x0) of one head's planes and computes its logits s (scale q.k +
   bias, before the softmax): q lanes in qb, window copies in kw / vw and masks in mask
   when the block is not interior. Inlined: as a call it cost the backward 4%. */
static inline __attribute__((always_inline)) NAME(na_blk)
NAME(na_block_logits)(const scalar_t *qp, const scalar_t *kp, const scalar_t *vp, const scalar_t *bt, int64_t HW,
                      int W, int H, int y, int x0, int K, int d, scalar_t scale, int Lw, int *lo, scalar_t *kw,
                      scalar_t *vw, scalar_t *mask, scalar_t *qb, scalar_t *init, scalar_t *s) {
    NAME(na_blk) bk;
    int sy = clamp_int(y - K / 2, 0, H - K);
    bk.n = W - x0 < NA_VB ? W - x0 : NA_VB;
    bk.interior = NAME(na_block)(x0, W, K, lo, &bk.rlo, &bk.R);
    bk.Rp = (bk.R + NA_RC - 1) / NA_RC * NA_RC;
    bk.off = (int64_t)sy * W + x0 + bk.rlo, bk.cs = HW, bk.rs = W;
    bk.kb = kp + bk.off, bk.vb = vp + bk.off;
    if (!bk.interior) {
        NAME(na_window_copy)(kp, HW, W, sy, K, d, x0 + bk.rlo, Lw, kw);
        NAME(na_window_copy)(vp, HW, W, sy, K, d, x0 + bk.rlo, Lw, vw);
        NAME(na_masks)(lo, K, bk.rlo, bk.R, mask);
        bk.kb = kw, bk.vb = vw, bk.cs = Lw, bk.rs = (int64_t)d * Lw;
    }
    NAME(na_lanes)(qp, HW, (int64_t)y * W + x0, bk.n, d, scale, qb);
    NAME(na_bias)(bt, K, sy, y, bk.rlo, bk.Rp, init);
    NAME(na_dots)(qb, bk.kb, bk.cs, bk.rs, K, bk.Rp, d, init, s);
    return bk;
}

#define NA_BUFFERS \
    int S = 2 * K - 1, Rmax = (S + NA_RC - 1) / NA_RC * NA_RC, Lw = Rmax + NA_VB; \
    int64_t HW = (int64_t)H * W, plane = (int64_t)d * HW; \
    size_t win = ((size_t)K * d * Lw + NA_VB - 1) / NA_VB * NA_VB, blk = (size_t)K * Rmax * NA_VB; \
    size_t total = 4 * win + 2 * blk + (size_t)(3 * d + Rmax + 4) * NA_VB + (size_t)K * Rmax; \
    scalar_t *mem = (scalar_t *)aligned_alloc(64, (sizeof(scalar_t) * total + 63) / 64 * 64); \
    scalar_t *kw = mem, *vw = kw + win, *dkw = vw + win, *dvw = dkw + win, *s = dvw + win, *ds = s + blk; \
    scalar_t *qb = ds + blk, *gb = qb + d * NA_VB, *ob = gb + d * NA_VB; \
    scalar_t *mask = ob + d * NA_VB, *mx = mask + Rmax * NA_VB, *sm = mx + NA_VB, *lb = sm + NA_VB, *Db = lb + NA_VB; \
    scalar_t *init = Db + NA_VB; \
    int lo[64];

void NAME(na_forward)(const scalar_t *qkv, const scalar_t *rpb, scalar_t *out, scalar_t *lse, scalar_t *scale_,
                      int B, int heads, int H, int W, int d, int K, int nthreads) {
    int C = heads * d;
    scalar_t scale = *scale_;
#pragma omp parallel num_threads(nthreads)
    {
        NA_BUFFERS
#pragma omp for schedule(static)
        for (int64_t row = 0; row < (int64_t)B * heads * H; row++) {
            int b = (int)(row / ((int64_t)heads * H)), h = (int)(row / H % heads), y = (int)(row % H);
            const scalar_t *qp = qkv + ((int64_t)b * 3 * heads + h) * plane, *kp = qp + heads * plane;
            const scalar_t *vp = kp + heads * plane, *bt = rpb + (int64_t)h * S * S;
            for (int x0 = 0; x0 < W; x0 += NA_VB) {
                NAME(na_blk) bk = NAME(na_block_logits)(qp, kp, vp, bt, HW, W, H, y, x0, K, d, scale, Lw, lo, kw, vw,
                                                        mask, qb, init, s);
                NAME(na_exp)(s, bk.interior ? NULL : mask, K, bk.R, bk.Rp, NULL, mx, sm);
                NAME(na_weighted)(s, bk.vb, bk.cs, bk.rs, K, bk.R, bk.Rp, d, ob);
                for (int l = 0; l < bk.n; l++) {
                    scalar_t inv = 1 / sm[l];
                    scalar_t *o = out + (((int64_t)b * H + y) * W + x0 + l) * C + h * d;
                    for (int c = 0; c < d; c++) o[c] = ob[c * NA_VB + l] * inv;
                    lse[(((int64_t)b * heads + h) * H + y) * W + x0 + l] = mx[l] + LOG(sm[l]);
                }
            }
        }
        free(mem);
    }
}

/* dqkv (B, 3, heads, d, H, W): the k and v parts must be zero; drpb (nthreads, heads, 2k-1,
   2k-1) zeros, one accumulator per thread. Blocks of 2k-2 rows: the keys of blocks two
   apart are disjoint, so blocks of one parity run in parallel without races on dk and dv. */
void NAME(na_backward)(const scalar_t *qkv, const scalar_t *rpb, const scalar_t *out, const scalar_t *lse,
                       const scalar_t *dout, scalar_t *dqkv, scalar_t *drpb, scalar_t *scale_,
                       int B, int heads, int H, int W, int d, int K, int nthreads) {
    int C = heads * d, rows = 2 * K - 2 > 1 ? 2 * K - 2 : 1;
    int blocks = (H + rows - 1) / rows;
    scalar_t scale = *scale_;
#pragma omp parallel num_threads(nthreads)
    {
        NA_BUFFERS
        scalar_t *dt = drpb + (int64_t)omp_get_thread_num() * heads * S * S;
        for (int parity = 0; parity < 2; parity++) {
            int nb = (blocks - parity + 1) / 2;
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < (int64_t)B * heads * nb; item++) {
                int bh = (int)(item / nb), blk = 2 * (int)(item % nb) + parity, b = bh / heads, h = bh % heads;
                int64_t head = ((int64_t)b * 3 * heads + h) * plane;
                const scalar_t *qp = qkv + head, *kp = qp + heads * plane, *vp = kp + heads * plane;
                scalar_t *dqp = dqkv + head, *dkp = dqp + heads * plane, *dvp = dkp + heads * plane;
                const scalar_t *bt = rpb + (int64_t)h * S * S;
                scalar_t *dbt = dt + (int64_t)h * S * S;
                int y1 = (blk + 1) * rows < H ? (blk + 1) * rows : H;
                for (int y = blk * rows; y < y1; y++) {
                    int sy = clamp_int(y - K / 2, 0, H - K);
                    for (int x0 = 0; x0 < W; x0 += NA_VB) {
                        NAME(na_blk) bk = NAME(na_block_logits)(qp, kp, vp, bt, HW, W, H, y, x0, K, d, scale, Lw, lo,
                                                                kw, vw, mask, qb, init, s);
                        int rlo = bk.rlo, R = bk.R, Rp = bk.Rp, n = bk.n;
                        const scalar_t *kb = bk.kb;
                        scalar_t *dkb = dkp + bk.off, *dvb = dvp + bk.off;
                        if (!bk.interior) {
                            memset(dkw, 0, sizeof(scalar_t) * 2 * win);  /* dkw, dvw */
                            dkb = dkw, dvb = dvw;
                        }
                        if (n < NA_VB) memset(gb, 0, sizeof(scalar_t) * (size_t)d * NA_VB);
                        for (int l = 0; l < NA_VB; l++) {  /* dO lanes, D = rowsum(dO * O), lse */
                            scalar_t D = 0;
                            if (l < n) {
                                int64_t at = (((int64_t)b * H + y) * W + x0 + l) * C + h * d;
                                const scalar_t *g = dout + at, *o = out + at;
#pragma omp simd reduction(+:D)
                                for (int c = 0; c < d; c++) D += g[c] * o[c];
                                for (int c = 0; c < d; c++) gb[c * NA_VB + l] = g[c];
                            }
                            Db[l] = D;
                            lb[l] = l < n ? lse[(((int64_t)b * heads + h) * H + y) * W + x0 + l] : (scalar_t)0;
                        }
                        int64_t cs = bk.cs, rs = bk.rs;
                        NAME(na_exp)(s, bk.interior ? NULL : mask, K, R, Rp, lb, NULL, NULL);  /* P */
                        NAME(na_dots)(gb, bk.vb, cs, rs, K, Rp, d, NULL, ds);  /* dP = dO V^T */
                        NAME(vec) Dv = *(NAME(vec) *)Db;
                        for (int a = 0; a < K; a++)
                            for (int r = 0; r < R; r++) {
                                int64_t i = ((int64_t)a * Rp + r) * NA_VB;
                                NAME(vec) g = *(NAME(vec) *)(s + i) * (*(NAME(vec) *)(ds + i) - Dv);
                                *(NAME(vec) *)(ds + i) = g;  /* dS, w.r.t. the logits */
                                scalar_t sum = 0;
                                for (int l = 0; l < NA_VB; l++) sum += g[l];
                                dbt[(sy + a - y + K - 1) * S + rlo + r + K - 1] += sum;
                            }
                        NAME(na_weighted)(ds, kb, cs, rs, K, R, Rp, d, ob);  /* dQ / scale */
                        for (int c = 0; c < d; c++) {
                            scalar_t *dq = dqp + c * HW + (int64_t)y * W + x0;
                            for (int l = 0; l < n; l++) dq[l] = ob[c * NA_VB + l] * scale;
                        }
                        NAME(na_scatter)(ds, qb, dkb, cs, rs, K, R, Rp, d);  /* dK += dS^T (scale Q) */
                        NAME(na_scatter)(s, gb, dvb, cs, rs, K, R, Rp, d);  /* dV += P^T dO */
                        if (!bk.interior) {
                            NAME(na_window_add)(dkp, HW, W, sy, K, d, x0 + rlo, Lw, dkw);
                            NAME(na_window_add)(dvp, HW, W, sy, K, d, x0 + rlo, Lw, dvw);
                        }
                    }
                }
            }
        }
        free(mem);
    }
}
"""


@functools.lru_cache(maxsize=1)
def native_library():
    """The compiled NA2D kernels, or ``None`` (see :mod:`.native`)."""
    return native.load('neighborhood_attention', _C_KERNELS, {'na_forward': (5, 7), 'na_backward': (8, 7)})


#: Spare elements after the channel-major qkv: the kernels' vector loads of an interior
#: block's last window offset may read one element past a key row.
_QKV_TAIL = 64


def _qkv_buffers(rows: torch.Tensor, weight: torch.Tensor, count: int):
    """``count`` channel-major ``(B, 3C, N)`` buffers of the kept workspace, with spare elements
    after them (the forward pass asks for one, the backward for two)."""
    shape = (rows.shape[0], weight.shape[0], rows.shape[1])
    return native.workspace_views('neighborhood_attention', shape, rows.dtype, count, _QKV_TAIL)


def _project(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The qkv projection of ``rows (B, N, C)`` written channel-major into ``out (B, 3C, N)``."""
    return torch.baddbmm(bias.view(1, -1, 1), weight.expand(rows.shape[0], -1, -1), rows.transpose(1, 2), out=out)


class _NativeNeighborhoodAttentionFunction(torch.autograd.Function):
    """The qkv projection and NA2D with relative position bias by the C kernels (CPU, float32 /
    float64), one autograd node. The projection is written channel-major into a kept
    workspace and recomputed in the backward pass instead of being kept: it is 3x the block's
    width (221 MB of a DAT-T++ step at 800x1344), and its gradient lives in the workspace too.
    Kept: the input rows (for the weight gradient anyway), the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, rows, weight, bias, table, H, W, num_heads, kernel_size, scale):
        B, C = rows.shape[0], weight.shape[0] // 3
        qkv = _project(rows, weight, bias, *_qkv_buffers(rows, weight, 1))
        out, lse = rows.new_empty(B, H, W, C), rows.new_empty(B, num_heads, H, W)
        scale_ = rows.new_tensor([scale])
        native.function(native_library(), 'na_forward', rows.dtype)(
            *native.pointers(qkv, table, out, lse, scale_), B, num_heads, H, W, C // num_heads, kernel_size,
            torch.get_num_threads())
        ctx.save_for_backward(rows, weight, bias, table, out, lse, scale_)
        ctx.args = (H, W, num_heads, kernel_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, bias, table, out, lse, scale_ = ctx.saved_tensors
        H, W, num_heads, kernel_size = ctx.args
        B, C = rows.shape[0], weight.shape[0] // 3
        threads = torch.get_num_threads()
        qkv, dqkv = _qkv_buffers(rows, weight, 2)
        _project(rows, weight, bias, qkv)
        dqkv[:, C:].zero_()  # k and v are accumulated, q written once
        dtable = table.new_zeros(threads, *table.shape)
        native.function(native_library(), 'na_backward', rows.dtype)(
            *native.pointers(qkv, table, out, lse, grad_out.to(rows.dtype).contiguous(), dqkv, dtable, scale_),
            B, num_heads, H, W, C // num_heads, kernel_size, threads)
        grad_rows = torch.matmul(dqkv.transpose(1, 2), weight)  # (B, N, C), the rows' own layout
        grad_weight = torch.bmm(dqkv, rows).sum(0) if B > 1 else dqkv[0] @ rows[0]
        return grad_rows, grad_weight, dqkv.sum((0, 2)), dtable.sum(0), None, None, None, None, None


def neighborhood_attention_native(x: torch.Tensor, qkv: nn.Linear, bias_table: torch.Tensor, num_heads: int,
                                  kernel_size: int, scale: float) -> torch.Tensor:
    """The qkv projection and 2D neighborhood attention by the C kernels.

    Args:
        x: ``B x H x W x Cin`` map, ``H, W >= kernel_size``.
        qkv: The ``Cin -> 3C`` projection (q, k, v, each ``heads x d`` channels).
        bias_table: ``heads x (2k-1) x (2k-1)`` relative position bias.
        num_heads: Heads.
        kernel_size: Side ``k`` of the neighborhood.
        scale: Factor of the ``q . k`` products.
    Returns:
        ``B x H x W x C`` (before the output projection), as ``neighborhood_attention`` on
        ``q * scale, k, v``. Needs ``native.usable(x, native_library)``; runs in float32
        under autocast.
    """
    B, H, W, Cin = x.shape
    if min(H, W) < kernel_size:
        raise ValueError(f'neighborhood attention needs maps of at least the kernel size {kernel_size}, got {H}x{W}')
    return in_full_precision(
        lambda x, w, b, table: _NativeNeighborhoodAttentionFunction.apply(
            x.reshape(B, H * W, Cin), w, b, table.contiguous(), H, W, num_heads, kernel_size, scale),
        (x, qkv.weight, qkv.bias, bias_table))


@functools.lru_cache(maxsize=1)
def _natten_functions() -> Optional[tuple]:
    """NATTEN's unfused QK/AV ops (``q``/``k`` as ``B x heads x H x W x d``), if installed."""
    try:
        from natten.functional import natten2dav, natten2dqkrpb  # natten < 0.15
        return natten2dqkrpb, natten2dav
    except ImportError:
        pass
    try:
        from natten.functional import na2d_av, na2d_qk  # natten 0.15 - 0.17
    except ImportError:
        return None
    return (lambda q, k, rpb, ks, dil: na2d_qk(q, k, kernel_size=ks, dilation=dil, rpb=rpb),
            lambda a, v, ks, dil: na2d_av(a, v, kernel_size=ks, dilation=dil))


class NeighborhoodAttention(nn.Module):
    """Neighborhood attention (spec letter ``N``), NATTEN's NA2D with relative position bias.

    Uses NATTEN when it is installed and agrees with the pure-PyTorch path on a probe input
    (checked once per process); otherwise, by default, ``neighborhood_attention_native`` on CPU
    (C kernels, see :mod:`.native`) and ``neighborhood_attention_tiled`` elsewhere (halo tiles,
    memory-lean, pure PyTorch), or the gather of every
    query's ``k x k`` keys (``neighborhood_attention``) with ``attn_impl='reference'``, while
    jit-tracing (so that FLOP counters see the same ops) and when attention dropout is active.
    Maps smaller than the kernel are zero-padded at the bottom and right to the kernel size
    and cropped after.

    Args:
        embed_dims: Channels of the input and output.
        num_heads: Attention heads.
        kernel_size: Side of the neighborhood.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        use_natten: ``None`` uses NATTEN when it is usable; ``False`` never does.
        attn_impl: Path without NATTEN, ``'fast'`` or ``'reference'`` (also an attribute).
    """

    def __init__(self, embed_dims: int, num_heads: int, kernel_size: int = 7,
                 attn_drop: float = 0., proj_drop: float = 0., use_natten: Optional[bool] = None,
                 attn_impl: str = 'fast'):
        super().__init__()
        if attn_impl not in ('fast', 'reference'):
            raise ValueError(f"attn_impl must be 'fast' or 'reference', got {attn_impl!r}")
        self.attn_impl = attn_impl
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.scale = (embed_dims // num_heads) ** -0.5
        self.use_natten = use_natten
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _path(self) -> str:
        """``'natten'``, ``'native'``, ``'tiled'`` or ``'reference'`` (see the class docstring)."""
        if self.use_natten is not False and _usable_natten(self.kernel_size) is not None:
            return 'natten'
        if self.attn_impl != 'fast' or torch.jit.is_tracing() or torch.jit.is_scripting() \
                or (self.training and self.attn_drop.p > 0):
            return 'reference'
        return 'native' if native.usable(self.qkv.weight, native_library) else 'tiled'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ks, nh, table = self.kernel_size, self.num_heads, self.relative_position_bias_table
        if H < ks or W < ks:
            x = F.pad(x, (0, max(0, ks - W), 0, max(0, ks - H)))
        x = x.permute(0, 2, 3, 1)
        Hp, Wp = x.shape[1:3]
        path = self._path()
        if path == 'native':
            out = neighborhood_attention_native(x, self.qkv, table, nh, ks, self.scale)
        else:
            qkv = self.qkv(x)
            q, k, v = qkv.reshape(B, Hp, Wp, 3, nh, C // nh).permute(3, 0, 4, 1, 2, 5)
            q = q * self.scale
            if path == 'natten':
                qk, av = _usable_natten(ks)
                out = av(self.attn_drop(qk(q, k, table, ks, 1).softmax(dim=-1)), v, ks, 1)
            elif path == 'tiled':
                out = neighborhood_attention_tiled(q, k, v, table, ks)
            else:
                out = neighborhood_attention(q, k, v, table, ks, self.attn_drop)
            out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)
        out = self.proj_drop(self.proj(out))
        return out.permute(0, 3, 1, 2)[:, :, :H, :W]

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, kernel_size={self.kernel_size}, attn_impl={self.attn_impl!r}'


@functools.lru_cache(maxsize=8)
def _usable_natten(kernel_size: int) -> Optional[tuple]:
    """NATTEN's ops if installed and they match the pure-PyTorch path; checked once."""
    ops = _natten_functions()
    if ops is None:
        return None
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, kernel_size + 3, kernel_size + 2, 8, generator=gen) for _ in range(3))
    rpb = torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen)
    try:
        attn = ops[0](q, k, rpb, kernel_size, 1).softmax(dim=-1)
        theirs = ops[1](attn, v, kernel_size, 1)
    except Exception as e:  # an installed natten that cannot run here (e.g. built for CUDA only)
        warnings.warn(f'natten is installed but unusable ({e}); using the pure-PyTorch neighborhood attention')
        return None
    ours = neighborhood_attention(q, k, v, rpb, kernel_size)
    if not torch.allclose(theirs, ours, atol=1e-5):
        warnings.warn('natten disagrees with the NA2D reference; using the pure-PyTorch neighborhood attention')
        return None
    return ops
