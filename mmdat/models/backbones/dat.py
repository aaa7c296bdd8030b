"""Deformable Attention Transformer backbone (DAT, CVPR 2022, and DAT++)."""
import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch.nn.init import trunc_normal_

from ...ops.config import check_attn_impl
from ..layers import ConvMlp, DeformableAttention, LayerNorm2d, Mlp, NeighborhoodAttention, WindowAttention
from ..layers.deformable_attention import FLAVORS, _pair
from ..layers.drop_path import DropPathResidual
from ..layers.residual_dwconv import LocalPerception

SPEC_LETTERS = {
    'L': 'window attention',
    'S': 'shifted-window attention',
    'N': 'neighborhood attention',
    'D': 'deformable attention',
}

_V1 = dict(
    flavor='v1',
    window_size=7,
    neighborhood_size=7,
    key_strides=(1, 1, 1, 1),
    offset_range_factors=(-1, -1, 2, 2),
    offset_kernel_sizes=(9, 7, 5, 3),
    position_tables=(False, False, True, True),
    overlapping_patches=False,
    conv_mlp=False,
    local_perception=False,
    mlp_ratio=4,
)
_PP = dict(
    flavor='pp',
    window_size=7,
    neighborhood_size=7,
    key_strides=(8, 4, 2, 1),
    offset_range_factors=(-1, -1, -1, -1),
    offset_kernel_sizes=(9, 7, 5, 3),
    position_tables=(True, True, True, True),
    overlapping_patches=True,
    conv_mlp=True,
    local_perception=True,
    mlp_ratio=4,
)

#: Presets of the published models. ``stage_specs`` gives one letter per block.
ARCH_SETTINGS: Dict[str, dict] = {
    'v1-tiny': dict(_V1, embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), groups=(0, 0, 3, 6),
                    stage_specs=('LS', 'LS', 'LD' * 3, 'LD')),
    'v1-small': dict(_V1, embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), groups=(0, 0, 3, 6),
                     stage_specs=('LS', 'LS', 'LD' * 9, 'LD')),
    'v1-base': dict(_V1, embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), groups=(0, 0, 4, 8),
                    stage_specs=('LS', 'LS', 'LD' * 9, 'LD')),
    'pp-tiny': dict(_PP, embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), groups=(1, 2, 4, 8),
                    stage_specs=('ND', 'ND' * 2, 'ND' * 9, 'DD')),
    'pp-small': dict(_PP, embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), groups=(1, 2, 3, 6),
                     stage_specs=('ND', 'ND' * 2, 'ND' * 9, 'DD')),
    'pp-base': dict(_PP, embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), groups=(2, 4, 8, 16),
                    stage_specs=('ND', 'ND' * 2, 'ND' * 9, 'DD')),
}
_PER_STAGE = ('embed_dims', 'num_heads', 'groups', 'stage_specs', 'key_strides', 'offset_range_factors',
              'offset_kernel_sizes', 'position_tables')


