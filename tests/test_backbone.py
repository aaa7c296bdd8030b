"""The DAT backbone: official parity, checkpoint conversion, shapes, registry, training knobs."""
import glob
import json
import math
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

import mmdat  # noqa: F401
from mmdat.models.backbones import ARCH_SETTINGS, DAT
from mmdat.models.backbones.dat_checkpoint import (
    CheckpointMismatchError,
    extract_state_dict,
    load_dat_checkpoint,
    official_arch,
)
from mmdat.models.layers.deformable_attention import DeformableAttention
from mmdat.models.layers.neighborhood_attention import NeighborhoodAttention

from conftest import NANO_PP, NANO_V1, REPO, fixtures_dir

TOL = 1e-4


def _fixture_files():
    folder = fixtures_dir()
    files = sorted(glob.glob(osp.join(folder, '*.pth')))
    if not files:
        if 'MMDAT_PARITY_FIXTURES' in os.environ:
            raise FileNotFoundError(f'MMDAT_PARITY_FIXTURES={folder} holds no *.pth fixtures')
        return [pytest.param(None, marks=pytest.mark.skip(reason=f'no parity fixtures in {folder}'))]
    return [pytest.param(f, id=osp.basename(f)) for f in files]


def _max_diff(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


@pytest.mark.parametrize('path', _fixture_files())
def test_official_parity(path):
    """Official weights, loaded through init_cfg, reproduce the official features."""
    fixture = torch.load(path, map_location='cpu', weights_only=True)
    kwargs = official_arch(fixture['config'], fixture['flavor'])
    with_logits = 'logits' in fixture
    if with_logits:  # the classifier's final norm is the last stage's output norm
        kwargs['out_indices'] = (3,)
    model = DAT(**kwargs, init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    model.eval()
    x = fixture['input']
    with torch.no_grad():
        if 'stage_outputs' in fixture:
            assert _max_diff(model.forward_stages(x), fixture['stage_outputs']) <= TOL
        if 'outputs' in fixture:
            assert _max_diff(model(x), fixture['outputs']) <= TOL
    if with_logits:
        from mmengine.registry import DefaultScope
        from mmpretrain.models import ImageClassifier
        head = extract_state_dict(fixture)
        num_classes, channels = head['head.fc.weight'].shape
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            classifier = ImageClassifier(
                backbone=dict(type='DAT', **kwargs, init_cfg=dict(type='Pretrained', checkpoint=path)),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=channels))
        classifier.init_weights()
        classifier.head.load_state_dict({'fc.weight': head['head.fc.weight'], 'fc.bias': head['head.fc.bias']})
        classifier.eval()
        with torch.no_grad():
            logits = classifier(x, mode='tensor')
        assert _max_diff([logits], [fixture['logits']]) <= TOL


def _layouts():
    path = osp.join(fixtures_dir(), 'official_layout.json')
    if not osp.isfile(path):
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason=f'no {path}'))]
    layouts = json.load(open(path))
    return [pytest.param(layouts[name], layouts[name[:-len('_keys')] + '_params'], name, id=name)
            for name in sorted(layouts) if name.endswith('_keys')]


@pytest.mark.parametrize('keys,params,name', _layouts())
def test_official_layout_converts_and_counts(keys, params, name):
    """Full-size official layouts convert with no missing or unexpected key; parameter counts match."""
    flavor, size = name.split('_')[:2]
    classifier = '_cls_' in name
    model = DAT(f'{flavor}-{size}', out_indices=(3,) if classifier else (0, 1, 2, 3))
    state_dict = {k: torch.zeros(shape) for k, shape in keys.items()}
    report = load_dat_checkpoint(model, state_dict)  # raises on any missing / unexpected / mis-shaped key
    assert report['missing'] == [] and report['resized'] == []
    count = sum(p.numel() for p in model.parameters())
    if classifier:
        assert sorted(report['ignored']) == ['head.fc.bias', 'head.fc.weight']
        count += sum(math.prod(keys[k]) for k in ('cls_head.weight', 'cls_head.bias'))
    assert count == params
    with torch.no_grad():  # and the full-size preset runs
        outs = model.eval()(torch.randn(1, 3, 64, 96))
    dims = ARCH_SETTINGS[f'{flavor}-{size}']['embed_dims']
    assert [tuple(o.shape[1:]) for o in outs][-1] == (dims[3], 2, 3)


