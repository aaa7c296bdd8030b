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

#: NA2D forward and backward, one query at a time (its k*k logits in a small buffer; no
#: tiles, no masks), reading q, k and v where the qkv projection wrote them:
#: qkv (B, H, W, 3, heads, d) and out (B, H, W, heads, d), both position-major as the
#: Linear layers around the attention want them; rpb (heads, 2k-1, 2k-1); lse
#: (B, heads, H, W). The backward recomputes the logits from lse and writes dqkv.
_C_KERNELS = r"""
/* scaled logits s[k*k] of one query and their maximum; the window starts at (sy, sx) */
static inline scalar_t NAME(logits)(const scalar_t *qi, const scalar_t *kb, const scalar_t *bt, scalar_t *s,
                                    scalar_t scale, int y, int x, int sy, int sx, int W, int ts, int d, int K) {
    int S = 2 * K - 1;
    scalar_t mx = -INFINITY;
    for (int a = 0; a < K; a++) {
        const scalar_t *krow = kb + ((int64_t)(sy + a) * W + sx) * ts;
        const scalar_t *brow = bt + (sy + a - y + K - 1) * S + (sx - x + K - 1);
        for (int b = 0; b < K; b++) {
            const scalar_t *kj = krow + (int64_t)b * ts;
            scalar_t acc = 0;
#pragma omp simd reduction(+:acc)
            for (int c = 0; c < d; c++) acc += qi[c] * kj[c];
            acc = acc * scale + brow[b];
            s[a * K + b] = acc;
            mx = acc > mx ? acc : mx;
        }
    }
    return mx;
}

void NAME(na_forward)(const scalar_t *qkv, const scalar_t *rpb, scalar_t *out, scalar_t *lse, scalar_t *scale_,
                      int B, int heads, int H, int W, int d, int K, int nthreads) {
    int S = 2 * K - 1, KK = K * K, C = heads * d, ts = 3 * C;
    scalar_t scale = *scale_;
#pragma omp parallel num_threads(nthreads)
    {
        scalar_t *s = (scalar_t *)malloc(sizeof(scalar_t) * (size_t)KK);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)B * heads * H; r++) {
            int b = (int)(r / ((int64_t)heads * H)), h = (int)(r / H % heads), y = (int)(r % H);
            int sy = clamp_int(y - K / 2, 0, H - K);
            const scalar_t *qb = qkv + (int64_t)b * H * W * ts + h * d, *kb = qb + C, *vb = qb + 2 * C;
            const scalar_t *bt = rpb + (int64_t)h * S * S;
            for (int x = 0; x < W; x++) {
                int sx = clamp_int(x - K / 2, 0, W - K);
                int64_t p = (int64_t)y * W + x;
                scalar_t mx = NAME(logits)(qb + p * ts, kb, bt, s, scale, y, x, sy, sx, W, ts, d, K);
                scalar_t sum = 0;
#pragma omp simd reduction(+:sum)
                for (int j = 0; j < KK; j++) {
                    s[j] = EXP(s[j] - mx);
                    sum += s[j];
                }
                scalar_t *o = out + ((int64_t)b * H * W + p) * C + h * d, inv = 1 / sum;
                for (int c = 0; c < d; c++) o[c] = 0;
                for (int a = 0; a < K; a++) {
                    const scalar_t *vrow = vb + ((int64_t)(sy + a) * W + sx) * ts;
                    for (int j = 0; j < K; j++) {
                        scalar_t w = s[a * K + j] * inv;
                        const scalar_t *vj = vrow + (int64_t)j * ts;
#pragma omp simd
                        for (int c = 0; c < d; c++) o[c] += w * vj[c];
                    }
                }
                lse[r * W + x] = mx + LOG(sum);
            }
        }
        free(s);
    }
}

/* dqkv must be zero; drpb: (nthreads, heads, 2k-1, 2k-1) zeros, one accumulator per thread.
   Blocks of 2k-2 rows: the keys of blocks two apart are disjoint, so blocks of one parity
   run in parallel without races on dk and dv. */
void NAME(na_backward)(const scalar_t *qkv, const scalar_t *rpb, const scalar_t *out, const scalar_t *lse,
                       const scalar_t *dout, scalar_t *dqkv, scalar_t *drpb, scalar_t *scale_,
                       int B, int heads, int H, int W, int d, int K, int nthreads) {
    int S = 2 * K - 1, KK = K * K, C = heads * d, ts = 3 * C, rows = 2 * K - 2 > 1 ? 2 * K - 2 : 1;
    int blocks = (H + rows - 1) / rows;
    scalar_t scale = *scale_;
#pragma omp parallel num_threads(nthreads)
    {
        scalar_t *s = (scalar_t *)malloc(sizeof(scalar_t) * (size_t)KK);
        scalar_t *dt = drpb + (int64_t)omp_get_thread_num() * heads * S * S;
        for (int parity = 0; parity < 2; parity++) {
            int nb = (blocks - parity + 1) / 2;
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < (int64_t)B * heads * nb; item++) {
                int bh = (int)(item / nb), blk = 2 * (int)(item % nb) + parity, b = bh / heads, h = bh % heads;
                int64_t base = (int64_t)b * H * W * ts + h * d;
                const scalar_t *qb = qkv + base, *kb = qb + C, *vb = qb + 2 * C;
                scalar_t *dqb = dqkv + base, *dkb = dqb + C, *dvb = dqb + 2 * C;
                const scalar_t *bt = rpb + (int64_t)h * S * S;
                scalar_t *dbt = dt + (int64_t)h * S * S;
                int y1 = (blk + 1) * rows < H ? (blk + 1) * rows : H;
                for (int y = blk * rows; y < y1; y++) {
                    int sy = clamp_int(y - K / 2, 0, H - K);
                    for (int x = 0; x < W; x++) {
                        int sx = clamp_int(x - K / 2, 0, W - K);
                        int64_t p = (int64_t)y * W + x, o = ((int64_t)b * H * W + p) * C + h * d;
                        const scalar_t *qi = qb + p * ts, *gi = dout + o, *oi = out + o;
                        scalar_t l = lse[((int64_t)bh * H + y) * W + x];
                        NAME(logits)(qi, kb, bt, s, scale, y, x, sy, sx, W, ts, d, K);
#pragma omp simd
                        for (int j = 0; j < KK; j++) s[j] = EXP(s[j] - l);  /* P */
                        scalar_t D = 0;
#pragma omp simd reduction(+:D)
                        for (int c = 0; c < d; c++) D += gi[c] * oi[c];
                        scalar_t *dqi = dqb + p * ts;
                        for (int a = 0; a < K; a++) {
                            int64_t row = ((int64_t)(sy + a) * W + sx) * ts;
                            scalar_t *dbrow = dbt + (sy + a - y + K - 1) * S + (sx - x + K - 1);
                            for (int j = 0; j < K; j++) {
                                int64_t kj = row + (int64_t)j * ts;
                                scalar_t w = s[a * K + j], dw = 0;
#pragma omp simd reduction(+:dw)
                                for (int c = 0; c < d; c++) dw += gi[c] * vb[kj + c];
                                scalar_t ds = w * (dw - D), dss = ds * scale;
                                dbrow[j] += ds;
#pragma omp simd
                                for (int c = 0; c < d; c++) {
                                    dqi[c] += dss * kb[kj + c];
                                    dkb[kj + c] += dss * qi[c];
                                    dvb[kj + c] += w * gi[c];
                                }
                            }
                        }
                    }
                }
            }
        }
        free(s);
    }
}
"""


