import functools
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import trunc_normal_


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


def _window_starts(n: int, kernel_size: int, device) -> torch.Tensor:
    """NA2D window start of every position along an axis of length ``n`` (also of positions
    past the end, which tiles pad with; their windows are the last one)."""
    return (torch.arange(n, device=device) - kernel_size // 2).clamp(0, n - kernel_size)


class _Axis:
    """Halo tiling of one axis: query tiles of ``t`` positions, each with the region of ``r``
    consecutive key positions that holds the windows of all its queries."""

    def __init__(self, n: int, kernel_size: int, tile: int, device):
        self.t = t = min(tile, n)
        self.r = r = min(t + kernel_size - 1, n)
        self.tiles = -(-n // t)
        first = torch.arange(self.tiles, device=device) * t
        # window starts are non-decreasing with slope <= 1: a tile's windows lie in
        # [start of its first query, start of its first query + t - 1 + k)
        start = (first - kernel_size // 2).clamp(0, n - kernel_size)
        self.region = start.clamp(max=n - r)  # (tiles,) first key of each region
        self.keys = (self.region[:, None] + torch.arange(r, device=device)).reshape(-1)  # (tiles*r,)
        queries = first[:, None] + torch.arange(t, device=device)  # (tiles, t), may run past n
        q_start = (queries - kernel_size // 2).clamp(0, n - kernel_size)
        keys = self.keys.view(-1, 1, r)
        self.valid = (keys >= q_start[..., None]) & (keys < q_start[..., None] + kernel_size)  # (tiles, t, r)
        self.rel = (keys - queries[..., None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)


class _Tiling:

    def __init__(self, H: int, W: int, kernel_size: int, tile: int, device):
        self.k = kernel_size
        self.rows = _Axis(H, kernel_size, tile, device)
        self.cols = _Axis(W, kernel_size, tile, device)
        span = 2 * kernel_size - 1
        self.inf_index = span * span
        # flat index into the bias table extended by one -inf entry (``inf_index``), taken by
        # the keys of a region that lie outside a query's window; negative marks those here
        rows, cols = self.rows, self.cols
        self.row_index = torch.where(rows.valid, rows.rel * span, -2 * self.inf_index)  # (tr, th, rh)
        self.col_index = torch.where(cols.valid, cols.rel, -2 * self.inf_index)  # (tc, tw, rw)

    def bias_index(self, t: slice) -> torch.Tensor:
        """Flat indices ``(nt*tc*th*tw*rh*rw,)`` into the extended table for tile rows ``t``."""
        ri, ci = self.row_index[t], self.col_index
        index = ri[:, None, :, None, :, None] + ci[None, :, None, :, None, :]  # (nt, tc, th, tw, rh, rw)
        return index.masked_fill_(index < 0, self.inf_index).view(-1)


def _extended_table(table: torch.Tensor) -> torch.Tensor:
    """``heads x ((2k-1)^2 + 1)``: the flat bias table and a trailing ``-inf`` entry."""
    return torch.cat([table.flatten(1), table.new_full((table.shape[0], 1), float('-inf'))], 1)


def _chunks(tiling: _Tiling, per_tile_row: int, target: int):
    rows = max(1, target // max(per_tile_row, 1))
    n = tiling.rows.tiles
    return [slice(t, min(t + rows, n)) for t in range(0, n, rows)]


class _NeighborhoodAttentionFunction(torch.autograd.Function):
    """NA2D (with relative position bias) computed over halo tiles, chunk by chunk.

    Each ``t x t`` query tile attends, by a dense matmul, to the ``(t+k-1)^2`` keys of the
    region holding all its queries' windows; keys outside a query's window get ``-inf`` (exp
    gives exactly 0, so this is the NA2D softmax). Only ``q, k, v``, the output and the
    log-sum-exp are kept for the backward pass, which recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx, q, k, v, table, kernel_size, tile, chunk_elements):
        B, nh, H, W, d = q.shape
        tiling = _Tiling(H, W, kernel_size, tile, q.device)
        rows, cols = tiling.rows, tiling.cols
        ext = _extended_table(table)
        out = q.new_empty(B * nh, rows.tiles * rows.t, cols.tiles * cols.t, d)
        lse = q.new_empty(B * nh, rows.tiles * rows.t, cols.tiles * cols.t)
        qp = _pad_queries(q, rows, cols)
        per_row = B * nh * cols.tiles * rows.t * cols.t * rows.r * cols.r
        for t in _chunks(tiling, per_row, chunk_elements):
            qt, kt, vt = _tile_operands(qp, k, v, tiling, t)
            S = torch.bmm(qt, kt.transpose(1, 2))
            S.view(B, nh, -1).add_(ext.index_select(1, tiling.bias_index(t)))
            m = S.amax(-1, keepdim=True)
            S.sub_(m).exp_()
            l = S.sum(-1, keepdim=True)
            o = torch.bmm(S, vt).div_(l)
            _untile(o, out, rows, cols, t, B * nh)
            _untile((m + l.log()), lse.unsqueeze(-1), rows, cols, t, B * nh)
        ctx.save_for_backward(q, k, v, table, out, lse)
        ctx.args = (kernel_size, tile, chunk_elements)
        return out[:, :H, :W].reshape(B, nh, H, W, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, table, out, lse = ctx.saved_tensors
        kernel_size, tile, chunk_elements = ctx.args
        B, nh, H, W, d = q.shape
        BH = B * nh
        tiling = _Tiling(H, W, kernel_size, tile, q.device)
        rows, cols = tiling.rows, tiling.cols
        ext = _extended_table(table)
        dout = grad_out.new_zeros(BH, rows.tiles * rows.t, cols.tiles * cols.t, d)
        dout[:, :H, :W] = grad_out.reshape(BH, H, W, d)
        Dsum = (dout * out).sum(-1, keepdim=True)
        qp = _pad_queries(q, rows, cols)
        dq = torch.zeros_like(qp)
        dk, dv = torch.zeros_like(k).view(BH, H, W, d), torch.zeros_like(v).view(BH, H, W, d)
        dext = torch.zeros_like(ext)
        per_row = BH * cols.tiles * rows.t * cols.t * rows.r * cols.r
        for t in _chunks(tiling, per_row, chunk_elements):
            qt, kt, vt = _tile_operands(qp, k, v, tiling, t)
            dot = _tile(dout, rows, cols, t, BH)
            S = torch.bmm(qt, kt.transpose(1, 2))
            index = tiling.bias_index(t)
            S.view(B, nh, -1).add_(ext.index_select(1, index))
            S.sub_(_tile(lse.unsqueeze(-1), rows, cols, t, BH)).exp_()  # P
            dvt = torch.bmm(S.transpose(1, 2), dot)
            dS = torch.bmm(dot, vt.transpose(1, 2))
            dS.sub_(_tile(Dsum, rows, cols, t, BH)).mul_(S)
            _untile(torch.bmm(dS, kt), dq, rows, cols, t, BH)
            dkt = torch.bmm(dS.transpose(1, 2), qt)
            _fold_regions(dkt, dk, tiling, t, BH)
            _fold_regions(dvt, dv, tiling, t, BH)
            dext.index_add_(1, index, dS.view(B, nh, -1).sum(0))
        dtable = dext[:, :-1].view_as(table)
        return dq[:, :H, :W].reshape(q.shape), dk.view(k.shape), dv.view(v.shape), dtable, None, None, None


def _pad_queries(q: torch.Tensor, rows: _Axis, cols: _Axis) -> torch.Tensor:
    B, nh, H, W, d = q.shape
    q = q.reshape(B * nh, H, W, d)
    return F.pad(q, (0, 0, 0, cols.tiles * cols.t - W, 0, rows.tiles * rows.t - H))


def _tile(x: torch.Tensor, rows: _Axis, cols: _Axis, t: slice, BH: int) -> torch.Tensor:
    """``(BH, Hpad, Wpad, c)`` -> ``(BH*nt*tc, th*tw, c)`` for tile rows ``t``."""
    c = x.shape[-1]
    x = x[:, t.start * rows.t:t.stop * rows.t].reshape(BH, -1, rows.t, cols.tiles, cols.t, c)
    return x.transpose(2, 3).reshape(-1, rows.t * cols.t, c)


def _untile(tiles: torch.Tensor, out: torch.Tensor, rows: _Axis, cols: _Axis, t: slice, BH: int):
    c = out.shape[-1]
    tiles = tiles.view(BH, -1, cols.tiles, rows.t, cols.t, c).transpose(2, 3)
    out[:, t.start * rows.t:t.stop * rows.t] = tiles.reshape(BH, -1, cols.tiles * cols.t, c)


def _tile_operands(qp, k, v, tiling: _Tiling, t: slice):
    rows, cols = tiling.rows, tiling.cols
    BH = qp.shape[0]
    qt = _tile(qp, rows, cols, t, BH)
    key_rows = rows.keys[t.start * rows.r:t.stop * rows.r]
    regions = []
    for x in (k, v):
        x = x.reshape(BH, *x.shape[-3:])
        x = x.index_select(1, key_rows).index_select(2, cols.keys)  # (BH, nt*rh, tc*rw, d)
        x = x.view(BH, -1, rows.r, cols.tiles, cols.r, x.shape[-1]).transpose(2, 3)
        regions.append(x.reshape(-1, rows.r * cols.r, x.shape[-1]))
    return qt, regions[0], regions[1]


def _fold_regions(grad: torch.Tensor, into: torch.Tensor, tiling: _Tiling, t: slice, BH: int):
    """Adds region gradients ``(BH*nt*tc, rh*rw, d)`` back onto the key map ``(BH, H, W, d)``."""
    rows, cols = tiling.rows, tiling.cols
    d = grad.shape[-1]
    grad = grad.view(BH, -1, cols.tiles, rows.r, cols.r, d).transpose(2, 3).reshape(BH, -1, cols.tiles * cols.r, d)
    per_row = grad.new_zeros(BH, grad.shape[1], into.shape[2], d).index_add_(2, cols.keys, grad)
    into.index_add_(1, rows.keys[t.start * rows.r:t.stop * rows.r], per_row)


def neighborhood_attention_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                                 kernel_size: int, tile: int = 8, chunk_elements: int = 1 << 20) -> torch.Tensor:
    """Memory-lean 2D neighborhood attention, same function as ``neighborhood_attention``.

    Args as ``neighborhood_attention`` (no attention dropout), plus ``tile``: side of the
    query tiles, and ``chunk_elements``: logits computed at once (fwd and bwd).
    Runs in float32 under autocast.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return neighborhood_attention_tiled(q.float(), k.float(), v.float(), bias_table.float(), kernel_size,
                                                tile, chunk_elements)
    return _NeighborhoodAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias_table,
                                                kernel_size, tile, chunk_elements)


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
    (checked once per process); otherwise the pure-PyTorch path: by default
    ``neighborhood_attention_tiled`` (halo tiles, memory-lean), or the gather of every
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
        attn_impl: Pure-PyTorch path, ``'fast'`` or ``'reference'`` (also an attribute).
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

    def _attend(self, q, k, v) -> torch.Tensor:
        natten = _usable_natten(self.kernel_size) if self.use_natten is not False else None
        if natten is None:
            fast = self.attn_impl == 'fast' and not (torch.jit.is_tracing() or torch.jit.is_scripting()) \
                and not (self.training and self.attn_drop.p > 0)
            if fast:
                return neighborhood_attention_tiled(q, k, v, self.relative_position_bias_table, self.kernel_size)
            return neighborhood_attention(q, k, v, self.relative_position_bias_table, self.kernel_size,
                                          self.attn_drop)
        qk, av = natten
        attn = qk(q, k, self.relative_position_bias_table, self.kernel_size, 1).softmax(dim=-1)
        return av(self.attn_drop(attn), v, self.kernel_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ks = self.kernel_size
        x = F.pad(x, (0, max(0, ks - W), 0, max(0, ks - H))).permute(0, 2, 3, 1)
        Hp, Wp = x.shape[1:3]
        qkv = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, C // self.num_heads).permute(3, 0, 4, 1, 2, 5)
        out = self._attend(qkv[0] * self.scale, qkv[1], qkv[2])
        out = self.proj_drop(self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)))
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
