"""The paper configs in configs/: they build with the real mmdet / mmseg / mmpretrain
registries and run (a loss step for detectors and segmentors, a forward for classifiers),
`mmdat::` inheritance works from outside the repository, and get_flops.py counts.

Models are real (no shrinking), on tiny inputs (2 images of 64x96). Configs that differ
only in the schedule (1x / 3x, which also changes the drop-path rate) share one built
model: the test checks that their model settings are otherwise identical.
"""
import copy
import functools
import glob
import importlib.util
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmdat

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG_DIR = osp.join(REPO, 'configs')
# The DAT / DAT++ paper configs (the DINO and Mask2Former configs have tests of their own).
OTHER_FAMILIES = ('dino_', 'mask2former_')
CONFIGS = sorted(osp.basename(p) for p in glob.glob(osp.join(CONFIG_DIR, '*.py'))
                 if not osp.basename(p).startswith(OTHER_FAMILIES))

# What the brief and the paper tables ask for.
EXPECTED = (
    [f'{det}_{fam}_{s}_{sch}.py' for det in ('retinanet', 'mask_rcnn') for fam in ('dat', 'datpp')
     for s in 'ts' for sch in ('1x', '3x')] +
    [f'cascade_mask_rcnn_{fam}_{x}.py' for fam in ('dat', 'datpp') for x in ('t_1x', 't_3x', 's_3x', 'b_3x')] +
    [f'{seg}_{fam}_{s}_{sch}.py' for seg, sch in (('upernet', '160k'), ('fpn', '80k')) for fam in ('dat', 'datpp')
     for s in 'tsb'] +
    [f'{fam}_{s}_in1k.py' for fam in ('dat', 'datpp') for s in 'tsb'] + ['dat_b_in1k_384.py', 'datpp_b_in1k_384.py'])

OUT_CHANNELS = {'v1-tiny': [96, 192, 384, 768], 'v1-small': [96, 192, 384, 768], 'v1-base': [128, 256, 512, 1024],
                'pp-tiny': [64, 128, 256, 512], 'pp-small': [96, 192, 384, 768], 'pp-base': [128, 256, 512, 1024]}
SIZE = {'t': 'tiny', 's': 'small', 'b': 'base'}
DROP_PATH = {  # official config names: rtn_tiny_3x_4n_dp02, mrcn_small_1x_dp01, ...
    'retinanet_t_1x': 0.0, 'retinanet_t_3x': 0.2, 'retinanet_s_1x': 0.1, 'retinanet_s_3x': 0.5,
    'mask_rcnn_t_1x': 0.0, 'mask_rcnn_t_3x': 0.3, 'mask_rcnn_s_1x': 0.1, 'mask_rcnn_s_3x': 0.5,
    'cascade_mask_rcnn_t_1x': 0.0, 'cascade_mask_rcnn_t_3x': 0.1, 'cascade_mask_rcnn_s_3x': 0.5,
    'cascade_mask_rcnn_b_3x': 0.8, 'in1k_v1_t': 0.2, 'in1k_v1_s': 0.3, 'in1k_v1_b': 0.5,
    'in1k_pp_t': 0.2, 'in1k_pp_s': 0.4, 'in1k_pp_b': 0.7,
}


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Config:
    return Config.fromfile(osp.join(CONFIG_DIR, name))


def load(name: str) -> Config:
    """The config `name` of configs/ (parsed once; a copy)."""
    return copy.deepcopy(_load(name))


def parse_name(name: str) -> dict:
    m = re.match(r'^(?:(retinanet|mask_rcnn|cascade_mask_rcnn|upernet|fpn)_)?(datpp|dat)_([tsb])_(\w+)\.py$', name)
    assert m, name
    task, fam, size, rest = m.groups()
    return dict(task=task or 'cls', flavor='pp' if fam == 'datpp' else 'v1', size=size, rest=rest)


def backbone_preset(cfg: Config) -> str:
    arch = cfg.model.backbone.arch
    return arch if isinstance(arch, str) else arch['preset']


def test_all_paper_configs_present():
    assert sorted(EXPECTED) == CONFIGS


