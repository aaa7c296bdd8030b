"""Neighborhood attention on CPU as torch.library ops with fake implementations and registered
autograd formulas.

``mmdat::neighborhood_attention_forward``: the qkv projection and NA2D with relative position
bias by the C kernels of ``csrc/neighborhood_attention.c`` (float32 / float64), one node. The
projection is written channel-major into a kept workspace and recomputed in the backward pass
instead of being kept: it is 3x the block's width (221 MB of a DAT-T++ step at 800x1344), and
its gradient lives in the workspace too; no op output views it. Kept: the input rows (for the
weight gradient anyway), the output and the log-sum-exp.

``mmdat::neighborhood_attention_tiled_forward``: the same attention (after the projection) over
halo tiles in PyTorch ops, memory-lean, without a compiler; its tiling is Python ints.
"""
import functools
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .. import build
from ..config import in_full_precision, warn_once
from . import reference
from .reference import window_start

LIBRARY = build.Library('neighborhood_attention', ['neighborhood_attention.c'],
                        {'na_forward': (5, 7), 'na_backward': (8, 7)})

#: Spare elements after the channel-major qkv: the kernels' vector loads of an interior
#: block's last window offset may read one element past a key row.
_QKV_TAIL = 64


def _qkv_buffers(rows: torch.Tensor, weight: torch.Tensor, count: int):
    """``count`` channel-major ``(B, 3C, N)`` buffers of the kept workspace, with spare elements
    after them (the forward pass asks for one, the backward for two)."""
    shape = (rows.shape[0], weight.shape[0], rows.shape[1])
    return build.workspace_views('neighborhood_attention', shape, rows.dtype, count, _QKV_TAIL)


