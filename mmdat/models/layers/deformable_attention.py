import contextlib
from typing import Iterator, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import trunc_normal_

from . import deformable_attention_ops as ops
from .norm import LayerNorm2d

FLAVORS = ('v1', 'pp')
ATTN_IMPLS = ('fast', 'reference')
_impl_override: Optional[str] = None


@contextlib.contextmanager
def deformable_attention_impl(impl: str) -> Iterator[None]:
    """Within the block, every ``DeformableAttention`` uses ``impl`` whatever its
    ``attn_impl``: ``'fast'`` (tiled, see ``deformable_attention_ops``) or ``'reference'``
    (the official formulation, which materialises the logits and the bias)."""
    global _impl_override
    if impl not in ATTN_IMPLS:
        raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {impl!r}')
    previous, _impl_override = _impl_override, impl
    try:
        yield
    finally:
        _impl_override = previous


def _pair(x: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def _axis_grid(n: int, centered: bool, flavor: str, device, dtype) -> torch.Tensor:
    """Normalised coordinates in [-1, 1] of ``n`` positions along one axis.

    ``centered`` positions sit at pixel centres ``i + 0.5`` (reference points), otherwise at
    ``i`` (query grid). v1 divides by ``n`` (query grid: also centres); ++ by ``n - 1``. An axis
    of length 1, where ++ would divide by zero, maps to 0.
    """
    i = torch.arange(n, device=device, dtype=dtype)
    if flavor == 'v1':
        return (i + 0.5) / n * 2 - 1
    if n == 1:
        return torch.zeros(1, device=device, dtype=dtype)
    return ((i + 0.5) if centered else i) / (n - 1) * 2 - 1


def _grid(h: int, w: int, centered: bool, flavor: str, device, dtype) -> torch.Tensor:
    """``h x w x 2`` grid of normalised ``(y, x)``."""
    ys = _axis_grid(h, centered, flavor, device, dtype)
    xs = _axis_grid(w, centered, flavor, device, dtype)
    return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)


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
        attn_impl: ``'fast'`` (default): the tiled computation of
            ``deformable_attention_ops``, which never materialises the logits, the bias or
            the displacement grid; ``'reference'``: the official formulation. Both compute the
            same function. The fast path is used unless the module is traced (so that jit-based
            FLOP counters see the reference ops) or attention dropout is active in training
            (the reference path then runs). Also a plain attribute; the context manager
            ``deformable_attention_impl`` overrides it for every module.
    """

    def __init__(self, embed_dims: int, num_heads: int, groups: int,
                 key_stride: Union[int, Tuple[int, int]] = 1,
                 offset_kernel_size: int = 3, offset_range_factor: float = -1,
                 table_size: Optional[Tuple[int, int]] = None, flavor: str = 'pp',
                 attn_drop: float = 0., proj_drop: float = 0., attn_impl: str = 'fast'):
        super().__init__()
        if flavor not in FLAVORS:
            raise ValueError(f'flavor must be one of {FLAVORS}, got {flavor!r}')
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
        self.attn_impl = attn_impl
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
            if self.flavor == 'v1':
                cells = (1.0 / Hk, 1.0 / Wk)
            else:
                cells = (1.0 / max(Hk - 1, 1), 1.0 / max(Wk - 1, 1))
            offset = offset.tanh() * offset.new_tensor(cells).view(1, 2, 1, 1) * s
        pos = offset.permute(0, 2, 3, 1) + _grid(Hk, Wk, True, self.flavor, offset.device, offset.dtype)
        if s >= 0:
            return pos
        return pos.tanh() if self.flavor == 'v1' else pos.clamp(-1., 1.)

    def position_bias(self, pos: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``(B*M) x HW x Ns`` bias read from the table at each query-key displacement."""
        BG, Hk, Wk, _ = pos.shape
        q_grid = _grid(H, W, False, self.flavor, pos.device, pos.dtype).reshape(1, H * W, 1, 2)
        displacement = (q_grid - pos.reshape(BG, 1, Hk * Wk, 2)) * 0.5
        table = self.relative_position_table
        table = table.reshape(1, self.groups, -1, *table.shape[-2:]).expand(BG // self.groups, -1, -1, -1, -1)
        bias = F.grid_sample(table.reshape(BG, -1, *table.shape[-2:]).to(pos.dtype), displacement.flip(-1),
                             mode='bilinear', align_corners=True)  # (B*G) x M/G x HW x Ns
        return bias.reshape(-1, H * W, Hk * Wk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        G, M = self.groups, self.num_heads
        fast = self._use_fast_path()
        q = _conv1x1(self.q, x, channels_last=False) if fast else self.q(x)
        offset = self.offset(q.reshape(B * G, C // G, H, W))
        if torch.is_autocast_enabled(x.device.type):  # sampling positions in float32
            offset = offset.float()
        pos = self.sampling_positions(offset)
        Hk, Wk = pos.shape[1:3]
        Ns = Hk * Wk

        sampled = F.grid_sample(x.reshape(B * G, C // G, H, W), pos.flip(-1), mode='bilinear',
                                align_corners=True).reshape(B, C, 1, Ns)
        k = self.k(sampled).reshape(B * M, self.head_dims, Ns)
        v = self.v(sampled).reshape(B * M, self.head_dims, Ns)
        if fast:
            qy = _axis_grid(H, False, self.flavor, x.device, pos.dtype)
            qx = _axis_grid(W, False, self.flavor, x.device, pos.dtype)
            # the scale on the Ns keys, not on the H*W queries
            out = ops.deformable_attention(q.reshape(B * M, self.head_dims, H, W), k * self.scale, v,
                                           pos.reshape(B * G, Ns, 2), self.relative_position_table, qy, qx, G)
            return self.proj_drop(_conv1x1(self.proj, out.reshape(B, C, H, W), channels_last=True))
        q = q.reshape(B * M, self.head_dims, H * W)
        attn = torch.einsum('bcm,bcn->bmn', q, k) * self.scale
        if self.relative_position_table is not None:
            attn = attn + self.position_bias(pos, H, W)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = torch.einsum('bmn,bcn->bcm', attn, v).reshape(B, C, H, W)
        # a 1x1 conv on a channels-last map runs several times faster on CPU than on NCHW
        return self.proj_drop(self.proj(out.contiguous(memory_format=torch.channels_last)))

    def _use_fast_path(self) -> bool:
        impl = _impl_override or self.attn_impl
        if impl != 'fast' or torch.jit.is_tracing() or torch.jit.is_scripting():
            return False
        return not (self.training and self.attn_drop.p > 0)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, groups={self.groups}, key_stride={self.key_stride}, '
                f'offset_range_factor={self.offset_range_factor}, flavor={self.flavor!r}, '
                f'attn_impl={self.attn_impl!r}')
