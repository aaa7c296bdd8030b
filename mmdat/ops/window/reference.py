"""Window attention in PyTorch ops: the official (Swin / DAT v1) formulation.

The map is padded at the bottom and right to whole windows, where the padded positions are
keys whose projection is the qkv bias (the projection of zeros, as in the official
dense-prediction code, which pads the map before its qkv Linear); the shifted variant rolls
the padded map and masks pairs of positions that the roll brought together from different
regions of it.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

#: Shift masks and relative-position indices by (sizes, device): built once, not per forward
_cache: Dict[Tuple, torch.Tensor] = {}


def _cached(key: Tuple, build):
    if torch.compiler.is_compiling():  # dynamo traces the construction instead (constant-folded)
        return build()
    value = _cache.get(key)
    if value is None:
        value = _cache[key] = build()
    return value


def relative_position_index(window_size: int, device: torch.device) -> torch.Tensor:
    """``(N * N,)`` index into a head's ``(2w-1)^2`` table of each (query, key) slot pair."""
    def build():
        coords = torch.stack(torch.meshgrid(torch.arange(window_size, device=device),
                                            torch.arange(window_size, device=device), indexing='ij')).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)
        return (rel[0] * (2 * window_size - 1) + rel[1]).flatten()

    return _cached(('index', window_size, device), build)


def shift_mask(height: int, width: int, window_size: int, shift_size: int, device: torch.device) -> torch.Tensor:
    """``(nW, N, N)``: ``-100`` where the rolled ``height x width`` (padded) map's window pairs
    positions from different regions, else 0 (float32)."""
    w, s = window_size, shift_size

    def build():
        labels = torch.zeros(height, width, device=device)
        slices = (slice(0, -w), slice(-w, -s), slice(-s, None))
        for i, hs in enumerate(slices):
            for j, ws in enumerate(slices):
                labels[hs, ws] = 3 * i + j
        labels = labels.view(height // w, w, width // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        return (labels[:, None, :] != labels[:, :, None]).float() * -100.0

    return _cached(('mask', height, width, w, s, device), build)


def window_attention(qkv: torch.Tensor, qkv_bias: torch.Tensor, table: torch.Tensor, num_heads: int,
                     window_size: int, shift_size: int, scale: float,
                     attn_drop: Optional[nn.Module] = None) -> torch.Tensor:
    """(Shifted-)window attention between the qkv projection and the output projection.

    Args:
        qkv: ``B x H x W x (3 * heads * d)``: the qkv projection of the unpadded map.
        qkv_bias: ``3 * heads * d``: the projection's bias, i.e. q, k, v at padded positions.
        table: ``heads x (2w-1)^2`` relative position bias.
        num_heads: Attention heads.
        window_size: Side ``w`` of the square windows.
        shift_size: Roll of the shifted variant (0: plain windows).
        scale: Factor of the ``q . k`` products.
        attn_drop: Dropout on the attention weights.
    Returns:
        ``B x H x W x (heads * d)``.
    """
    B, H, W, C3 = qkv.shape
    w, s, nh = window_size, shift_size, num_heads
    pad_h, pad_w = (-H) % w, (-W) % w
    if pad_w:
        qkv = torch.cat([qkv, qkv_bias.expand(B, H, pad_w, C3)], 2)
    if pad_h:
        qkv = torch.cat([qkv, qkv_bias.expand(B, pad_h, W + pad_w, C3)], 1)
    Hp, Wp = H + pad_h, W + pad_w
    if s:
        qkv = torch.roll(qkv, shifts=(-s, -s), dims=(1, 2))
    rows, cols, N, d = Hp // w, Wp // w, w * w, C3 // (3 * nh)
    windows = qkv.view(B, rows, w, cols, w, 3, nh, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = windows.reshape(3, B * rows * cols, nh, N, d).unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn + table[:, relative_position_index(w, qkv.device)].view(nh, N, N)
    if s:
        mask = shift_mask(Hp, Wp, w, s, qkv.device).to(attn.dtype)
        attn = (attn.view(B, rows * cols, nh, N, N) + mask[None, :, None]).view(-1, nh, N, N)
    attn = attn.softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    out = (attn @ v).view(B, rows, cols, nh, w, w, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, nh * d)
    if s:
        out = torch.roll(out, shifts=(s, s), dims=(1, 2))
    return out[:, :H, :W]
