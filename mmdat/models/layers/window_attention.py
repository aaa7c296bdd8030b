import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import trunc_normal_


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
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size: int = 7, shifted: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
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

        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                            indexing='ij')).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)
        index = rel[0] * (2 * window_size - 1) + rel[1]
        self.register_buffer('relative_position_index', index, persistent=False)

    def _shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        w, s = self.window_size, self.shift_size
        labels = torch.zeros(height, width, device=device)
        slices = (slice(0, -w), slice(-w, -s), slice(-s, None))
        for i, hs in enumerate(slices):
            for j, ws in enumerate(slices):
                labels[hs, ws] = 3 * i + j
        labels = labels.view(height // w, w, width // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        differs = labels[:, None, :] != labels[:, :, None]
        return differs.float() * -100.0  # nW x N x N

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        w, s = self.window_size, self.shift_size
        x = F.pad(x, (0, (-W) % w, 0, (-H) % w))
        Hp, Wp = x.shape[-2:]
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(2, 3))

        nh, nw, N = Hp // w, Wp // w, w * w
        windows = x.view(B, C, nh, w, nw, w).permute(0, 2, 4, 3, 5, 1).reshape(B * nh * nw, N, C)
        qkv = self.qkv(windows).reshape(-1, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1)
        if s:
            mask = self._shift_mask(Hp, Wp, x.device).to(attn.dtype)
            attn = (attn.view(B, nh * nw, self.num_heads, N, N) + mask[None, :, None]).view(-1, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(-1, N, C)
        out = self.proj_drop(self.proj(out))
        out = out.view(B, nh, nw, w, w, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, Hp, Wp)

        if s:
            out = torch.roll(out, shifts=(s, s), dims=(2, 3))
        return out[:, :, :H, :W]

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, window_size={self.window_size}, shift_size={self.shift_size}'