@pytest.mark.parametrize('name', CONFIGS)
def test_config_settings(name):
    """The model each config promises: library, backbone, channels, drop path (the recipes
    themselves are compared with the official ones in test_recipes.py)."""
    cfg = load(name)
    info = parse_name(name)
    assert cfg.custom_imports == dict(imports=['mmdat'], allow_failed_imports=False)
    backbone = cfg.model.backbone
    assert backbone.type == 'DAT'
    preset = backbone_preset(cfg)
    assert preset == f'{info["flavor"]}-{SIZE[info["size"]]}'
    dims = OUT_CHANNELS[preset]
    lib = {'cls': 'mmpretrain', 'upernet': 'mmseg', 'fpn': 'mmseg'}.get(info['task'], 'mmdet')
    assert cfg.default_scope == lib

    if info['task'] == 'cls':
        # the v1 classifiers are the official ones: flavor v1, key stride 1 (preset as is)
        if name == 'dat_b_in1k_384.py':
            assert backbone.arch == dict(preset='v1-base', window_size=12) and backbone.pretrain_img_size == 384
        else:  # DAT++ at 384 as at 224: position tables of the 224 model, sampled at any size
            assert isinstance(backbone.arch, str) and backbone.pretrain_img_size == 224
        assert backbone.out_indices == (3, ) and cfg.model.head.in_channels == dims[3]
        if not name.endswith('_384.py'):
            assert backbone.drop_path_rate == DROP_PATH[f'in1k_{info["flavor"]}_{info["size"]}']
            assert cfg.train_cfg.max_epochs == 300
        assert cfg.model.train_cfg.augments == [dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]
        assert cfg.optim_wrapper.optimizer.type == 'AdamW'
        return

    # dense prediction: v1 specs run with the DAT++ formulas on the documented key grid
    if info['flavor'] == 'v1':
        grids = _load('_base_/dat_v1_dense.py')
        key_strides = grids.v1_ade_key_strides if info['task'] in ('upernet', 'fpn') else grids.v1_dense_key_strides
        assert backbone.arch == dict(preset=preset, flavor='pp', key_strides=key_strides)
    else:
        assert backbone.arch == preset
    assert backbone.init_cfg.type == 'Pretrained'
    opt = cfg.optim_wrapper
    for key in ('relative_position_table', 'norm'):
        assert opt.paramwise_cfg.custom_keys[key] == dict(decay_mult=0.)
    # v1's window attention tables are exempt, DAT++'s neighborhood-attention tables decayed
    assert ('relative_position_bias_table' in opt.paramwise_cfg.custom_keys) == (info['flavor'] == 'v1')

    if info['task'] in ('upernet', 'fpn'):
        if info['task'] == 'upernet':
            assert cfg.model.decode_head.in_channels == dims
            assert cfg.model.auxiliary_head.in_channels == dims[2]
            assert (opt.optimizer.lr, opt.optimizer.weight_decay) == (6e-5, 0.01)
            assert cfg.train_cfg.max_iters == 160000
        else:
            assert cfg.model.neck.in_channels == dims
            assert (opt.optimizer.lr, opt.optimizer.weight_decay) == (2e-4, 1e-4)
            # 40k x 32 images = the "80k" (x 16 images) schedule, as DAT-Segmentation runs it
            assert cfg.train_cfg.max_iters * cfg.train_dataloader.batch_size * 8 == 80000 * 16
        assert cfg.model.decode_head.num_classes == 150
        assert cfg.crop_size == (512, 512) and cfg.model.data_preprocessor.size == (512, 512)
        return

    det, sched = info['task'], info['rest']
    assert backbone.drop_path_rate == DROP_PATH[f'{det}_{info["size"]}_{sched}']
    if det == 'cascade_mask_rcnn':  # DAT-Detection's (and Swin's) 4conv1fc GIoU box heads
        assert [(h.type, h.num_shared_convs, h.num_shared_fcs, h.loss_bbox.type)
                for h in cfg.model.roi_head.bbox_head] == [('ConvFCBBoxHead', 4, 1, 'GIoULoss')] * 3
    assert backbone.out_indices == (0, 1, 2, 3) and cfg.model.neck.in_channels == dims
    if det == 'retinanet':  # DAT-Detection's RetinaNet: the FPN starts at stride 8
        assert cfg.model.neck.start_level == 1
    per_image = opt.optimizer.lr / (8 * cfg.train_dataloader.batch_size)
    assert per_image == (2e-4 if det == 'retinanet' else 4e-4) / 64  # DAT-Detection: for 64 images
    assert (opt.optimizer.type, opt.optimizer.weight_decay) == ('AdamW', 0.05)
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.start_factor, warmup.by_epoch) == ('LinearLR', 500, 0.001, False)
    assert (cfg.train_cfg.max_epochs, steps.milestones) == ((12, [8, 11]) if sched == '1x' else (36, [27, 33]))
    # 1x and 3x alike: DAT-Detection's multi-scale resize / crop augmentation
    pipeline_types = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    choice = cfg.train_dataloader.dataset.pipeline[pipeline_types.index('RandomChoice')]
    assert [[t.type for t in policy] for policy in choice.transforms] == [
        ['RandomChoiceResize'], ['RandomChoiceResize', 'RandomCrop', 'RandomChoiceResize']]


