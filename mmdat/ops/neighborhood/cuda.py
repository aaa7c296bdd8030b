"""Neighborhood attention (NA2D, dilation 1) with relative position bias on CUDA, by FlexAttention.

NATTEN >= 0.20 has no relative position bias, so the neighborhoods are a ``mask_mod`` and
the bias a ``score_mod`` (indices clamped: the ``score_mod`` also sees masked pairs).

Tokens are reordered into tiles of ``TILE = (8, 16)`` positions, one FlexAttention block of
128 tokens each, so that a block of queries needs the few key blocks around it (about 6 of
them for a kernel of 7) instead of whole rows of the map: the block mask lists, per query
tile, the key tiles its neighborhoods touch. It is built from the map size alone and cached
per ``(H, W, kernel_size, device)``; the positions of the padded tiles are never keys and
the outputs there are dropped.

Where FlexAttention cannot be compiled (an Inductor or Triton error on the user's GPU), the
path warns once and runs the gather formulation of :mod:`.reference` instead
(:func:`mmdat.ops.flex.with_fallback`).

Imports torch only.
"""
import functools
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..flex import compute_dtype, flex_attention_call, with_fallback
from . import reference

#: Rows x columns of positions in one FlexAttention block (128 tokens).
TILE = (8, 16)
BLOCK = TILE[0] * TILE[1]


