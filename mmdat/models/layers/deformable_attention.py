from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.init import trunc_normal_

from ...ops import config, deformable as deformable_ops
from ...ops.deformable.reference import axis_grid as _axis_grid, grid as _grid, size_max
from .norm import LayerNorm2d

FLAVORS = ('v1', 'pp')


def _pair(x: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


class OffsetNetwork(nn.Module):
    """Predicts ``(dy, dx)`` on the key grid from one group's query channels.

    Depth-wise conv (kernel ``k``, stride ``r`` or ``(ry, rx)``) + LayerNorm + GELU + 1x1 conv
    to 2 channels.
    """

    def __init__(self, channels: int, kernel_size: int, stride: Union[int, Tuple[int, int]], flavor: str):
        super().__init__()
        stride = _pair(stride)
        padding = tuple(0 if (flavor == 'pp' and kernel_size == r) else kernel_size // 2 for r in stride)
        self.dwconv = nn.Conv2d(channels, channels, kernel_size, stride, padding, groups=channels)
        self.norm = LayerNorm2d(channels)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(channels, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the strided depth-wise conv is 2-6x faster on a channels-last map (CPU, fwd+bwd)
        return self.proj(self.act(self.norm(self.dwconv(x.contiguous(memory_format=torch.channels_last)))))


def _conv1x1(conv: nn.Conv2d, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 1x1 conv as one batched matmul that reads ``x`` in either memory format and writes
    NCHW (the head-major layout of the attention tiles) or channels-last (the layout of the
    blocks around it): no layout copy on either side, and on CPU faster than the conv."""
    B, C, H, W = x.shape
    rows, weight = x.flatten(2), conv.weight.flatten(1)  # rows: (B, C, HW), any strides
    if channels_last:
        out = torch.baddbmm(conv.bias.view(1, 1, -1), rows.transpose(1, 2), weight.t().expand(B, -1, -1))
        return out.view(B, H, W, -1).permute(0, 3, 1, 2)
    return torch.baddbmm(conv.bias.view(1, -1, 1), weight.expand(B, -1, -1), rows).view(B, -1, H, W)


class DeformableAttention(nn.Module):
    """Deformable multi-head attention (spec letter ``D``) of DAT and DAT++.

    Queries attend to ``Hk x Wk`` keys sampled from the input at reference points on a grid of
    stride ``key_stride`` shifted by learned offsets, one offset field per group of heads.

    Args:
        embed_dims: Channels ``C`` of the input and output.
        num_heads: Attention heads ``M``.
        groups: Offset groups ``G``; ``M`` and ``C`` must be multiples of it.
        key_stride: Stride ``r`` of the key grid relative to the query map, or ``(ry, rx)``.
        offset_kernel_size: Kernel of the offset network's depth-wise conv.
        offset_range_factor: Bound ``s`` on offsets in key-grid cells (v1: applied when
            ``s > 0``; ++: when ``s >= 0``; otherwise offsets are unbounded and positions are
            squashed into [-1, 1]: v1 by tanh, ++ by clamping).
        table_size: ``(Hq, Wq)`` query map size at the pretraining resolution; the relative
            position table is ``M x (2Hq-1) x (2Wq-1)``. ``None`` disables the position bias.
        flavor: ``'v1'`` (CVPR 2022 classification code) or ``'pp'`` (DAT++ and the official
            dense-prediction code): how reference points, query grid and offset range are scaled.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        attn_impl: ``'fast'`` (default): the op of :mod:`mmdat.ops.deformable` for the
            tensor's device, which never materialises the logits, the bias or the
            displacement grid; ``'reference'``: the official formulation. Both compute the
            same function; :func:`mmdat.ops.config.choose_backend` picks the path (the
            reference one while jit-tracing, so that FLOP counters see its ops, and while
            attention dropout is active in training). Also a plain attribute;
            ``mmdat.ops.attention_impl`` overrides it for every module.
    """

    def __init__(self, embed_dims: int, num_heads: int, groups: int,
                 key_stride: Union[int, Tuple[int, int]] = 1,
                 offset_kernel_size: int = 3, offset_range_factor: float = -1,
                 table_size: Optional[Tuple[int, int]] = None, flavor: str = 'pp',
                 attn_drop: float = 0., proj_drop: float = 0., attn_impl: str = 'fast'):
        super().__init__()
        if flavor not in FLAVORS:
            raise ValueError(f'flavor must be one of {FLAVORS}, got {flavor!r}')
        self.attn_impl = config.check_attn_impl(attn_impl)
        if num_heads % groups or embed_dims % num_heads:
            raise ValueError(f'deformable attention needs embed_dims ({embed_dims}) divisible by num_heads '
                             f'({num_heads}) and num_heads divisible by groups ({groups})')
        self.num_heads = num_heads
        self.groups = groups
        self.head_dims = embed_dims // num_heads
        self.scale = self.head_dims ** -0.5
        self.key_stride = key_stride
        self.offset_range_factor = offset_range_factor
        self.flavor = flavor

        self.q = nn.Conv2d(embed_dims, embed_dims, 1)
        self.k = nn.Conv2d(embed_dims, embed_dims, 1)
        self.v = nn.Conv2d(embed_dims, embed_dims, 1)
        self.proj = nn.Conv2d(embed_dims, embed_dims, 1)
        self.offset = OffsetNetwork(embed_dims // groups, offset_kernel_size, key_stride, flavor)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        if table_size is not None:
            th, tw = table_size
            self.relative_position_table = nn.Parameter(torch.zeros(num_heads, 2 * th - 1, 2 * tw - 1))
            trunc_normal_(self.relative_position_table, std=0.01)
        else:
            self.relative_position_table = None

    def sampling_positions(self, offset: torch.Tensor) -> torch.Tensor:
        """Turns raw offsets ``(B*G) x 2 x Hk x Wk`` into sample positions ``(B*G) x Hk x Wk x 2``.

        Positions are normalised ``(y, x)`` in [-1, 1] (unbounded when offsets are).
        """
        Hk, Wk = offset.shape[-2:]
        s = self.offset_range_factor
        bounded = s > 0 if self.flavor == 'v1' else s >= 0
        if bounded:
            # a key-grid cell in normalised units: 1 / n (v1) or 1 / (n - 1) (++)
            cells = (Hk, Wk) if self.flavor == 'v1' else (size_max(Hk - 1, 1), size_max(Wk - 1, 1))
            offset = offset.tanh() * s
            offset = torch.cat([offset[:, :1] / cells[0], offset[:, 1:] / cells[1]], 1)
        pos = offset.permute(0, 2, 3, 1) + _grid(Hk, Wk, True, self.flavor, offset.device, offset.dtype)
        if s >= 0:
            return pos
        return pos.tanh() if self.flavor == 'v1' else pos.clamp(-1., 1.)

    def position_bias(self, pos: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``(B*M) x HW x Ns`` bias read from the table at each query-key displacement."""
        qy, qx = (_axis_grid(n, False, self.flavor, pos.device, pos.dtype) for n in (H, W))
        return deformable_ops.reference.position_bias(pos, self.relative_position_table, qy, qx, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        G, M = self.groups, self.num_heads
        backend = self.backend(x)
        fast = backend != 'reference'
        q = _conv1x1(self.q, x, channels_last=False) if fast else self.q(x)
        offset = self.offset(q.reshape(B * G, C // G, H, W))
        if torch.is_autocast_enabled(x.device.type):  # sampling positions in float32
            offset = offset.float()
        pos = self.sampling_positions(offset)
        Hk, Wk = pos.shape[1:3]
        Ns = Hk * Wk

        sampled = torch.nn.functional.grid_sample(x.reshape(B * G, C // G, H, W), pos.flip(-1), mode='bilinear',
                                                  align_corners=True).reshape(B, C, 1, Ns)
        k = self.k(sampled).reshape(B * M, self.head_dims, Ns)
        v = self.v(sampled).reshape(B * M, self.head_dims, Ns)
        qy = _axis_grid(H, False, self.flavor, x.device, pos.dtype)
        qx = _axis_grid(W, False, self.flavor, x.device, pos.dtype)
        if fast:
            # the scale on the Ns keys, not on the H*W queries
            out = deformable_ops.deformable_attention(backend, q.reshape(B * M, self.head_dims, H, W), k * self.scale,
                                                      v, pos.reshape(B * G, Ns, 2), self.relative_position_table,
                                                      qy, qx, G)
            return self.proj_drop(_conv1x1(self.proj, out.reshape(B, C, H, W), channels_last=True))
        out = deformable_ops.reference.deformable_attention(
            q.reshape(B * M, self.head_dims, H, W), k, v, pos, self.relative_position_table, qy, qx, G,
            self.scale, self.attn_drop)
        # a 1x1 conv on a channels-last map runs several times faster on CPU than on NCHW
        return self.proj_drop(self.proj(out.reshape(B, C, H, W).contiguous(memory_format=torch.channels_last)))

    def backend(self, x: torch.Tensor) -> str:
        """``'reference'``, ``'cpu'`` or ``'cuda'``: the op that runs on ``x``."""
        return config.choose_backend('deformable', self.attn_impl, x, dropout=self.training and self.attn_drop.p > 0)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, groups={self.groups}, key_stride={self.key_stride}, '
                f'offset_range_factor={self.offset_range_factor}, flavor={self.flavor!r}, '
                f'attn_impl={self.attn_impl!r}')