@pytest.mark.parametrize('arch', [NANO_V1, NANO_PP], ids=['v1', 'pp'])
@pytest.mark.parametrize('size', [(64, 64), (96, 160), (100, 150), (37, 290), (16, 16)])
def test_output_shapes_any_size(arch, size):
    """Any input size gives stride-4..32 maps, each normed, of the official sizes: DAT++'s
    overlapping k3 s2 p1 convs give ceil(H / stride), v1's k4 s4 stem and k2 s2 downsampling
    floor(H / stride) (and need 32 pixels a side for 4 stages)."""
    model = DAT(arch).eval()
    x = torch.randn(1, 3, *size)
    rounding = math.ceil if arch['preset'].startswith('pp') else math.floor
    if rounding(min(size) / 32) == 0:
        with pytest.raises(ValueError, match=r'4 stages need an input of at least 32 pixels a side, got \(16, 16\)'):
            model(x)
        return
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == 4
    for i, out in enumerate(outs):
        stride = 4 * 2 ** i
        assert out.shape == (1, arch['embed_dims'][i], rounding(size[0] / stride), rounding(size[1] / stride))
        assert torch.isfinite(out).all()
        assert out.is_contiguous()  # NCHW memory: mmcv's ops (e.g. CPU RoIAlign) read it as such


ODD_SIZE_FIXTURE = osp.join(REPO, 'tests', 'data', 'official_odd_size.pth')