def _project(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The qkv projection of ``rows (B, N, C)`` written channel-major into ``out (B, 3C, N)``."""
    return torch.baddbmm(bias.view(1, -1, 1), weight.expand(rows.shape[0], -1, -1), rows.transpose(1, 2), out=out)


# ----------------------------------------------------------------------------- C kernels

@torch.library.custom_op('mmdat::neighborhood_attention_forward', mutates_args=())
def neighborhood_attention_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, table: torch.Tensor,
                                   num_heads: int, kernel_size: int,
                                   scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output ``B x H x W x C`` (before the output projection) and log-sum-exp ``B x heads x H x W``
    of the map ``x (B, H, W, Cin)`` and its qkv projection ``weight (3C, Cin)``, ``bias``."""
    B, H, W, Cin = x.shape
    C = weight.shape[0] // 3
    _check((H, W), table, num_heads, kernel_size, 'inconsistent arguments')  # the kernels' bounds
    rows, weight, bias, table = x.reshape(B, H * W, Cin), weight.contiguous(), bias.contiguous(), table.contiguous()
    qkv = _project(rows, weight, bias, *_qkv_buffers(rows, weight, 1))
    out, lse = x.new_empty(B, H, W, C), x.new_empty(B, num_heads, H, W)
    scale_ = x.new_tensor([scale])  # held: the kernel reads it through its pointer
    LIBRARY.function('na_forward', x.dtype)(
        *build.pointers(qkv, table, out, lse, scale_), B, num_heads, H, W, C // num_heads, kernel_size,
        torch.get_num_threads())
    return out, lse


@neighborhood_attention_forward.register_fake
def _(x, weight, bias, table, num_heads, kernel_size, scale):
    B, H, W, _ = x.shape
    return x.new_empty(B, H, W, weight.shape[0] // 3), x.new_empty(B, num_heads, H, W)


@torch.library.custom_op('mmdat::neighborhood_attention_backward', mutates_args=())
def neighborhood_attention_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                    bias: torch.Tensor, table: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                    num_heads: int, kernel_size: int, scale: float
                                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``x``, ``weight``, ``bias`` and ``table``."""
    B, H, W, Cin = x.shape
    C = weight.shape[0] // 3
    rows, weight, bias, table = x.reshape(B, H * W, Cin), weight.contiguous(), bias.contiguous(), table.contiguous()
    threads = torch.get_num_threads()
    qkv, dqkv = _qkv_buffers(rows, weight, 2)
    _project(rows, weight, bias, qkv)
    dqkv[:, C:].zero_()  # k and v are accumulated, q written once
    dtable = table.new_zeros(threads, *table.shape)  # per-thread sums
    # held in variables: the kernel reads them through their pointers
    out, lse, grad_out, scale_ = (out.contiguous(), lse.contiguous(), grad_out.to(x.dtype).contiguous(),
                                  x.new_tensor([scale]))
    LIBRARY.function('na_backward', x.dtype)(
        *build.pointers(qkv, table, out, lse, grad_out, dqkv, dtable, scale_),
        B, num_heads, H, W, C // num_heads, kernel_size, threads)
    grad_x = torch.matmul(dqkv.transpose(1, 2), weight).view(B, H, W, Cin)  # the input's own layout
    grad_weight = torch.bmm(dqkv, rows).sum(0) if B > 1 else dqkv[0] @ rows[0]
    return grad_x, grad_weight, dqkv.sum((0, 2)), dtable.sum(0)


@neighborhood_attention_backward.register_fake
def _(grad_out, x, weight, bias, table, out, lse, num_heads, kernel_size, scale):
    return tuple(t.new_empty(t.shape) for t in (x, weight, bias, table))


def _setup_context(ctx, inputs, output):
    x, weight, bias, table, *ctx.args = inputs
    ctx.save_for_backward(x, weight, bias, table, *output)


def _backward(ctx, grad_out, grad_lse):
    return (*neighborhood_attention_backward(grad_out, *ctx.saved_tensors, *ctx.args), None, None, None)


torch.library.register_autograd('mmdat::neighborhood_attention_forward', _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- halo tiles in PyTorch

class _Axis:
    """Halo tiling of one axis: query tiles of ``t`` positions, each with the region of ``r``
    consecutive key positions that holds the windows of all its queries (Python ints: no
    host syncs), and the bias-table coordinates of every (tile, query, region key)."""

    def __init__(self, n: int, kernel_size: int, tile: int, device):
        k = kernel_size
        self.t = t = min(tile, n)
        self.r = r = min(t + k - 1, n)
        self.tiles = -(-n // t)
        self.padded = self.tiles * t
        # window starts are non-decreasing with slope <= 1: a tile's windows lie in
        # [start of its first query, start of its first query + t - 1 + k)
        self.region: List[int] = [min(window_start(i * t, n, k), n - r) for i in range(self.tiles)]
        # what a tile's bias coordinates depend on: its queries' windows relative to its region
        # (queries past the map, in padded tiles, take the last window)
        self.pattern_key = [tuple((window_start(q, n, k) - a, q - a) for q in range(i * t, (i + 1) * t))
                            for i, a in enumerate(self.region)]
        self.region_t = torch.tensor(self.region, device=device)
        keys = self.region_t[:, None, None] + torch.arange(r, device=device)  # (tiles, 1, r)
        queries = torch.arange(self.padded, device=device).view(self.tiles, t)  # may run past n
        q_start = (queries - k // 2).clamp(0, n - k)[..., None]
        valid = (keys >= q_start) & (keys < q_start + k)  # (tiles, t, r)
        rel = (keys - queries[..., None] + k - 1).clamp(0, 2 * k - 2)
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
        self.region_cols = cols.region_t[:, None] + ar(rw)
        # tile rows with the same row pattern (all interior ones) share their bias
        patterns = {}
        self.pattern = [patterns.setdefault(key, len(patterns)) for key in rows.pattern_key]
        self.pattern_rows = [self.pattern.index(p) for p in range(len(patterns))]

    def key_rows(self, step: range) -> Tuple[int, int, torch.Tensor]:
        """First and end row of the keys a step needs, and the index of its regions
        ``(nt, tc, rh*rw)`` into those rows viewed as ``(rows * W)``."""
        first, last = self.rows.region[step.start], self.rows.region[step.stop - 1] + self.rows.r
        region = self.rows.region_t[step.start:step.stop]
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


def _tiled_forward(q, k, v, table, kernel_size: int, tile: int):
    """Output ``(B, heads, H, W, d)`` and log-sum-exp ``(B, heads, H, W)``. Each ``t x t`` query
    tile attends, by a dense matmul, to the ``(t+k-1)^2`` keys of the region holding all its
    queries' windows; keys outside a query's window get ``-inf`` and weight zero (see
    ``_EXP_FLOOR``): the NA2D softmax. Buffers are allocated once per call and reused by
    every row of tiles."""
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
        total = S.sum(-1, keepdim=True)
        torch.bmm(S, vr, out=o)
        _scatter_step(o.div_(total), out, step, tl)
        _scatter_step(m.add_(total.log_()), lse, step, tl)
    return out[:, :H, :W].reshape(B, nh, H, W, d).contiguous(), lse[:, :H, :W].reshape(B, nh, H, W).contiguous()


def _tiled_backward(grad_out, q, k, v, table, out, lse, kernel_size: int, tile: int):
    """Gradients w.r.t. ``q``, ``k``, ``v`` and ``table``; recomputes each row of tiles' logits."""
    B, nh, H, W, d = q.shape
    BH = B * nh
    tl = _Tiling(H, W, kernel_size, tile, q.device, BH)
    rows, cols = tl.rows, tl.cols
    biases, masks = _pattern_biases(table, tl)
    dbiases = [torch.zeros_like(b) for b in biases]
    qp = _padded(q.reshape(BH, H, W, d), rows, cols)
    dout = _padded(grad_out.reshape(BH, H, W, d), rows, cols)
    Dsum = (dout * _padded(out.reshape(BH, H, W, d), rows, cols)).sum(-1, keepdim=True)
    lse = _padded(lse.reshape(BH, H, W, 1), rows, cols)
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
    dtable = dext[:, :-1].reshape(table.shape).contiguous()
    return dq[:, :H, :W].reshape(q.shape).contiguous(), dk.view(k.shape), dv.view(v.shape), dtable


@torch.library.custom_op('mmdat::neighborhood_attention_tiled_forward', mutates_args=())
def neighborhood_attention_tiled_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                                         kernel_size: int, tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output ``B x heads x H x W x d`` and log-sum-exp ``B x heads x H x W`` of
    :func:`.reference.neighborhood_attention` by halo tiles of side ``tile``."""
    return _tiled_forward(q.contiguous(), k.contiguous(), v.contiguous(), table, kernel_size, tile)


@neighborhood_attention_tiled_forward.register_fake
def _(q, k, v, table, kernel_size, tile):
    return q.new_empty(q.shape), q.new_empty(q.shape[:4])


@torch.library.custom_op('mmdat::neighborhood_attention_tiled_backward', mutates_args=())
def neighborhood_attention_tiled_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                          v: torch.Tensor, table: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                          kernel_size: int, tile: int
                                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``q``, ``k``, ``v`` and ``table``."""
    return _tiled_backward(grad_out.to(q.dtype).contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                           table, out.contiguous(), lse.contiguous(), kernel_size, tile)


@neighborhood_attention_tiled_backward.register_fake
def _(grad_out, q, k, v, table, out, lse, kernel_size, tile):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            table.new_empty(table.shape))


def _tiled_setup_context(ctx, inputs, output):
    q, k, v, table, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, table, *output)


