import functools
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import trunc_normal_

from mmdat.ops.config import check_attn_impl, choose_backend
from mmdat.ops.neighborhood import cpu as na_cpu, cuda as na_cuda, reference as na_reference
from mmdat.ops.neighborhood.reference import neighborhood_attention  # noqa: F401 (the formulation's old home)


class NeighborhoodAttention(nn.Module):
    """Neighborhood attention (spec letter ``N``), NATTEN's NA2D with relative position bias.

    Uses NATTEN when it is installed and agrees with the reference on a probe input (checked
    once per process); otherwise the op of the input's device (see
    :func:`mmdat.ops.config.choose_backend` and :mod:`mmdat.ops.neighborhood`), or the gather of
    every query's ``k x k`` keys with ``attn_impl='reference'``, while jit-tracing (so that FLOP
    counters see the same ops) and when attention dropout is active. Maps smaller than the
    kernel are zero-padded at the bottom and right to the kernel size and cropped after.

    Args:
        embed_dims: Channels of the input and output.
        num_heads: Attention heads.
        kernel_size: Side of the neighborhood.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        use_natten: ``None`` uses NATTEN when it is usable; ``False`` never does.
        attn_impl: ``'fast'`` or ``'reference'`` (also an attribute).
    """

    def __init__(self, embed_dims: int, num_heads: int, kernel_size: int = 7,
                 attn_drop: float = 0., proj_drop: float = 0., use_natten: Optional[bool] = None,
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
        if self.use_natten is not False and _natten_usable(self.kernel_size):
            return 'natten'
        return choose_backend('neighborhood', self.attn_impl, x, dropout=self.training and self.attn_drop.p > 0)

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
                qk, av = _usable_natten(ks)
                out = av(self.attn_drop(qk(q, k, table, ks, 1).softmax(dim=-1)), v, ks, 1)
            elif backend == 'cuda':
                out = na_cuda.neighborhood_attention(q, k, v, table, ks)
            else:
                out = na_reference.neighborhood_attention(q, k, v, table, ks, self.attn_drop)
            out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)
        out = self.proj_drop(self.proj(out))
        return out.permute(0, 3, 1, 2)[:, :, :H, :W]

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, kernel_size={self.kernel_size}, attn_impl={self.attn_impl!r}'


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


@torch.compiler.assume_constant_result
def _natten_usable(kernel_size: int) -> bool:
    """Whether NATTEN is installed and agrees (a constant to ``torch.compile``)."""
    return _usable_natten(kernel_size) is not None


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
    ours = na_reference.neighborhood_attention(q, k, v, rpb, kernel_size)
    if not torch.allclose(theirs, ours, atol=1e-5):
        warnings.warn('natten disagrees with the NA2D reference; using the pure-PyTorch neighborhood attention')
        return None
    return ops
