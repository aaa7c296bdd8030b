"""Official DAT / DAT++ checkpoints and configs -> mmdat's layout, in one place.

Official layouts (LeapLabTHU/DAT, DAT-Detection, DAT-Segmentation) name modules
``patch_proj``, ``down_projs``, ``stages.i.{attns,mlps,layer_norms,local_perception_units}``,
``norms`` and ``cls_norm`` / ``cls_head``; mmdat names them ``stem``,
``stages.i.downsample``, ``stages.i.blocks.d.{attn,mlp,norm1,norm2,lpu}``, ``norm{i}``.
"""
import math
import os
import re
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# Buffers of the official modules that mmdat recomputes.
_DROPPED = re.compile(r'\.(relative_position_index|attn_mask)$')

_RULES = [
    (r'^norms\.(\d+)\.norm\.(weight|bias)$', r'norm\1.\2'),
    (r'^cls_norm\.norm\.(weight|bias)$', r'norm3.\1'),
    (r'^cls_head\.(weight|bias)$', r'head.fc.\1'),
    (r'^stages\.(\d+)\.local_perception_units\.(\d+)\.', r'stages.\1.blocks.\2.lpu.'),
    (r'^stages\.(\d+)\.mlps\.(\d+)\.(?:chunk\.)?linear1(?:\.0)?\.', r'stages.\1.blocks.\2.mlp.fc1.'),
    (r'^stages\.(\d+)\.mlps\.(\d+)\.(?:chunk\.)?linear2(?:\.0)?\.', r'stages.\1.blocks.\2.mlp.fc2.'),
    (r'^stages\.(\d+)\.mlps\.(\d+)\.dwc\.', r'stages.\1.blocks.\2.mlp.dwconv.'),
    (r'^stages\.(\d+)\.attns\.(\d+)\.(?:proj_qkv|qkv)\.', r'stages.\1.blocks.\2.attn.qkv.'),
    (r'^stages\.(\d+)\.attns\.(\d+)\.(?:proj_out|proj)\.', r'stages.\1.blocks.\2.attn.proj.'),
    (r'^stages\.(\d+)\.attns\.(\d+)\.proj_([qkv])\.', r'stages.\1.blocks.\2.attn.\3.'),
    (r'^stages\.(\d+)\.attns\.(\d+)\.(?:relative_position_bias_table|rpb)$',
     r'stages.\1.blocks.\2.attn.relative_position_bias_table'),
    (r'^stages\.(\d+)\.attns\.(\d+)\.rpe_table$', r'stages.\1.blocks.\2.attn.relative_position_table'),
    (r'^stages\.(\d+)\.attns\.(\d+)\.conv_offset\.0\.', r'stages.\1.blocks.\2.attn.offset.dwconv.'),
    (r'^stages\.(\d+)\.attns\.(\d+)\.conv_offset\.1\.norm\.', r'stages.\1.blocks.\2.attn.offset.norm.'),
    (r'^stages\.(\d+)\.attns\.(\d+)\.conv_offset\.3\.', r'stages.\1.blocks.\2.attn.offset.proj.'),
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]


def is_official_layout(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(('patch_proj.', 'down_projs.')) or '.attns.' in k for k in state_dict)


def _convert_key(key: str, v1_stem: bool) -> Optional[str]:
    if _DROPPED.search(key):
        return None
    m = re.match(r'^stages\.(\d+)\.layer_norms\.(\d+)\.norm\.(weight|bias)$', key)
    if m:
        stage, n, param = int(m[1]), int(m[2]), m[3]
        return f'stages.{stage}.blocks.{n // 2}.norm{n % 2 + 1}.{param}'
    m = re.match(r'^patch_proj\.(\d+)\.(?:norm\.)?(weight|bias)$', key)
    if m:  # mmdat's non-overlapping stem starts with a padding layer
        return f'stem.{int(m[1]) + v1_stem}.{m[2]}'
    m = re.match(r'^down_projs\.(\d+)\.(0|1)\.(?:norm\.)?(weight|bias)$', key)
    if m:  # and so does its 2x2 downsampling
        return f'stages.{int(m[1]) + 1}.downsample.{int(m[2]) + v1_stem}.{m[3]}'
    for pattern, repl in _COMPILED:
        if pattern.search(key):
            return pattern.sub(repl, key)
    raise KeyError(f'unrecognised key in official DAT checkpoint: {key!r}')