# ---------------------------------------------------------------------------------------
# Building and running the models
# ---------------------------------------------------------------------------------------


def model_key(cfg: Config) -> str:
    """The model settings up to the drop-path rate (which 1x / 3x configs change)."""
    model = copy.deepcopy(cfg.model.to_dict())
    model['backbone'].pop('drop_path_rate')
    return repr(model)


_BUILT = {}


def built_model(name: str):
    """The model of config `name`, built once per distinct model (see model_key)."""
    cfg = load(name)
    key = (cfg.default_scope, model_key(cfg))
    if key not in _BUILT:
        from mmengine.registry import MODELS
        init_default_scope(cfg.default_scope)
        model_cfg = copy.deepcopy(cfg.model)
        if cfg.get('data_preprocessor') is not None:  # as the Runner does (mmpretrain)
            model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
        if cfg.default_scope == 'mmseg':
            # mmseg pads every training image to the 512x512 crop; keep the tiny test images tiny
            model_cfg.data_preprocessor.update(size=None, size_divisor=32)
        if model_cfg.get('train_cfg', {}).get('rpn_proposal') is not None:
            # and few proposals (2000 -> 16 per image): the RoI heads' sampler would otherwise
            # run the heads on 512 RoIs per image and stage, seconds per step on CPU
            model_cfg.train_cfg.rpn_proposal.update(nms_pre=64, max_per_img=16)
        torch.manual_seed(0)
        _BUILT.clear()  # keep one model in memory at a time
        _BUILT[key] = (name, MODELS.build(model_cfg))
    return cfg, _BUILT[key]


def det_batch(model, with_mask: bool):
    from mmdet.testing import demo_mm_inputs
    packed = demo_mm_inputs(2, [(3, 64, 96)] * 2, num_items=[2, 3], num_classes=80, with_mask=with_mask)
    return model.data_preprocessor(packed, True)


def seg_batch(model):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for i in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 96), ori_shape=(64, 96), pad_shape=(64, 96)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 64, 96)))
        samples.append(sample)
    images = [torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8) for _ in range(2)]
    return model.data_preprocessor(dict(inputs=images, data_samples=samples), True)


def total_loss(losses: dict) -> torch.Tensor:
    parts = [v if isinstance(v, torch.Tensor) else sum(v) for k, v in losses.items() if 'loss' in k]
    return sum(p.sum() for p in parts)


_RAN = {}  # model key -> the config whose model ran


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_and_runs(name):
    cfg = load(name)
    key = (cfg.default_scope, model_key(cfg))
    if key in _RAN:  # e.g. the 3x config of a 1x one: the same model up to the drop-path rate
        return
    cfg, (_, model) = built_model(name)
    backbone = model.backbone
    assert type(backbone) is mmdat.models.DAT
    torch.manual_seed(0)
    scope = cfg.default_scope
    if scope == 'mmpretrain':
        model.eval()
        with torch.no_grad():
            images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8).float()
            logits = model(model.data_preprocessor(dict(inputs=list(images)), False)['inputs'], mode='tensor')
        assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    else:
        model.train()
        data = det_batch(model, with_mask='mask' in name) if scope == 'mmdet' else seg_batch(model)
        with torch.no_grad():  # the loss step's forward; test_training_step_* runs backward and the update
            losses = model(**data, mode='loss')
        loss = total_loss(losses)
        assert torch.isfinite(loss) and loss > 0
        expected = {'retinanet': {'loss_cls', 'loss_bbox'}, 'mask_rcnn': {'loss_rpn_cls', 'loss_mask'},
                    'cascade_mask_rcnn': {'loss_rpn_cls', 's0.loss_mask', 's2.loss_mask'},
                    'upernet': {'decode.loss_ce', 'aux.loss_ce'},
                    'fpn': {'decode.loss_ce'}}[parse_name(name)['task']]
        assert expected <= set(losses)
    _RAN[key] = name


def cpu_optim_wrapper_cfg(optim_cfg):
    """The config's optimizer wrapper in fp32: MMEngine's AmpOptimWrapper (the configs' fp16,
    as the official Fp16OptimizerHook) refuses to build without an accelerator."""
    optim_cfg = copy.deepcopy(optim_cfg)
    optim_cfg.type = 'OptimWrapper'
    optim_cfg.pop('loss_scale', None)
    return optim_cfg


