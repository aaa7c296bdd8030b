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
    """Halo tiles of an ``H x W`` map for NA2D with kernel ``k`` and the index tensors that
    move tiles and regions in and out of ``(BH, rows * W, c)`` views with one op each."""

    def __init__(self, H: int, W: int, kernel_size: int, tile: int, device):
        self.H, self.W, self.k = H, W, kernel_size
        self.rows = rows = _Axis(H, kernel_size, tile, device)
        self.cols = cols = _Axis(W, kernel_size, tile, device)
        th, tw, rh, rw, tc = rows.t, cols.t, rows.r, cols.r, cols.tiles
        ar = functools.partial(torch.arange, device=device)
        # queries of one tile row (th x padded W) -> (tc, th*tw); regions (rh x W) -> (tc, rh*rw)
        self.query_index = (ar(th)[None, :, None] * cols.padded + ar(tc)[:, None, None] * tw
                            + ar(tw)[None, None, :]).reshape(-1)
        self.region_index = (ar(rh)[None, :, None] * W + cols.region[:, None, None]
                             + ar(rw)[None, None, :]).reshape(-1)
        # tile rows with the same row pattern (all interior ones) share their bias
        patterns = {}
        self.pattern = [patterns.setdefault(tuple(rows.rel[t].flatten().tolist()), len(patterns))
                        for t in range(rows.tiles)]
        self.pattern_rows = [self.pattern.index(p) for p in range(len(patterns))]

    def bias_index(self, t: int) -> torch.Tensor:
        """Flat indices ``(tc*th*tw*rh*rw,)`` into the extended table for tile row ``t``."""
        span = 2 * self.k - 1
        ri, ci = self.rows.rel[t], self.cols.rel
        index = ri[None, :, None, :, None] * span + ci[:, None, :, None, :]  # (tc, th, tw, rh, rw)
        invalid = (ri < 0)[None, :, None, :, None] | (ci < 0)[:, None, :, None, :]
        return index.masked_fill_(invalid, span * span).view(-1)


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
        tl = _Tiling(H, W, kernel_size, tile, q.device)
        rows, cols = tl.rows, tl.cols
        biases, masks = _pattern_biases(table, tl)
        qp = _padded(q.reshape(BH, H, W, d), rows, cols)
        out = q.new_empty(BH, rows.padded, cols.padded, d)
        lse = q.new_empty(BH, rows.padded, cols.padded, 1)
        qt, kr, vr, o, S = _tile_buffers(q, BH, tl, d)
        for t in range(rows.tiles):
            _gather_tile_row(qp, t, tl, qt, kr, vr, k, v)
            torch.bmm(qt, kr.transpose(1, 2), out=S)
            S.view(B, nh, -1).add_(biases[tl.pattern[t]])
            m = S.amax(-1, keepdim=True)
            S.sub_(m).clamp_min_(_EXP_FLOOR).exp_()
            S.view(B, nh, -1).mul_(masks[tl.pattern[t]])
            l = S.sum(-1, keepdim=True)
            torch.bmm(S, vr, out=o)
            _scatter_tile_row(o.div_(l), out, t, tl)
            _scatter_tile_row(m.add_(l.log_()), lse, t, tl)
        ctx.save_for_backward(q, k, v, table, out, lse)
        ctx.args = (kernel_size, tile)
        return out[:, :H, :W].reshape(B, nh, H, W, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, table, out, lse = ctx.saved_tensors
        kernel_size, tile = ctx.args
        B, nh, H, W, d = q.shape
        BH = B * nh
        tl = _Tiling(H, W, kernel_size, tile, q.device)
        rows, cols = tl.rows, tl.cols
        biases, masks = _pattern_biases(table, tl)
        dbiases = [torch.zeros_like(b) for b in biases]
        qp = _padded(q.reshape(BH, H, W, d), rows, cols)
        dout = _padded(grad_out.reshape(BH, H, W, d), rows, cols)
        Dsum = (dout * out).sum(-1, keepdim=True)
        dq = torch.empty_like(qp)
        dk, dv = q.new_zeros(BH, H * W, d), q.new_zeros(BH, H * W, d)
        qt, kr, vr, o, S = _tile_buffers(q, BH, tl, d)
        dot, dS, dkr = torch.empty_like(qt), torch.empty_like(S), torch.empty_like(kr)
        lt, Dt = q.new_empty(BH * cols.tiles, rows.t * cols.t, 1), q.new_empty(BH * cols.tiles, rows.t * cols.t, 1)
        for t in range(rows.tiles):
            _gather_tile_row(qp, t, tl, qt, kr, vr, k, v)
            for src, dst in ((dout, dot), (lse, lt), (Dsum, Dt)):
                _gather_tile_row(src, t, tl, dst)
            torch.bmm(qt, kr.transpose(1, 2), out=S)
            S.view(B, nh, -1).add_(biases[tl.pattern[t]])
            S.sub_(lt).clamp_min_(_EXP_FLOOR).exp_()
            S.view(B, nh, -1).mul_(masks[tl.pattern[t]])  # P
            torch.bmm(dot, vr.transpose(1, 2), out=dS)
            dS.sub_(Dt).mul_(S)
            dbiases[tl.pattern[t]] += dS.view(B, nh, -1).sum(0) if B > 1 else dS.view(nh, -1)
            region = slice(rows.region[t] * W, (rows.region[t] + rows.r) * W)
            dv[:, region].index_add_(1, tl.region_index, torch.bmm(S.transpose(1, 2), dot, out=dkr).view(BH, -1, d))
            dk[:, region].index_add_(1, tl.region_index, torch.bmm(dS.transpose(1, 2), qt, out=dkr).view(BH, -1, d))
            _scatter_tile_row(torch.bmm(dS, kr, out=o), dq, t, tl)
        dext = torch.zeros_like(_extended_table(table))
        for t, db in zip(tl.pattern_rows, dbiases):
            index = tl.bias_index(t)
            dext.scatter_add_(1, index.view(1, -1).expand(nh, -1), db.view(nh, -1))
        dtable = dext[:, :-1].view_as(table)
        return dq[:, :H, :W].reshape(q.shape), dk.view(k.shape), dv.view(v.shape), dtable, None, None


def _pattern_biases(table: torch.Tensor, tl: _Tiling):
    """Per distinct row pattern: the bias, ``-inf`` outside the windows, ``(heads, L)``, and
    the windows as 0 / 1 ``(L,)``, ``L = tc*th*tw*rh*rw``."""
    ext = _extended_table(table)
    indices = [tl.bias_index(t) for t in tl.pattern_rows]
    inf_index = ext.shape[1] - 1
    return [ext.index_select(1, i) for i in indices], [(i != inf_index).to(table.dtype) for i in indices]


def _padded(x: torch.Tensor, rows: _Axis, cols: _Axis) -> torch.Tensor:
    """``(BH, H, W, c)`` zero-padded at the bottom and right to whole tiles."""
    return F.pad(x, (0, 0, 0, cols.padded - x.shape[2], 0, rows.padded - x.shape[1]))


def _tile_buffers(q: torch.Tensor, BH: int, tl: _Tiling, d: int):
    rows, cols = tl.rows, tl.cols
    n, queries, keys = BH * cols.tiles, rows.t * cols.t, rows.r * cols.r
    return (q.new_empty(n, queries, d), q.new_empty(n, keys, d), q.new_empty(n, keys, d),
            q.new_empty(n, queries, d), q.new_empty(n, queries, keys))


def _gather_tile_row(x, t: int, tl: _Tiling, x_tiles, k_regions=None, v_regions=None, k=None, v=None):
    """Queries of tile row ``t`` (padded ``(BH, Hp, Wp, c)``) -> ``(BH*tc, th*tw, c)``; and the
    key / value regions ``(BH*tc, rh*rw, d)`` of ``k`` and ``v`` ``(..., H, W, d)``."""
    BH, c = x.shape[0], x.shape[-1]
    th = tl.rows.t
    rows = x[:, t * th:(t + 1) * th].reshape(BH, -1, c)
    torch.index_select(rows, 1, tl.query_index, out=x_tiles.view(BH, -1, c))
    if k_regions is not None:
        r0, rh = int(tl.rows.region[t]), tl.rows.r
        for src, dst in ((k, k_regions), (v, v_regions)):
            src = src.reshape(BH, -1, src.shape[-1])[:, r0 * tl.W:(r0 + rh) * tl.W]
            torch.index_select(src, 1, tl.region_index, out=dst.view(BH, -1, dst.shape[-1]))


def _scatter_tile_row(tiles: torch.Tensor, into: torch.Tensor, t: int, tl: _Tiling):
    """Inverse of the query gather: ``(BH*tc, th*tw, c)`` into tile row ``t`` of ``into``."""
    BH, c = into.shape[0], into.shape[-1]
    th = tl.rows.t
    into[:, t * th:(t + 1) * th].reshape(BH, -1, c).index_copy_(1, tl.query_index, tiles.view(BH, -1, c))


def neighborhood_attention_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                                 kernel_size: int, tile: int = 8) -> torch.Tensor:
    """Memory-lean 2D neighborhood attention, same function as ``neighborhood_attention``.

    Args as ``neighborhood_attention`` (no attention dropout), plus ``tile``: side of the
    query tiles. Runs in float32 under autocast.
    """
    device_type = q.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast or {t.dtype for t in (q, k, v, bias_table)} not in ({torch.float32}, {torch.float64}):
        # low precision or mixed dtypes: compute in float32
        with torch.autocast(device_type, enabled=False):
            out = neighborhood_attention_tiled(q.float(), k.float(), v.float(), bias_table.float(), kernel_size, tile)
        return out if autocast else out.to(q.dtype)
    return _NeighborhoodAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias_table,
                                                kernel_size, tile)


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