def convert_official_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Renames an official DAT / DAT++ state dict to mmdat's backbone layout.

    Classifier weights come out as ``head.fc.*`` (mmpretrain's ``LinearClsHead``), and the
    classifier's final norm as the last stage's output norm ``norm3``.
    """
    v1_stem = state_dict.get('patch_proj.0.weight') is not None and state_dict['patch_proj.0.weight'].shape[-1] == 4
    converted = {}
    for key, value in state_dict.items():
        new = _convert_key(key, v1_stem)
        if new is not None:
            converted[new] = value
    return converted


def _unwrap(checkpoint) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict):
        raise TypeError(f'a checkpoint must be a dict, got {type(checkpoint).__name__}')
    for wrapper in ('state_dict', 'model', 'module'):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in checkpoint.items()
            if isinstance(v, torch.Tensor)}


def convert_checkpoint(checkpoint: dict) -> Dict[str, torch.Tensor]:
    """A whole model's state dict in mmdat's layout, backbone keys prefixed ``backbone.``.

    Accepts official classification checkpoints (``{'model': ...}``, whose classifier becomes
    mmpretrain's ``head.fc``), DAT-Detection / DAT-Segmentation checkpoints
    (``{'state_dict': ...}`` with ``backbone.`` keys; the other keys are kept as they are),
    mmdat's own checkpoints and plain backbone state dicts.
    """
    sd = _unwrap(checkpoint)
    if any(k.startswith('backbone.') for k in sd):
        backbone = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
        rest = {k: v for k, v in sd.items() if not k.startswith('backbone.')}
    else:
        backbone, rest = sd, {}
    if is_official_layout(backbone):
        backbone = convert_official_state_dict(backbone)
    out = {k if k.startswith('head.') else f'backbone.{k}': v for k, v in backbone.items()}
    out.update(rest)
    return out


def checkpoint_for_loading(path: str, out_dir: str) -> str:
    """``path`` itself, or for an official checkpoint (classification, DAT-Detection,
    DAT-Segmentation) a converted copy in ``out_dir``: what ``load_from`` / MMEngine's
    ``load_checkpoint`` loads key for key into an mmdat model (they rename nothing).

    The copy is ``out_dir/<name>_mmdat.pth``, reused while it is newer than ``path``.
    """
    if '://' in path or not os.path.isfile(path):
        return path
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    sd = _unwrap(checkpoint)
    backbone = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')} or sd
    if not is_official_layout(backbone):
        return path
    name = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(out_dir, f'{name}_mmdat.pth')
    if not (os.path.isfile(out) and os.path.getmtime(out) >= os.path.getmtime(path)):
        os.makedirs(out_dir, exist_ok=True)
        # each process of a distributed test writes its own file and renames it into place
        tmp = f'{out}.{os.getpid()}.tmp'
        torch.save({'state_dict': convert_checkpoint(checkpoint), 'meta': {'converted_from': path}}, tmp)
        os.replace(tmp, out)
    return out


def extract_state_dict(checkpoint: dict) -> Dict[str, torch.Tensor]:
    """The backbone's weights in mmdat's layout (no prefix), plus any classifier ``head.*``."""
    return {k[len('backbone.'):] if k.startswith('backbone.') else k: v
            for k, v in convert_checkpoint(checkpoint).items()
            if k.startswith(('backbone.', 'head.'))}


def resize_position_table(table: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Bicubic resize of a relative position table to ``shape`` (as the official loader does).

    Handles the deformable tables (``heads x h x w``) and the window tables
    (``(2w-1)^2 x heads``).
    """
    if table.dim() == 3:
        return F.interpolate(table[None].float(), size=tuple(shape[-2:]), mode='bicubic')[0].to(table.dtype)
    n, heads = table.shape
    side, new_side = math.isqrt(n), math.isqrt(shape[0])
    grid = table.float().T.reshape(1, heads, side, side)
    grid = F.interpolate(grid, size=(new_side, new_side), mode='bicubic')
    return grid.reshape(heads, -1).T.to(table.dtype)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def load_dat_checkpoint(model: nn.Module, checkpoint: Union[str, dict], logger=None,
                        map_location: str = 'cpu') -> dict:
    """Loads a DAT checkpoint of any supported layout into a :class:`DAT` backbone.

    Position tables of another size are interpolated. Raises
    :class:`CheckpointMismatchError` naming every missing, unexpected or mis-shaped key
    (output norms the checkpoint lacks, e.g. those of a detector loaded from a classifier,
    are only reported). Returns the dict of keys that were reported but tolerated.
    """
    if isinstance(checkpoint, str):
        if checkpoint.startswith(('http://', 'https://')):
            raw = torch.hub.load_state_dict_from_url(checkpoint, map_location=map_location, weights_only=True)
        else:
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(f'DAT checkpoint not found: {checkpoint}')
            raw = torch.load(checkpoint, map_location=map_location, weights_only=True)
        source = checkpoint
    else:
        raw, source = checkpoint, 'the given state dict'
    sd = extract_state_dict(raw)

    own = model.state_dict()
    ignored = sorted(k for k in sd if k.startswith('head.'))
    unexpected = sorted(k for k in sd if k not in own and not k.startswith('head.'))
    missing = sorted(k for k in own if k not in sd)
    mismatched, resized = [], []
    to_load = {}
    for key, value in sd.items():
        if key not in own:
            continue
        target = own[key].shape
        if value.shape != target:
            if key.endswith(('relative_position_table', 'relative_position_bias_table')) and value.dim() == len(target):
                value = resize_position_table(value, target)
                resized.append(f'{key}: {tuple(sd[key].shape)} -> {tuple(target)}')
            else:
                mismatched.append(f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(target)}')
                continue
        to_load[key] = value

    tolerated_missing = [k for k in missing if re.match(r'^norm\d\.', k)]
    fatal_missing = [k for k in missing if k not in tolerated_missing]
    if mismatched or unexpected or fatal_missing:
        lines = [f'checkpoint {source} does not fit this DAT backbone '
                 f'({len(to_load)} of {len(own)} tensors match):']
        for title, keys in (('mis-shaped', mismatched), ('missing', fatal_missing), ('unexpected', unexpected)):
            if keys:
                shown = keys[:20] + ([f'... and {len(keys) - 20} more'] if len(keys) > 20 else [])
                lines.append(f'  {title} ({len(keys)}): ' + ', '.join(shown))
        raise CheckpointMismatchError('\n'.join(lines))

    model.load_state_dict(to_load, strict=False)
    report = dict(resized=resized, missing=tolerated_missing, ignored=ignored)
    if logger is not None:
        logger.info(f'loaded DAT backbone weights from {source}')
        for title, keys in (('interpolated position tables', resized),
                            ('left at their initialisation (not in the checkpoint)', tolerated_missing),
                            ('ignored (classifier head)', ignored)):
            if keys:
                logger.warning(f'{title}: {", ".join(keys)}')
    return report


def official_arch(config: dict, flavor: str) -> dict:
    """``DAT`` constructor arguments equivalent to an official model's constructor arguments.

    Args:
        config: Keyword arguments of the official ``DAT`` (``dims``, ``stage_spec``, ...).
        flavor: ``'v1'`` for the CVPR 2022 classification code, ``'det'`` / ``'pp'`` for the
            DAT-Detection / DAT-Segmentation / DAT++ code.
    """
    flavor = {'det': 'pp', 'seg': 'pp', '++': 'pp'}.get(flavor, flavor)
    c = dict(config)

    def per_stage(name, default):
        return tuple(c.get(name, [default] * 4))

    unsupported = {name: c[name] for name in ('dwc_pes', 'fixed_pes', 'no_offs', 'log_cpb', 'use_cmt_mlps')
                   if any(per_stage(name, False))}
    if unsupported or any(v > 0 for v in per_stage('layer_scale_values', -1)):
        raise ValueError(f'official options outside the published DAT / DAT++ models: {unsupported}')
    if c.get('patch_size', 4) != 4 or c.get('dim_stem', c['dims'][0]) != c['dims'][0]:
        raise ValueError('only patch_size 4 with dim_stem == dims[0] is supported')
    windows, nat = set(per_stage('window_sizes', 7)), set(per_stage('nat_ksizes', 7))
    if len(windows) != 1 or len(nat) != 1:
        raise ValueError(f'per-stage window / neighborhood sizes must agree: {windows}, {nat}')
    specs = tuple(''.join(s) for s in c['stage_spec'])
    mlps, lpus = set(per_stage('use_dwc_mlps', False)), set(per_stage('use_lpus', False))
    if len(mlps) != 1 or len(lpus) != 1:
        raise ValueError('use_dwc_mlps and use_lpus must be the same for every stage')
    arch = dict(
        flavor=flavor,
        embed_dims=tuple(c['dims']),
        num_heads=tuple(c['heads']),
        groups=tuple(max(g, 0) for g in c['groups']),
        stage_specs=specs,
        key_strides=tuple(max(r, 1) for r in per_stage('strides', 1)),
        offset_range_factors=tuple(c.get('offset_range_factor', (-1, -1, -1, -1))),
        # the v1 code fixes the offset kernels to these per stage
        offset_kernel_sizes=tuple(c.get('ksizes', (9, 7, 5, 3))),
        position_tables=tuple(bool(u) for u in per_stage('use_pes', False)),
        window_size=windows.pop(),
        neighborhood_size=nat.pop(),
        overlapping_patches=bool(c.get('use_conv_patches', False)),
        conv_mlp=mlps.pop(),
        local_perception=lpus.pop(),
        mlp_ratio=c.get('expansion', 4),
    )
    return dict(arch=arch, pretrain_img_size=c.get('img_size', 224),
                out_indices=tuple(c.get('out_indices', (0, 1, 2, 3))))