def weight_decays(model, optim_cfg) -> dict:
    from mmengine.optim import build_optim_wrapper
    optim_wrapper = build_optim_wrapper(model, cpu_optim_wrapper_cfg(optim_cfg))
    decay = {}
    for group in optim_wrapper.optimizer.param_groups:
        for p in group['params']:
            decay[p] = group['weight_decay']
    return optim_wrapper, decay


# upernet_datpp_t_160k first: the last model the test above built, reused
@pytest.mark.parametrize('name', ['upernet_datpp_t_160k.py', 'dat_t_in1k.py', 'mask_rcnn_dat_t_3x.py'])
def test_no_weight_decay_on_tables_and_norms(name):
    """The config's optimizer, as the official one: the deformable-attention position tables,
    v1's window bias tables and every norm of the backbone get no weight decay; DAT++'s
    neighborhood-attention bias (official `rpb`) is decayed."""
    cfg, (_, model) = built_model(name)
    init_default_scope(cfg.default_scope)
    _, decay = weight_decays(model, cfg.optim_wrapper)
    named = dict(model.named_parameters())
    tables = [n for n in named if n.endswith('relative_position_table')]
    bias_tables = [n for n in named if n.endswith('relative_position_bias_table')]
    assert tables and bias_tables and all(decay[named[n]] == 0 for n in tables)
    bias_decay = 0 if parse_name(name)['flavor'] == 'v1' else cfg.optim_wrapper.optimizer.weight_decay
    assert all(decay[named[n]] == bias_decay for n in bias_tables)
    norms = [p for m in model.backbone.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()]
    assert norms and all(decay[p] == 0 for p in norms)  # stem / downsampling norms too (norm_decay_mult)
    assert decay[named['backbone.stages.2.blocks.1.attn.q.weight']] == cfg.optim_wrapper.optimizer.weight_decay


def test_training_step_updates_backbone():
    """One optimizer step of Mask R-CNN DAT-T 3x: gradients flow back into the deformable
    attention (offsets included) and the update changes it."""
    cfg, (_, model) = built_model('mask_rcnn_dat_t_3x.py')  # built by the test above
    init_default_scope(cfg.default_scope)
    optim_wrapper, _ = weight_decays(model, cfg.optim_wrapper)
    model.train()
    torch.manual_seed(0)
    data = det_batch(model, with_mask=True)
    attn = model.backbone.stages[2].blocks[1].attn
    before = attn.q.weight.detach().clone()
    loss = total_loss(model(**data, mode='loss'))
    optim_wrapper.backward(loss)
    assert attn.offset.proj.weight.grad is not None and attn.offset.proj.weight.grad.abs().sum() > 0
    assert attn.relative_position_table.grad.abs().sum() > 0
    optim_wrapper.step()
    assert not torch.equal(before, attn.q.weight)


# ---------------------------------------------------------------------------------------
# mmdat:: inheritance
# ---------------------------------------------------------------------------------------


def _scopes(obj, found):
    if isinstance(obj, dict):
        if '_scope_' in obj:
            found.add(obj['_scope_'])
        for v in obj.values():
            _scopes(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _scopes(v, found)
    return found


def test_downstream_config_inherits_mmdat(tmp_path):
    """A config outside the repository: `_base_ = 'mmdat::mask_rcnn_dat_t_3x.py'` resolves,
    no dict is tagged with an `mmdat` scope, and model, pipeline, optimizer and schedulers
    build with mmdet's registries."""
    from mmengine.dataset import Compose
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, PARAM_SCHEDULERS

    cfg_file = tmp_path / 'my_mask_rcnn.py'
    cfg_file.write_text("_base_ = 'mmdat::mask_rcnn_dat_t_3x.py'\n"
                        "model = dict(backbone=dict(init_cfg=None),\n"
                        "             roi_head=dict(bbox_head=dict(num_classes=3), mask_head=dict(num_classes=3)))\n")
    cfg = Config.fromfile(str(cfg_file))
    local = load('mask_rcnn_dat_t_3x.py')
    assert cfg.model.backbone.arch == local.model.backbone.arch
    assert cfg.train_dataloader.dataset.pipeline == local.train_dataloader.dataset.pipeline
    assert 'mmdat' not in _scopes(cfg.to_dict(), set())
    assert cfg.default_scope == 'mmdet'

    init_default_scope(cfg.default_scope)
    pipeline = Compose(cfg.train_dataloader.dataset.pipeline)  # mmdet transforms (PackDetInputs)
    assert type(pipeline.transforms[-1]).__name__ == 'PackDetInputs'
    # the model, narrowed to keep the test fast, with the downstream change (3 classes)
    small = copy.deepcopy(cfg.model)
    small.backbone.arch = dict(preset='v1-tiny', flavor='pp', key_strides=(1, 1, 2, 1),
                               embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), groups=(0, 0, 2, 4),
                               stage_specs=('LS', 'LS', 'LD', 'LD'))
    small.neck.in_channels = [32, 64, 128, 256]
    detector = MODELS.build(small)
    assert detector.roi_head.bbox_head.num_classes == 3
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'  # fp16 as DAT-Detection; fp32 on this CPU
    optim_wrapper = build_optim_wrapper(detector, cpu_optim_wrapper_cfg(cfg.optim_wrapper))
    assert type(optim_wrapper.optimizer).__name__ == 'AdamW'
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=optim_wrapper, epoch_length=10))
                  for s in copy.deepcopy(cfg.param_scheduler)]
    assert [type(s).__name__ for s in schedulers] == ['LinearLR', 'MultiStepLR']