def _window_starts(n: int, kernel_size: int, device) -> torch.Tensor:
    """First key of each position's window along an axis of ``n``: ``clamp(i - k // 2, 0, n - k)``."""
    return (torch.arange(n, device=device) - kernel_size // 2).clamp(0, n - kernel_size)


def _key_tiles(n: int, tile: int, kernel_size: int) -> List[Tuple[int, int]]:
    """First and last key tile the windows of each query tile reach along an axis of ``n``
    (Python ints: no tensor, no host sync, also while Dynamo traces)."""
    def start(i):
        return min(max(i - kernel_size // 2, 0), n - kernel_size)

    return [(start(i) // tile, (start(min(i + tile, n) - 1) + kernel_size - 1) // tile) for i in range(0, n, tile)]


class TiledNeighborhood:
    """The tiled token order of an ``H x W`` map and NA2D's block mask on it.

    Attributes:
        rows, cols: ``(L,)`` int32 map row and column of every token of the tiled order
            (``L`` = padded ``H x W``; padded positions have ``row >= H`` or ``col >= W``).
        row_start, col_start: ``(L,)`` int32 first key row / column of each token's window.
        block_mask: The FlexAttention ``BlockMask`` (partial blocks only; ``mask_mod`` inside).
    """

    def __init__(self, H: int, W: int, kernel_size: int, device: torch.device):
        if H < kernel_size or W < kernel_size:
            raise ValueError(f'neighborhood attention needs a map of at least the kernel size {kernel_size}, '
                             f'got {H} x {W} (pad it first)')
        th, tw = TILE
        self.H, self.W, self.kernel_size = H, W, kernel_size
        self.tiles = (-(-H // th), -(-W // tw))
        nty, ntx = self.tiles
        token = torch.arange(nty * ntx * BLOCK, device=device)
        tile, within = token // BLOCK, token % BLOCK
        rows = (tile // ntx) * th + within // tw
        cols = (tile % ntx) * tw + within % tw
        self.rows, self.cols = rows.to(torch.int32), cols.to(torch.int32)
        self.row_start = _window_starts(H, kernel_size, device)[rows.clamp(max=H - 1)].to(torch.int32)
        self.col_start = _window_starts(W, kernel_size, device)[cols.clamp(max=W - 1)].to(torch.int32)
        self.block_mask = self._block_mask(device)

    def mask_mod(self) -> Callable:
        rows, cols, row_start, col_start, k = self.rows, self.cols, self.row_start, self.col_start, self.kernel_size

        def in_window(b, h, q_idx, kv_idx):
            dy = rows[kv_idx] - row_start[q_idx]
            dx = cols[kv_idx] - col_start[q_idx]
            return (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)

        return in_window

    def _block_mask(self, device) -> BlockMask:
        (th, tw), (nty, ntx), k = TILE, self.tiles, self.kernel_size
        blocks = [[y * ntx + x for y in range(y0, y1 + 1) for x in range(x0, x1 + 1)]
                  for y0, y1 in _key_tiles(self.H, th, k) for x0, x1 in _key_tiles(self.W, tw, k)]
        n = nty * ntx
        kv_num_blocks = torch.tensor([len(b) for b in blocks], dtype=torch.int32, device=device)
        # one row per query tile, as wide as there are key tiles (BlockMask transposes it
        # for the backward assuming that width): the listed tiles first, then zeros
        kv_indices = torch.tensor([b + [0] * (n - len(b)) for b in blocks], dtype=torch.int32, device=device)
        L = n * BLOCK
        return BlockMask.from_kv_blocks(kv_num_blocks.view(1, 1, n), kv_indices.view(1, 1, n, n),
                                        BLOCK_SIZE=BLOCK, mask_mod=self.mask_mod(), seq_lengths=(L, L))

    def to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``B x heads x H x W x d`` -> ``B x heads x L x d`` in the tiled order (zero padding)."""
        B, nh, H, W, d = x.shape
        (th, tw), (nty, ntx) = TILE, self.tiles
        x = F.pad(x, (0, 0, 0, ntx * tw - W, 0, nty * th - H))
        return x.reshape(B, nh, nty, th, ntx, tw, d).transpose(3, 4).reshape(B, nh, -1, d)

    def from_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_tiles`, padding dropped."""
        B, nh, _, d = x.shape
        (th, tw), (nty, ntx) = TILE, self.tiles
        x = x.reshape(B, nh, nty, ntx, th, tw, d).transpose(3, 4).reshape(B, nh, nty * th, ntx * tw, d)
        return x[:, :, :self.H, :self.W]


@functools.lru_cache(maxsize=32)
def _cached_tiled_neighborhood(H: int, W: int, kernel_size: int, device: torch.device) -> TiledNeighborhood:
    return TiledNeighborhood(H, W, kernel_size, device)


def tiled_neighborhood(H: int, W: int, kernel_size: int, device: torch.device) -> TiledNeighborhood:
    """The :class:`TiledNeighborhood` of an ``H x W`` map, built once per size and device
    (built in the graph while Dynamo traces: its tensors are then constants)."""
    if torch.compiler.is_compiling():
        return TiledNeighborhood(H, W, kernel_size, device)
    return _cached_tiled_neighborhood(H, W, kernel_size, device)


def _relative_bias(score, b, h, q_idx, kv_idx, table, rows, cols):
    # table: (heads, 2k-1, 2k-1); indices clamped, as masked pairs reach here too. No Python
    # numbers but through tensor sizes (a compiled kernel is reused across map sizes).
    last = table.size(1) - 1
    dy = (rows[kv_idx] - rows[q_idx] + last // 2).clamp(0, last)
    dx = (cols[kv_idx] - cols[q_idx] + last // 2).clamp(0, last)
    return score + table[h, dy, dx].to(score.dtype)


def _flex_entry(q, k, v, score_mod, block_mask, scale):
    # compiled on CUDA (see mmdat.ops.flex): this kind's own compile cache
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def neighborhood_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                                kernel_size: int) -> torch.Tensor:
    """NA2D with relative position bias, the function of
    :func:`.reference.neighborhood_attention` (no dropout).

    Args:
        q, k, v: ``B x heads x H x W x d``; ``q`` already scaled; ``H, W >= kernel_size``.
        bias_table: ``heads x (2k-1) x (2k-1)`` relative position bias.
        kernel_size: Side ``k`` of the neighborhood.
    Returns:
        ``B x heads x H x W x d``; under autocast in its dtype (the bias and the softmax
        statistics in float32), else in ``q``'s.
    """
    B, nh, H, W, d = q.shape
    if k.shape != q.shape or v.shape[:4] != q.shape[:4] or bias_table.shape != (nh, 2 * kernel_size - 1,
                                                                                 2 * kernel_size - 1):
        raise ValueError(f'inconsistent shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, '
                         f'bias_table {tuple(bias_table.shape)}, kernel_size {kernel_size}')
    tn = tiled_neighborhood(H, W, kernel_size, q.device)
    dtype = compute_dtype(q)
    table = bias_table if bias_table.dtype in (torch.float32, torch.float64) else bias_table.float()
    with torch.autocast(q.device.type, enabled=False):
        qt, kt, vt = (tn.to_tiles(t.to(dtype)) for t in (q, k, v))
        out = flex_attention_call(_flex_entry, qt, kt, vt, _relative_bias, (table, tn.rows, tn.cols), tn.block_mask)
    return tn.from_tiles(out)


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                           kernel_size: int) -> torch.Tensor:
    """The CUDA path of the neighborhood attention ops: :func:`neighborhood_attention_flex`, or
    the gather formulation (:func:`.reference.neighborhood_attention`) once compiling
    FlexAttention has failed in this process (warned once; :func:`mmdat.ops.flex.with_fallback`)."""
    return with_fallback('neighborhood', neighborhood_attention_flex, reference.neighborhood_attention,
                         q, k, v, bias_table, kernel_size)