@pytest.mark.parametrize('name', ['v1_nano_det_224x288.pth', 'pp_nano_det_256x320.pth'], ids=['v1', 'pp'])
def test_official_parity_at_an_odd_size(name):
    """tests/data/official_odd_size.pth: the official DAT-Detection backbone (made with
    tests/data/make_odd_size_fixture.py) with the weights of the shared fixture `name`, at
    232x168. The v1 stem and downsampling floor (stage maps 58x42, 29x21, 14x10, 7x5), the
    DAT++ convs round up (..., 15x11, 8x6); mmdat gives the same maps and values."""
    path = osp.join(fixtures_dir(), name)
    if not osp.isfile(path):
        pytest.skip(f'no parity fixture {path}')
    odd = torch.load(ODD_SIZE_FIXTURE, map_location='cpu', weights_only=True)
    fixture = torch.load(path, map_location='cpu', weights_only=True)
    model = DAT(**official_arch(fixture['config'], fixture['flavor']),
                init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    with torch.no_grad():
        outs = model.eval()(odd['input'])
    expected = odd['outputs'][name]
    assert [tuple(o.shape[-2:]) for o in outs] == [tuple(e.shape[-2:]) for e in expected]
    assert _max_diff(outs, expected) <= TOL


def test_v1_flavour_floors_as_the_official_convs():
    """The v1 classifier's formulas (flavor v1) have no official code at other sizes than the
    construction size; the stem and downsampling arithmetic is the official one: an input
    of 234x170 gives exactly what its 232x168 crop gives (k4 s4 reads rows 0..231), and each
    2x2 downsampling reads the even-sized top-left part of the previous stage (29x21 -> 14x10)."""
    model = DAT(NANO_V1).eval()
    x = torch.randn(1, 3, 234, 170)
    seen = {}
    for i in (1, 2, 3):
        model.stages[i].downsample.register_forward_hook(
            lambda module, args, out, i=i: seen.__setitem__(i, (args[0], out)))
    with torch.no_grad():
        outs = model.forward_stages(x)
        cropped = model.forward_stages(x[..., :232, :168].contiguous())
    assert [tuple(o.shape[-2:]) for o in outs] == [(58, 42), (29, 21), (14, 10), (7, 5)]
    assert _max_diff(outs, cropped) <= 1e-5
    for i, (before, after) in seen.items():
        conv, norm = model.stages[i].downsample[1:]
        h, w = before.shape[-2] // 2 * 2, before.shape[-1] // 2 * 2
        reference = norm(torch.nn.functional.conv2d(before[..., :h, :w], conv.weight, stride=2))
        assert torch.allclose(after, reference, atol=1e-6), i


@pytest.mark.parametrize('scope,registry', [('mmdet', 'mmdet.registry'), ('mmseg', 'mmseg.registry'),
                                            ('mmpretrain', 'mmpretrain.registry')])
def test_builds_from_each_scope(scope, registry):
    from mmengine.registry import DefaultScope
    models = __import__(registry, fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = models.build(dict(type='DAT', arch=NANO_PP, out_indices=(2,)))
    assert isinstance(model, DAT)
    assert model(torch.randn(1, 3, 32, 32))[0].shape == (1, 128, 2, 2)


def test_gradients_reach_offsets_and_tables():
    model = DAT(NANO_PP).train()
    sum(o.square().mean() for o in model(torch.randn(1, 3, 48, 48))).backward()
    for name, p in model.named_parameters():
        if name.endswith(('offset.proj.weight', 'offset.dwconv.weight', 'relative_position_table',
                          'relative_position_bias_table')):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_frozen_stages_stay_frozen():
    model = DAT(NANO_V1, frozen_stages=2, out_indices=(0, 1, 2, 3))
    model.train()
    frozen = {n: p.clone() for n, p in model.named_parameters()
              if n.startswith(('stem.', 'stages.0.', 'stages.1.', 'norm0.', 'norm1.'))}
    assert frozen and all(not model.get_parameter(n).requires_grad for n in frozen)
    assert not model.stages[1].training and model.stages[2].training
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sum(o.mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    optimizer.step()
    for name, before in frozen.items():
        assert torch.equal(model.get_parameter(name), before), name
    assert not torch.equal(model.stages[2].blocks[0].attn.qkv.weight,
                           DAT(NANO_V1).stages[2].blocks[0].attn.qkv.weight)


def test_with_cp_matches_plain():
    model = DAT(NANO_PP).train()
    x = torch.randn(1, 3, 64, 64)
    plain = sum(o.sum() for o in model(x))
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for block in (b for s in model.stages for b in s.blocks):
        block.with_cp = True
    ckpt = sum(o.sum() for o in model(x))
    ckpt.backward()
    assert torch.allclose(plain, ckpt)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n


def test_stochastic_depth_only_in_training():
    model = DAT(NANO_V1, drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x)[3], model(x)[3])
    model.eval()
    assert torch.equal(model(x)[3], model(x)[3])


def test_position_tables_interpolate_to_another_pretrain_size(tmp_path):
    path = str(tmp_path / 'at224.pth')
    torch.save({'state_dict': DAT(NANO_PP).state_dict()}, path)
    model = DAT(NANO_PP, pretrain_img_size=384, init_cfg=dict(type='Pretrained', checkpoint=path))
    report = load_dat_checkpoint(model, path)
    assert any('relative_position_table: (1, 111, 111) -> (1, 191, 191)' in r for r in report['resized'])
    with torch.no_grad():
        assert all(torch.isfinite(o).all() for o in model.eval()(torch.randn(1, 3, 64, 64)))


def test_mismatched_checkpoint_names_keys(tmp_path):
    path = str(tmp_path / 'v1.pth')
    torch.save({'state_dict': DAT(NANO_V1).state_dict()}, path)
    model = DAT(dict(NANO_V1, embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16)),
                init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(CheckpointMismatchError) as err:
        model.init_weights()
    message = str(err.value)
    assert 'mis-shaped' in message and 'stem.1.weight: checkpoint (32, 3, 4, 4) vs model (48, 3, 4, 4)' in message
    with pytest.raises(CheckpointMismatchError, match=r'missing .*offset'):
        load_dat_checkpoint(DAT(NANO_PP), path)
    with pytest.raises(FileNotFoundError, match='no_such.pth'):
        load_dat_checkpoint(DAT(NANO_V1), str(tmp_path / 'no_such.pth'))


@pytest.mark.parametrize('arch,match', [
    ('v2-tiny', 'unknown DAT arch'),
    (dict(NANO_V1, num_heads=(3, 2, 4, 8)), 'not divisible by num_heads'),
    (dict(NANO_PP, groups=(1, 2, 3, 4)), 'groups >= 1 dividing num_heads'),
    (dict(NANO_PP, stage_specs=('NX', 'N', 'N', 'D')), 'string of'),
    (dict(NANO_PP, key_strides=(8, 4, 2)), 'needs 4 values'),
    (dict(NANO_PP, key_strides=(8, 4, (0, 2), 1)), 'positive int or a pair'),
    (dict(NANO_PP, window=7), 'unknown DAT arch fields'),
])
def test_bad_arch_fails_at_construction(arch, match):
    with pytest.raises(ValueError, match=match):
        DAT(arch)


def test_key_stride_pair_samples_an_anisotropic_grid():
    """``key_strides`` entries (ry, rx) stride the offset network per axis (a config's lists
    become tuples)."""
    model = DAT(dict(NANO_PP, key_strides=[8, 4, [1, 2], 1]))
    assert model.arch_settings['key_strides'] == (8, 4, (1, 2), 1)
    attn = [m for m in model.modules() if isinstance(m, DeformableAttention)]
    grids = []
    for m in attn:
        m.offset.register_forward_hook(lambda mod, args, out: grids.append(tuple(out.shape[-2:])))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 64, 96))
    assert grids[0] == (2, 3) and (4, 3) in grids  # stage 1: 16x24 / 8; stage 3: 4x6 / (1, 2)


