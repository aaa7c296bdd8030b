import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import trunc_normal_

from mmdat.ops.config import check_attn_impl, choose_backend
from mmdat.ops.neighborhood import cpu as na_cpu, cuda as na_cuda, natten as na_natten, reference as na_reference


class NeighborhoodAttention(nn.Module):
    """Neighborhood attention (spec letter ``N``), NATTEN's NA2D with relative position bias.

    The path is :func:`mmdat.ops.config.choose_backend`'s (see :mod:`mmdat.ops.neighborhood`):
    NATTEN's ops where NATTEN is installed and agrees with the reference, otherwise the op of
    the input's device; the gather of every query's ``k x k`` keys with
    ``attn_impl='reference'``, while jit-tracing (so that FLOP counters see the same ops) and
    when attention dropout is active. Maps smaller than the kernel are zero-padded at the
    bottom and right to the kernel size and cropped after.

    Args:
        embed_dims: Channels of the input and output.
        num_heads: Attention heads.
        kernel_size: Side of the neighborhood.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        use_natten: Whether the fast path may be NATTEN's ops (where installed and they
            agree); ``False`` keeps mmdat's. Also an attribute.
        attn_impl: ``'fast'`` or ``'reference'`` (also an attribute).
    """

    def __init__(self, embed_dims: int, num_heads: int, kernel_size: int = 7,
                 attn_drop: float = 0., proj_drop: float = 0., use_natten: bool = True,
                 attn_impl: str = 'fast'):
        super().__init__()
        self.attn_impl = check_attn_impl(attn_impl)
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

    def backend(self, x: torch.Tensor) -> str:
        """``'natten'``, ``'cpu'``, ``'cuda'`` or ``'reference'``: the op that runs on ``x``."""
        return choose_backend('neighborhood', self.attn_impl, x, dropout=self.training and self.attn_drop.p > 0,
                              natten_kernel_size=self.kernel_size if self.use_natten else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ks, nh, table = self.kernel_size, self.num_heads, self.relative_position_bias_table
        if H < ks or W < ks:
            x = F.pad(x, (0, max(0, ks - W), 0, max(0, ks - H)))
        x = x.permute(0, 2, 3, 1)
        Hp, Wp = x.shape[1:3]
        backend = self.backend(x)
        if backend == 'cpu':
            out = na_cpu.neighborhood_attention(x, self.qkv.weight, self.qkv.bias, table, nh, ks, self.scale)
        else:
            qkv = self.qkv(x)
            q, k, v = qkv.reshape(B, Hp, Wp, 3, nh, C // nh).permute(3, 0, 4, 1, 2, 5)
            q = q * self.scale
            if backend == 'natten':
                out = na_natten.neighborhood_attention(q, k, v, table, ks)
            elif backend == 'cuda':
                out = na_cuda.neighborhood_attention(q, k, v, table, ks)
            else:
                out = na_reference.neighborhood_attention(q, k, v, table, ks, self.attn_drop)
            out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)
        out = self.proj_drop(self.proj(out))
        return out.permute(0, 3, 1, 2)[:, :, :H, :W]

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, kernel_size={self.kernel_size}, attn_impl={self.attn_impl!r}'