@functools.lru_cache(maxsize=1)
def native_library():
    """The compiled NA2D kernels, or ``None`` (see :mod:`.native`)."""
    return native.load('neighborhood_attention', _C_KERNELS, {'na_forward': (5, 7), 'na_backward': (8, 7)})


class _NativeNeighborhoodAttentionFunction(torch.autograd.Function):
    """NA2D with relative position bias by the C kernels (CPU, float32 / float64)."""

    @staticmethod
    def forward(ctx, qkv, table, num_heads, kernel_size, scale):
        B, H, W, C3 = qkv.shape
        d = C3 // (3 * num_heads)
        out, lse = qkv.new_empty(B, H, W, C3 // 3), qkv.new_empty(B, num_heads, H, W)
        scale_ = qkv.new_tensor([scale])
        native.function(native_library(), 'na_forward', qkv.dtype)(
            *native.pointers(qkv, table, out, lse, scale_), B, num_heads, H, W, d, kernel_size, torch.get_num_threads())
        ctx.save_for_backward(qkv, table, out, lse, scale_)
        ctx.args = (num_heads, kernel_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, table, out, lse, scale_ = ctx.saved_tensors
        num_heads, kernel_size = ctx.args
        B, H, W, C3 = qkv.shape
        threads = torch.get_num_threads()
        dqkv, dtable = torch.zeros_like(qkv), table.new_zeros(threads, *table.shape)
        native.function(native_library(), 'na_backward', qkv.dtype)(
            *native.pointers(qkv, table, out, lse, grad_out.to(qkv.dtype).contiguous(), dqkv, dtable, scale_),
            B, num_heads, H, W, C3 // (3 * num_heads), kernel_size, threads)
        return dqkv, dtable.sum(0), None, None, None


def neighborhood_attention_native(qkv: torch.Tensor, bias_table: torch.Tensor, num_heads: int, kernel_size: int,
                                  scale: float) -> torch.Tensor:
    """2D neighborhood attention by the C kernels, on the qkv projection's output as it is.

    Args:
        qkv: ``B x H x W x (3 * heads * d)``: q, k, v, each ``heads x d``, per position;
            ``H, W >= kernel_size``.
        bias_table: ``heads x (2k-1) x (2k-1)`` relative position bias.
        num_heads: Heads.
        kernel_size: Side ``k`` of the neighborhood.
        scale: Factor of the ``q . k`` products.
    Returns:
        ``B x H x W x (heads * d)``, as ``neighborhood_attention`` on ``q * scale, k, v``.
        Needs ``native.usable(qkv, native_library)``; runs in float32 under autocast.
    """
    H, W = qkv.shape[1:3]
    if min(H, W) < kernel_size:
        raise ValueError(f'neighborhood attention needs maps of at least the kernel size {kernel_size}, got {H}x{W}')
    return in_full_precision(
        lambda qkv, table: _NativeNeighborhoodAttentionFunction.apply(qkv.contiguous(), table.contiguous(), num_heads,
                                                                      kernel_size, scale),
        (qkv, bias_table))


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
        qkv = self.qkv(x)
        path = self._path()
        if path == 'native':
            out = neighborhood_attention_native(qkv, table, nh, ks, self.scale)
        else:
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