def test_inconsistent_override_fails_at_build(tmp_path):
    """Bad input stays a clear error: a downstream config whose override makes the backbone
    inconsistent (DAT-T's 12 stage-3 heads in 5 groups) fails when the model is built,
    naming the stage and the fields."""
    from mmengine.registry import MODELS
    cfg_file = tmp_path / 'bad_groups.py'
    cfg_file.write_text("_base_ = 'mmdat::mask_rcnn_dat_t_3x.py'\n"
                        "model = dict(backbone=dict(arch=dict(groups=(0, 0, 5, 6)), init_cfg=None))\n")
    cfg = Config.fromfile(str(cfg_file))
    init_default_scope(cfg.default_scope)
    with pytest.raises(ValueError, match=r'stage 2: deformable attention needs groups >= 1 dividing num_heads 12, '
                                         r'got groups=5'):
        MODELS.build(cfg.model)


def test_mmdat_paths(tmp_path):
    """`mmdat::` bases with a folder, the installed config folder, unknown names."""
    from mmengine.config.utils import MODULE2PACKAGE

    from mmdat.utils.config import MMDAT_CONFIG_DIR, get_config_path
    assert MODULE2PACKAGE['mmdat'] == 'mmdat'
    assert osp.samefile(get_config_path('mmdat::upernet_dat_t_160k.py'),
                        osp.join(CONFIG_DIR, 'upernet_dat_t_160k.py'))
    assert osp.isfile(osp.join(MMDAT_CONFIG_DIR, '_base_', 'dat_v1_dense.py'))

    cfg_file = tmp_path / 'seg.py'
    cfg_file.write_text("_base_ = ['mmdat::_base_/models/upernet_dat.py', 'mmseg::_base_/default_runtime.py']\n"
                        "model = dict(decode_head=dict(num_classes=19), auxiliary_head=dict(num_classes=19))\n")
    cfg = Config.fromfile(str(cfg_file))
    assert cfg.model.backbone.type == 'DAT' and cfg.model.decode_head.num_classes == 19
    assert cfg.model._scope_ == 'mmseg'  # from mmseg's model base, kept

    bad = tmp_path / 'bad.py'
    bad.write_text("_base_ = 'mmdat::no_such_config.py'\n")
    with pytest.raises(FileNotFoundError, match='no_such_config'):
        Config.fromfile(str(bad))


# ---------------------------------------------------------------------------------------
# get_flops.py
# ---------------------------------------------------------------------------------------


def _get_flops_main():
    path = osp.join(REPO, 'tools', 'analysis_tools', 'get_flops.py')
    spec = importlib.util.spec_from_file_location('mmdat_get_flops', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize('name,shape,expected', [
    # the official DAT-T classifier at 224: the paper's 4.6G (4.59G exact) and 28.32M
    ('dat_t_in1k.py', ['224'], dict(flops=4.59, params=28.32)),
    ('retinanet_datpp_t_1x.py', ['64', '96'], None),
    ('fpn_dat_t_80k.py', ['64'], None),
])
def test_get_flops(name, shape, expected, capsys):
    _get_flops_main()([osp.join(CONFIG_DIR, name), '--shape', *shape])
    out = capsys.readouterr().out
    flops = float(re.search(r'^Flops: ([\d.]+)G$', out, re.M).group(1))
    params = float(re.search(r'^Params: ([\d.]+)M$', out, re.M).group(1))
    h, w = (shape * 2)[:2]
    assert f'Input shape: 3x{h}x{w}' in out
    assert flops > 0 and params > 0
    if expected:
        assert (flops, params) == (expected['flops'], expected['params'])
