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
    (checked once per process); otherwise the pure-PyTorch path. Maps smaller than the
    kernel are zero-padded at the bottom and right to the kernel size and cropped after.

    Args:
        embed_dims: Channels of the input and output.
        num_heads: Attention heads.
        kernel_size: Side of the neighborhood.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        use_natten: ``None`` uses NATTEN when it is usable; ``False`` never does.
    """

    def __init__(self, embed_dims: int, num_heads: int, kernel_size: int = 7,
                 attn_drop: float = 0., proj_drop: float = 0., use_natten: Optional[bool] = None):
        super().__init__()
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
        return f'num_heads={self.num_heads}, kernel_size={self.kernel_size}'


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