def test_wrong_input_channels_is_a_clear_error():
    with pytest.raises(ValueError, match=r'B x 3 x H x W, got \(1, 1, 32, 32\)'):
        DAT(NANO_PP)(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize('dtype', [torch.uint8, torch.int64])
def test_integer_images_are_a_clear_error(dtype):
    with pytest.raises(TypeError, match=f'DAT expects floating-point images, got {dtype}: normalise them first'):
        DAT(NANO_PP)(torch.zeros(1, 3, 32, 32, dtype=dtype))


def _naive_neighborhood(x, attn):
    """NA2D by definition: each query attends to its clamped k x k window (maps padded to k)."""
    B, C, H, W = x.shape
    k, heads = attn.kernel_size, attn.num_heads
    xp = torch.nn.functional.pad(x, (0, max(0, k - W), 0, max(0, k - H))).permute(0, 2, 3, 1)
    Hp, Wp = xp.shape[1:3]
    q, kk, v = attn.qkv(xp).reshape(B, Hp, Wp, 3, heads, -1).unbind(3)
    out = torch.zeros_like(q)
    for i in range(Hp):
        for j in range(Wp):
            r0, c0 = min(max(i - k // 2, 0), Hp - k), min(max(j - k // 2, 0), Wp - k)
            keys = kk[:, r0:r0 + k, c0:c0 + k].reshape(B, k * k, heads, -1)
            vals = v[:, r0:r0 + k, c0:c0 + k].reshape(B, k * k, heads, -1)
            rel = attn.relative_position_bias_table[:, r0 - i + k - 1:r0 - i + 2 * k - 1,
                                                    c0 - j + k - 1:c0 - j + 2 * k - 1].reshape(heads, -1)
            logits = torch.einsum('bhd,bnhd->bhn', q[:, i, j] * attn.scale, keys) + rel
            out[:, i, j] = torch.einsum('bhn,bnhd->bhd', logits.softmax(-1), vals)
    out = attn.proj(out.reshape(B, Hp, Wp, C)).permute(0, 3, 1, 2)
    return out[:, :, :H, :W]


@pytest.mark.parametrize('size', [(9, 11), (5, 6)])
def test_neighborhood_attention_matches_definition(size):
    attn = NeighborhoodAttention(16, 2, kernel_size=7, use_natten=False).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table)
    x = torch.randn(2, 16, *size)
    with torch.no_grad():
        assert torch.allclose(attn(x), _naive_neighborhood(x, attn), atol=1e-5)


@pytest.mark.parametrize('path', _fixture_files())
def test_converter_tool(path, tmp_path):
    dst = str(tmp_path / 'converted.pth')
    subprocess.run([sys.executable, osp.join(REPO, 'tools', 'model_converters', 'dat2mmdat.py'), path, dst],
                   check=True, capture_output=True)
    converted = torch.load(dst, weights_only=True)['state_dict']
    assert all(k.startswith(('backbone.', 'head.')) for k in converted)
    fixture = torch.load(path, weights_only=True)
    kwargs = official_arch(fixture['config'], fixture['flavor'])
    model = DAT(**kwargs)
    own = {k: v for k, v in converted.items() if k.startswith('backbone.')}
    missing, unexpected = model.load_state_dict({k[len('backbone.'):]: v for k, v in own.items()}, strict=False)
    assert not unexpected and all(k.startswith('norm') for k in missing)


def test_converter_tool_reports_bad_input(tmp_path):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    result = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'model_converters', 'dat2mmdat.py'),
                             str(bad), str(tmp_path / 'out.pth')], capture_output=True, text=True)
    assert result.returncode != 0 and 'cannot convert' in result.stderr and 'Traceback' not in result.stderr


