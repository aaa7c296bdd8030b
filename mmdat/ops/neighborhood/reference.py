"""Neighborhood attention in PyTorch ops: every query's ``k x k`` keys gathered."""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

#: Key and bias indices by (map size, kernel, device): built once, not per forward
_cache: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def window_start(i: int, n: int, kernel_size: int) -> int:
    """First key of query ``i``'s window along an axis of length ``n >= kernel_size``."""
    return min(max(i - kernel_size // 2, 0), n - kernel_size)


def neighborhood(height: int, width: int, kernel_size: int, device: torch.device):
    """Flat key indices (HW x k*k) of each query's neighborhood and their bias indices.

    The window of query ``i`` along an axis of length ``n`` starts at
    ``clamp(i - k // 2, 0, n - k)`` (NATTEN's NA2D with dilation 1); the bias of key ``j`` is
    indexed by ``j - i + k - 1`` along each axis.
    """
    def build():
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

    if torch.compiler.is_compiling():  # dynamo traces the construction instead
        return build()
    key = (height, width, kernel_size, device)
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                           kernel_size: int, attn_drop: Optional[nn.Module] = None) -> torch.Tensor:
    """2D neighborhood attention with relative position bias.

    Args:
        q, k, v: ``B x heads x H x W x d``; ``q`` already scaled; ``H, W >= kernel_size``.
        bias_table: ``heads x (2k-1) x (2k-1)`` relative position bias.
        kernel_size: Side ``k`` of the neighborhood.
        attn_drop: Dropout on the attention weights.
    Returns:
        ``B x heads x H x W x d``.
    """
    B, nh, H, W, d = q.shape
    if min(H, W) < kernel_size:
        raise ValueError(f'neighborhood attention needs maps of at least the kernel size {kernel_size}, got {H}x{W}')
    keys, bias_index = neighborhood(H, W, kernel_size, q.device)
    k_nb = k.reshape(B, nh, H * W, d)[:, :, keys]  # B h HW kk d
    v_nb = v.reshape(B, nh, H * W, d)[:, :, keys]
    attn = torch.einsum('bhnd,bhnkd->bhnk', q.reshape(B, nh, H * W, d), k_nb)
    attn = attn + bias_table.flatten(1)[:, bias_index]
    attn = attn.softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    return torch.einsum('bhnk,bhnkd->bhnd', attn, v_nb).reshape(B, nh, H, W, d)