def resolve_arch(arch: Union[str, dict]) -> dict:
    """Full architecture settings from a preset name or a dict.

    A dict with a ``preset`` key starts from that preset and overrides its fields; a dict
    without one must give every field. A ``key_strides`` entry may be a pair ``(ry, rx)``
    (rows, columns) instead of one stride. Inconsistent settings raise ``ValueError`` here,
    at construction time.
    """
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(f'unknown DAT arch {arch!r}; presets: {sorted(ARCH_SETTINGS)}')
        settings = copy.deepcopy(ARCH_SETTINGS[arch])
    elif isinstance(arch, dict):
        arch = dict(arch)
        preset = arch.pop('preset', None)
        settings = resolve_arch(preset) if preset is not None else {}
        unknown = set(arch) - set(_V1) - set(_PER_STAGE)
        if unknown:
            raise ValueError(f'unknown DAT arch fields {sorted(unknown)}; '
                             f'known: {sorted(set(_V1) | set(_PER_STAGE))}')
        settings.update(arch)
        missing = (set(_V1) | set(_PER_STAGE)) - set(settings)
        if missing:
            raise ValueError(f'DAT arch dict lacks {sorted(missing)} (or name a `preset` to start from)')
    else:
        raise TypeError(f'arch must be a preset name or a dict, got {type(arch).__name__}')

    for name in _PER_STAGE:
        settings[name] = tuple(settings[name])
        if len(settings[name]) != 4:
            raise ValueError(f'DAT arch field {name!r} needs 4 values (one per stage), got {settings[name]}')
    if settings['flavor'] not in FLAVORS:
        raise ValueError(f'DAT flavor must be one of {FLAVORS}, got {settings["flavor"]!r}')
    settings['key_strides'] = tuple(_key_stride(r, i) for i, r in enumerate(settings['key_strides']))
    for i, (dims, heads, groups, spec) in enumerate(zip(settings['embed_dims'], settings['num_heads'],
                                                        settings['groups'], settings['stage_specs'])):
        bad = sorted(set(spec) - set(SPEC_LETTERS))
        if not spec or bad:
            raise ValueError(f'stage {i}: spec {spec!r} must be a non-empty string of {sorted(SPEC_LETTERS)}')
        if dims % heads:
            raise ValueError(f'stage {i}: embed_dims {dims} is not divisible by num_heads {heads}')
        if 'D' in spec and (groups < 1 or heads % groups):
            raise ValueError(f'stage {i}: deformable attention needs groups >= 1 dividing num_heads '
                             f'{heads}, got groups={groups}')
    return settings


def _key_stride(r, stage: int) -> Union[int, Tuple[int, int]]:
    """A stage's key stride: ``r`` or ``(ry, rx)``, positive integers (a config's list
    becomes a tuple)."""
    pair = _pair(r)
    if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in pair):
        raise ValueError(f'stage {stage}: a key stride is a positive int or a pair (ry, rx) of them, got {r!r}')
    return r if isinstance(r, int) else pair