def test_official_detector_checkpoint_loads_through_tools_test(tmp_path):
    """`tools/test.py CONFIG OFFICIAL_CKPT`: an official DAT-Detection checkpoint (backbone keys
    in the official layout under `backbone.`, the neck's and heads' as they are) becomes
    `load_from` through a converted copy that MMEngine's loader reads key for key (strict),
    and the backbone then gives the official features; mmdat's own checkpoints pass as they are."""
    import importlib.util

    from mmengine.runner import load_checkpoint
    path = osp.join(fixtures_dir(), 'pp_nano_det_256x320.pth')
    if not osp.isfile(path):
        pytest.skip(f'no parity fixture {path}')
    fixture = torch.load(path, map_location='cpu', weights_only=True)
    neck = torch.nn.Conv2d(32, 8, 1)
    official = {f'backbone.{k}': v for k, v in fixture['state_dict'].items()}
    official.update({f'neck.{k}': v for k, v in neck.state_dict().items()})
    src = str(tmp_path / 'official_detector.pth')
    torch.save({'state_dict': official, 'meta': {}}, src)

    spec = importlib.util.spec_from_file_location('mmdat_test_tool', osp.join(REPO, 'tools', 'test.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config = osp.join(REPO, 'configs', 'mask_rcnn_datpp_t_3x.py')
    cfg = tool.build_config(tool.parse_args([config, src, '--work-dir', str(tmp_path / 'work')]))
    assert cfg.load_from == str(tmp_path / 'work' / 'official_detector_mmdat.pth')

    detector = torch.nn.Module()
    detector.backbone = DAT(**official_arch(fixture['config'], fixture['flavor']))
    detector.neck = torch.nn.Conv2d(32, 8, 1)
    load_checkpoint(detector, cfg.load_from, strict=True)
    assert torch.equal(detector.neck.weight, neck.weight)
    with torch.no_grad():
        assert _max_diff(detector.backbone.eval()(fixture['input']), fixture['outputs']) <= TOL

    from mmdat.models.backbones.dat_checkpoint import checkpoint_for_loading
    assert checkpoint_for_loading(cfg.load_from, str(tmp_path / 'w2')) == cfg.load_from
