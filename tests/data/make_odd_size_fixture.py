"""Writes tests/data/official_odd_size.pth: the official DAT-Detection backbone at 232x168.

    python tests/data/make_odd_size_fixture.py DAT_DETECTION_SRC [OUT]

DAT_DETECTION_SRC is a checkout of LeapLabTHU/DAT-Detection (its ``models/`` folder is
imported from there, unchanged). The official code needs mmcv 1.x, mmdet 2.x, timm and
natten; none of them computes anything the backbone's forward uses here, so this script
puts small stand-ins for them in ``sys.modules`` (an identity ``auto_fp16``, timm's three
helpers, a registry) and needs only torch and einops. Two pieces are not the official
files' own:

* natten's two autograd functions (``NATTEN2DQKRPBFunction``, ``NATTEN2DAVFunction``),
  written below from NATTEN's definition of 2-D neighborhood attention (dilation 1):
  query (i, j) attends to the k x k window starting at clamp(i - k // 2, 0, H - k) per
  axis, with the bias ``rpb[head, key_i - i + k - 1, key_j - j + k - 1]``;
* DAT-Detection's shifted-window block rolls the tuple its parent returns (a crash in the
  official code); the parent's output is unpacked for it, as in the shared fixtures.

The weights and architectures are those of the shared parity fixtures
(``v1_nano_det_224x288.pth``: v1 specs LS, LS, LD, LD through the detection code with the
non-overlapping k4 s4 stem and k2 s2 downsampling; ``pp_nano_det_256x320.pth``: DAT++ specs
with the overlapping conv stem); the input is new, 1 x 3 x 232 x 168, on which the v1 stem
floors (stage maps 58x42, 29x21, 14x10, 7x5) where the ++ one rounds up (58x42, 29x21,
15x11, 8x6). The output file holds ``input`` and, per fixture, the four normed stage
outputs, nothing else (the weights stay in the shared fixtures).
"""
import os
import os.path as osp
import shutil
import sys
import tempfile
import types

import torch
import torch.nn as nn

FIXTURES = ('v1_nano_det_224x288.pth', 'pp_nano_det_256x320.pth')
SIZE = (232, 168)


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _neighborhood_windows(size, k):
    start = (torch.arange(size) - k // 2).clamp(0, size - k)
    return start[:, None] + torch.arange(k)  # size x k key positions


class _QKRPB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, rpb, kernel_size, dilation):
        assert dilation == 1
        B, M, H, W, d = q.shape
        rows, cols = _neighborhood_windows(H, kernel_size), _neighborhood_windows(W, kernel_size)
        keys = k[:, :, rows[:, :, None, None], cols[None, None, :, :]]  # B M H kh W kw d
        keys = keys.permute(0, 1, 2, 4, 3, 5, 6)  # B M H W kh kw d
        logits = torch.einsum('bmhwd,bmhwxyd->bmhwxy', q, keys)
        dy = rows - torch.arange(H)[:, None] + kernel_size - 1  # H x kh
        dx = cols - torch.arange(W)[:, None] + kernel_size - 1  # W x kw
        bias = rpb[:, dy[:, None, :, None], dx[None, :, None, :]]  # M H W kh kw
        return (logits + bias).reshape(B, M, H, W, kernel_size * kernel_size)


class _AV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, v, kernel_size, dilation):
        B, M, H, W, d = v.shape
        rows, cols = _neighborhood_windows(H, kernel_size), _neighborhood_windows(W, kernel_size)
        values = v[:, :, rows[:, :, None, None], cols[None, None, :, :]].permute(0, 1, 2, 4, 3, 5, 6)
        return torch.einsum('bmhwn,bmhwnd->bmhwd', attn, values.reshape(B, M, H, W, -1, d))


def _install_stand_ins():
    def auto_fp16(apply_to=None, out_fp32=False):
        return lambda fn: fn

    class _Registry:
        def register_module(self, *args, **kwargs):
            return lambda cls: cls

    class DropPath(nn.Identity):  # the fixtures run in eval mode: drop path is the identity
        def __init__(self, *args, **kwargs):
            super().__init__()

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    _module('mmcv')
    _module('mmcv.runner', auto_fp16=auto_fp16)
    _module('mmdet')
    _module('mmdet.utils', get_root_logger=lambda *a, **k: None)
    _module('mmdet.models')
    _module('mmdet.models.builder', BACKBONES=_Registry())
    _module('timm')
    _module('timm.models')
    _module('timm.models.layers', DropPath=DropPath, to_2tuple=to_2tuple, trunc_normal_=nn.init.trunc_normal_)
    _module('natten')
    _module('natten.functional', NATTEN2DQKRPBFunction=_QKRPB, NATTEN2DAVFunction=_AV)


def official_backbone_class(src):
    """DAT-Detection's DAT class, imported from ``src/models`` as package ``official_dat``."""
    _install_stand_ins()
    root = tempfile.mkdtemp()
    shutil.copytree(osp.join(src, 'models'), osp.join(root, 'official_dat'))
    _module('official_dat.backbones.loading', load_checkpoint=None)
    sys.path.insert(0, root)
    from official_dat.backbones.dat import DAT
    from official_dat.utils import dat_blocks

    unshifted = dat_blocks.LocalAttention.forward

    def local_attention(self, x, mask=None):  # the shifted block's call (with a mask) unpacked
        out = unshifted(self, x, mask)
        return out[0] if mask is not None else out

    dat_blocks.LocalAttention.forward = local_attention
    return DAT


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    src = argv[0]
    out = argv[1] if len(argv) > 1 else osp.join(osp.dirname(osp.abspath(__file__)), 'official_odd_size.pth')
    fixtures = os.environ.get('MMDAT_PARITY_FIXTURES',
                              osp.join(osp.dirname(__file__), '..', '..', '..', 'shared', 'fixtures', 'official'))
    official = official_backbone_class(src)
    torch.manual_seed(0)
    x = torch.randn(1, 3, *SIZE)
    result = dict(input=x, size=SIZE, made_with=__doc__.split('\n')[0], outputs={})
    for name in FIXTURES:
        fixture = torch.load(osp.join(fixtures, name), map_location='cpu', weights_only=True)
        model = official(**fixture['config']).eval()
        missing, unexpected = model.load_state_dict(fixture['state_dict'], strict=False)
        assert not unexpected and all(k.endswith(('relative_position_index', 'attn_mask')) for k in missing), \
            (missing, unexpected)
        with torch.no_grad():
            # the 224x288 / 256x320 fixtures first: the official code reproduces them here
            ref = model(fixture['input'])
            err = max((a - b).abs().max().item() for a, b in zip(ref, fixture['outputs']))
            assert err < 1e-5, f'{name}: the official code here does not reproduce its fixture ({err})'
            result['outputs'][name] = [o.clone() for o in model(x)]
        print(name, [tuple(o.shape[-2:]) for o in result['outputs'][name]], f'(own fixture reproduced to {err:.1e})')
    torch.save(result, out)
    print('wrote', out)


if __name__ == '__main__':
    main()