def _tiled_autograd(ctx, grad_out, grad_lse):
    return (*neighborhood_attention_tiled_backward(grad_out, *ctx.saved_tensors, *ctx.args), None, None)


torch.library.register_autograd('mmdat::neighborhood_attention_tiled_forward', _tiled_autograd,
                                setup_context=_tiled_setup_context)


# ----------------------------------------------------------------------------- entry points

def _check(q_shape, table: torch.Tensor, num_heads: int, kernel_size: int, what: str):
    H, W = q_shape
    if tuple(table.shape) != (num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1):
        raise ValueError(f'neighborhood attention: {what}: a table of {tuple(table.shape)} for {num_heads} heads '
                         f'and kernel size {kernel_size}')
    if min(H, W) < kernel_size:
        raise ValueError(f'neighborhood attention needs maps of at least the kernel size {kernel_size}, got {H}x{W}')


def neighborhood_attention_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                                 kernel_size: int, tile: int = 6) -> torch.Tensor:
    """:func:`.reference.neighborhood_attention` (no dropout) by halo tiles in PyTorch ops, one op;
    ``tile``: side of the query tiles. Runs in float32 under autocast."""
    if k.shape != q.shape or v.shape[:4] != q.shape[:4] or q.dim() != 5:
        raise ValueError(f'neighborhood attention: inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, '
                         f'v {tuple(v.shape)}')
    _check(q.shape[2:4], bias_table, q.shape[1], kernel_size, 'inconsistent arguments')
    return in_full_precision(
        lambda q, k, v, table: neighborhood_attention_tiled_forward(q, k, v, table, kernel_size, tile)[0],
        (q, k, v, bias_table))


def neighborhood_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bias_table: torch.Tensor,
                           num_heads: int, kernel_size: int, scale: float) -> torch.Tensor:
    """The qkv projection and 2D neighborhood attention, by the C kernels.

    Args:
        x: ``B x H x W x Cin`` map, ``H, W >= kernel_size``.
        weight, bias: The ``Cin -> 3C`` projection (q, k, v, each ``heads x d`` channels).
        bias_table: ``heads x (2k-1) x (2k-1)`` relative position bias.
        num_heads: Heads.
        kernel_size: Side ``k`` of the neighborhood.
        scale: Factor of the ``q . k`` products.
    Returns:
        ``B x H x W x C`` (before the output projection), as
        :func:`.reference.neighborhood_attention` on ``q * scale, k, v``. Other floating dtypes
        and autocast run in float32; without a C compiler :func:`neighborhood_attention_tiled`
        runs; tensors the kernels cannot take (not on CPU, not strided) run the reference
        formulation, with one warning naming the reason.
    """
    B, H, W, Cin = x.shape
    if x.dim() != 4 or weight.dim() != 2 or weight.shape[1] != Cin or weight.shape[0] % (3 * num_heads) \
            or tuple(bias.shape) != (weight.shape[0], ):
        raise ValueError(f'neighborhood attention: inconsistent arguments: x {tuple(x.shape)} (channels last), '
                         f'weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, {num_heads} heads')
    _check((H, W), bias_table, num_heads, kernel_size, 'inconsistent arguments')
    reason = build.unsupported('neighborhood attention', x, weight, bias, bias_table)
    if reason is not None or not LIBRARY.available():
        if reason is not None:
            warn_once(f'mmdat: the CPU neighborhood attention op {reason}; running the reference formulation')
        C = weight.shape[0] // 3
        q, k, v = F.linear(x, weight, bias).reshape(B, H, W, 3, num_heads, C // num_heads).permute(3, 0, 4, 1, 2, 5)
        attention = reference.neighborhood_attention if reason is not None else neighborhood_attention_tiled
        out = attention(q * scale, k, v, bias_table, kernel_size)
        return out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
    return in_full_precision(
        lambda x, w, b, table: neighborhood_attention_forward(x.contiguous(), w, b, table, num_heads, kernel_size,
                                                              scale)[0], (x, weight, bias, bias_table))
