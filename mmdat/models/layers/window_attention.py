import math

import torch
import torch.nn as nn
from torch.nn.init import trunc_normal_

from mmdat.ops.config import check_attn_impl, choose_backend
from mmdat.ops.window import cpu as window_cpu, cuda as window_cuda, reference as window_reference


class WindowAttention(nn.Module):
    """Window attention (spec letter ``L``) and its shifted variant (``S``).

    Maps are padded at the bottom and right with zeros to a multiple of the window, and
    cropped after; the padded positions take part as keys, as in the official
    dense-prediction code. The shifted variant rolls by ``ceil(window_size / 2)`` (DAT's
    choice, 4 for a window of 7) and masks pairs of positions that the roll brought
    together from different regions of the padded map.

    Args:
        embed_dims: Channels of the input and output.
        num_heads: Attention heads.
        window_size: Side of the square window.
        shifted: Whether this is the shifted-window variant.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        attn_impl: ``'fast'`` (default: the op of the input's device, see
            :func:`mmdat.ops.config.choose_backend`) or ``'reference'`` (the official
            formulation, which alone has attention dropout). Also an attribute.
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size: int = 7, shifted: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0., attn_impl: str = 'fast'):
        super().__init__()
        self.attn_impl = check_attn_impl(attn_impl)
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = math.ceil(window_size / 2) if shifted else 0
        self.scale = (embed_dims // num_heads) ** -0.5
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.01)

    def backend(self, x: torch.Tensor) -> str:
        """``'reference'``, ``'cpu'`` or ``'cuda'``: the op that runs on ``x``."""
        return choose_backend('window', self.attn_impl, x, dropout=self.training and self.attn_drop.p > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x.permute(0, 2, 3, 1))
        table = self.relative_position_bias_table.t().contiguous()  # its gradient too, as the ops declare
        args = (qkv, self.qkv.bias, table, self.num_heads, self.window_size, self.shift_size, self.scale)
        backend = self.backend(x)
        if backend == 'cpu':
            out = window_cpu.window_attention(*args)
        elif backend == 'cuda':
            out = window_cuda.window_attention(*args)
        else:
            out = window_reference.window_attention(*args, self.attn_drop)
        return self.proj_drop(self.proj(out)).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, window_size={self.window_size}, shift_size={self.shift_size}, '
                f'attn_impl={self.attn_impl!r}')