class DATBlock(nn.Module):
    """``x + LPU(x)`` (DAT++), then pre-norm attention and MLP residuals with stochastic depth.

    Args:
        attn: The token mixer (one of the attention layers).
        embed_dims: Channels of the block.
        mlp_ratio: Hidden channels of the MLP over ``embed_dims``.
        conv_mlp: Use DAT++'s MLP with a depth-wise conv instead of the linear one.
        local_perception: Add DAT++'s local perception unit (residual 3x3 depth-wise conv).
        drop_path: Stochastic depth rate.
        drop: Dropout inside the MLP.
        with_cp: Recompute the block in the backward pass to save memory.
        attn_impl: ``'fast'`` or ``'reference'``: the path of DAT++'s depth-wise convs (the
            local perception unit's and the conv MLP's), as the attention layers' ``attn_impl``.
    """

    def __init__(self, attn: nn.Module, embed_dims: int, mlp_ratio: float = 4, conv_mlp: bool = False,
                 local_perception: bool = False, drop_path: float = 0., drop: float = 0., with_cp: bool = False,
                 attn_impl: str = 'fast'):
        super().__init__()
        self.lpu = LocalPerception(embed_dims, attn_impl) if local_perception else None
        self.norm1 = LayerNorm2d(embed_dims)
        self.attn = attn
        self.norm2 = LayerNorm2d(embed_dims)
        hidden = int(embed_dims * mlp_ratio)
        self.mlp = ConvMlp(embed_dims, hidden, drop, attn_impl) if conv_mlp else Mlp(embed_dims, hidden, drop)
        self.residual = DropPathResidual(drop_path)
        self.with_cp = with_cp

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lpu is not None:
            x = self.lpu(x)
        x = self.residual(x, self.attn(self.norm1(x)))
        return self.residual(x, self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and self.training and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class DATStage(nn.Module):
    """A downsampling layer (all stages but the first) followed by the stage's blocks."""

    def __init__(self, blocks: List[DATBlock], downsample: Optional[nn.Module] = None):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class CropToMultiple(nn.Module):
    """Drops the bottom rows and right columns beyond a multiple of ``size``.

    They are what a ``size`` x ``size`` convolution of stride ``size`` does not reach: the
    official non-overlapping stem (k4 s4) and v1 downsampling (k2 s2) floor the map size.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return x[..., :h - h % self.size, :w - w % self.size]  # a view; the whole map when it fits


@MODELS.register_module()
class DAT(BaseModule):
    """Deformable Attention Transformer: multi-scale backbone of DAT (v1) and DAT++.

    Returns the stages in ``out_indices`` (strides 4, 8, 16, 32), each through its own
    LayerNorm (``norm{i}``). Runs at any input size, with the official size arithmetic:
    overlapping patches (DAT++'s k3 s2 p1 convs) give maps of ``ceil(H / stride)``,
    non-overlapping ones (v1's k4 s4 stem and k2 s2 downsampling) ``floor(H / stride)``
    (the rows and columns beyond are dropped, so such inputs need ``H, W >= 32``).

    Args:
        arch: A preset of :data:`ARCH_SETTINGS` (``'v1-tiny'``, ``'v1-small'``, ``'v1-base'``,
            ``'pp-tiny'``, ``'pp-small'``, ``'pp-base'``) or a dict of settings (see
            :func:`resolve_arch`), e.g. ``dict(preset='v1-tiny', flavor='pp', key_strides=(1, 1, 2, 1))``.
        in_channels: Channels of the input image.
        pretrain_img_size: Image size the position tables were built for (224 for the
            published checkpoints; 384 for the 384 models).
        out_indices: Stages to return.
        drop_rate: Dropout inside the MLPs.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth rate, increasing linearly over the blocks.
        frozen_stages: Freeze the stem (0) and the first ``frozen_stages`` stages with their
            output norms; -1 freezes nothing.
        with_cp: Activation checkpointing of every block.
        check_finite: Reject inputs holding NaN / Inf with a clear error. ``None`` checks on
            CPU only: on an accelerator the check forces a host sync on every forward. Inside
            ``torch.compile`` / ``torch.export`` graphs it is an in-graph assertion.
        attn_impl: Path of every attention layer and of DAT++'s depth-wise convs (local
            perception units, conv MLPs): ``'fast'`` (default: the ops of :mod:`mmdat.ops` for
            the input's device) or ``'reference'`` (the official formulations and PyTorch's
            convolutions); both compute the same function. The layers keep it as their
            ``attn_impl`` attribute; ``mmdat.ops.attention_impl`` overrides it for a block of code.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads official DAT / DAT++
            checkpoints (classification, DAT-Detection, DAT-Segmentation) or mmdat's own.
    """

    def __init__(self,
                 arch: Union[str, dict] = 'v1-tiny',
                 in_channels: int = 3,
                 pretrain_img_size: int = 224,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 check_finite: Optional[bool] = None,
                 attn_impl: str = 'fast',
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = s = resolve_arch(arch)
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f'out_indices must be a non-empty subset of (0, 1, 2, 3), got {out_indices}')
        if frozen_stages not in range(-1, 5):
            raise ValueError(f'frozen_stages must be in [-1, 4], got {frozen_stages}')
        self.in_channels = in_channels
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.check_finite = check_finite
        self.attn_impl = check_attn_impl(attn_impl)
        dims = s['embed_dims']

        if s['overlapping_patches']:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, dims[0] // 2, 3, 2, 1), LayerNorm2d(dims[0] // 2), nn.GELU(),
                nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), LayerNorm2d(dims[0]))
        else:
            self.stem = nn.Sequential(CropToMultiple(4), nn.Conv2d(in_channels, dims[0], 4, 4), LayerNorm2d(dims[0]))

        depths = [len(spec) for spec in s['stage_specs']]
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, spec in enumerate(s['stage_specs']):
            downsample = None
            if i > 0:
                if s['overlapping_patches']:
                    layers = [nn.Conv2d(dims[i - 1], dims[i], 3, 2, 1, bias=False)]
                else:
                    layers = [CropToMultiple(2), nn.Conv2d(dims[i - 1], dims[i], 2, 2, bias=False)]
                downsample = nn.Sequential(*layers, LayerNorm2d(dims[i]))
            table = pretrain_img_size // (4 * 2 ** i) if s['position_tables'][i] else None
            blocks = [
                DATBlock(self._attention(letter, i, table, attn_drop_rate, drop_rate), dims[i], s['mlp_ratio'],
                         s['conv_mlp'], s['local_perception'], dpr[sum(depths[:i]) + d], drop_rate, with_cp,
                         self.attn_impl)
                for d, letter in enumerate(spec)
            ]
            self.stages.append(DATStage(blocks, downsample))
        for i in out_indices:
            self.add_module(f'norm{i}', LayerNorm2d(dims[i]))

        self.apply(self._init_layer)
        self._freeze_stages()

    def _attention(self, letter: str, stage: int, table: Optional[int], attn_drop: float, proj_drop: float):
        s = self.arch_settings
        dims, heads = s['embed_dims'][stage], s['num_heads'][stage]
        impl = self.attn_impl
        if letter in 'LS':
            return WindowAttention(dims, heads, s['window_size'], letter == 'S', attn_drop, proj_drop, attn_impl=impl)
        if letter == 'N':
            return NeighborhoodAttention(dims, heads, s['neighborhood_size'], attn_drop, proj_drop, attn_impl=impl)
        return DeformableAttention(
            dims, heads, s['groups'][stage], s['key_strides'][stage], s['offset_kernel_sizes'][stage],
            s['offset_range_factors'][stage], (table, table) if table else None, s['flavor'], attn_drop, proj_drop,
            attn_impl=impl)

    @staticmethod
    def _init_layer(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def init_weights(self):
        if isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained':
            from .dat_checkpoint import load_dat_checkpoint
            load_dat_checkpoint(self, self.init_cfg['checkpoint'], logger=MMLogger.get_current_instance())
            self._is_init = True
        else:
            super().init_weights()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = [self.stem] + list(self.stages[:self.frozen_stages])
        return modules + [getattr(self, f'norm{i}') for i in self.out_indices if i < self.frozen_stages]

    def _freeze_stages(self):
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        return self

    def _check_input(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'DAT expects a batch of images B x {self.in_channels} x H x W, got {shape}')
        if not x.is_floating_point():
            raise TypeError(f'DAT expects floating-point images, got {x.dtype}: normalise them first (the data '
                            'preprocessor\'s mean/std, or x.float())')
        # A non-finite input poisons every feature map, the loss and, after one step, the weights.
        check = self.check_finite
        if check or (check is None and x.device.type == 'cpu'):
            if torch.compiler.is_compiling():  # no host sync in a graph
                torch._assert_async(torch.isfinite(x).all(), 'DAT input holds NaN or Inf values')
            elif not bool(torch.isfinite(x).all()):
                nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
                raise ValueError(
                    f'DAT input of shape {tuple(x.shape)} holds {nan} NaN and {inf} Inf values; check the '
                    'images and the data preprocessor (mean/std) before the backbone')

    def forward_stages(self, x: torch.Tensor, num_stages: int = 4) -> List[torch.Tensor]:
        """Outputs of the first ``num_stages`` stages, before the output norms."""
        self._check_input(x)
        if not self.arch_settings['overlapping_patches'] and min(x.shape[-2:]) < 4 * 2 ** (num_stages - 1):
            raise ValueError(f'DAT with non-overlapping patches (the v1 stem) floors each stage\'s size: '
                             f'{num_stages} stages need an input of at least {4 * 2 ** (num_stages - 1)} pixels '
                             f'a side, got {tuple(x.shape[-2:])}')
        if x.device.type == 'cpu':
            # the stem's norms work channels-last, and so do the gradients they send to its convs:
            # from a channels-last image the stem runs 1.5-2x faster (fwd+bwd), with no layout copies
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        outs = []
        for stage in self.stages[:num_stages]:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        feats = self.forward_stages(x, max(self.out_indices) + 1)
        # Contiguous NCHW, as the official code returns: the norm leaves a channels-last view,
        # which convolutions propagate into the neck and mmcv's CPU RoIAlign misreads.
        return tuple(getattr(self, f'norm{i}')(feats[i]).contiguous() for i in self.out_indices)
