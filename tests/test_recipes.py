"""Every paper config's merged recipe against the official one (tests/data/official_recipes.py):
optimizer, weight-decay rules, schedule, batch, precision, activation checkpointing, drop
path, the train / test pipelines' scales and the neck, field by field, so that a drift fails."""
import copy
import math
import os.path as osp
import sys

import pytest
import test_configs  # noqa: E402
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmdat  # noqa: F401

from conftest import REPO, fixtures_dir

sys.path.insert(0, osp.join(REPO, 'tests', 'data'))
from official_recipes import MMDAT_CONFIGS, OFFICIAL  # noqa: E402

CONFIG_DIR = osp.join(REPO, 'configs')
GPUS = 8  # every config's batch is for 8 GPUs


def _load(name: str) -> Config:
    return test_configs._load(f'{name}.py')  # parsed once per session, shared with test_configs.py


def load(name: str) -> Config:
    return copy.deepcopy(_load(name))


def official(name: str) -> dict:
    entry = MMDAT_CONFIGS[name]
    recipe = copy.deepcopy(OFFICIAL[entry['recipe']])
    for key, value in entry.get('differs', {}).items():
        recipe[key] = value
    return recipe


def task(name: str) -> str:
    return 'cls' if 'in1k' in name else ('seg' if name.startswith(('upernet', 'fpn')) else 'det')


def test_every_config_has_an_official_entry():
    assert sorted(f'{name}.py' for name in MMDAT_CONFIGS) == test_configs.CONFIGS


def _transforms(pipeline, type_):
    return [t for t in pipeline if t['type'] == type_]


def _check_precision(cfg, fp16: bool):
    wrapper = cfg.optim_wrapper
    if fp16:  # Fp16OptimizerHook(loss_scale='dynamic') / torch.cuda.amp with a GradScaler
        assert wrapper.type == 'AmpOptimWrapper' and wrapper.get('loss_scale', 'dynamic') == 'dynamic'
    else:
        assert wrapper.type == 'OptimWrapper'


@pytest.mark.parametrize('name', sorted(n for n in MMDAT_CONFIGS if task(n) == 'det'))
def test_coco_recipe(name):
    cfg, ref = load(name), official(name)
    opt = cfg.optim_wrapper.optimizer
    batch = cfg.train_dataloader.batch_size
    assert batch == ref['per_gpu']
    assert math.isclose(opt.lr / (GPUS * batch), ref['lr'] / ref['images'])  # the linear lr scaling
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=GPUS * batch)
    assert (opt.type, tuple(opt.betas), opt.weight_decay) == (ref['optimizer'], ref['betas'], ref['weight_decay'])
    assert 'momentum' not in opt
    assert cfg.optim_wrapper.get('clip_grad') == ref['grad_clip']
    _check_precision(cfg, ref['fp16'])
    backbone = cfg.model.backbone
    assert (backbone.with_cp, backbone.drop_path_rate) == (ref['with_cp'], ref['drop_path'])

    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.by_epoch, warmup.begin, warmup.end, warmup.start_factor) == (
        'LinearLR', False, 0, ref['warmup']['iters'], ref['warmup']['ratio'])
    assert (steps.type, steps.by_epoch, steps.milestones, steps.gamma) == ('MultiStepLR', True, ref['steps'], 0.1)
    assert cfg.train_cfg.max_epochs == ref['epochs'] == steps.end

    neck = cfg.model.neck
    assert tuple(backbone.out_indices) == ref['neck']['out_indices']
    assert (neck.get('start_level', 0), neck.get('add_extra_convs', False), neck.num_outs) == (
        ref['neck']['start_level'], ref['neck']['add_extra_convs'], ref['neck']['num_outs'])
    assert len(neck.in_channels) == len(ref['neck']['out_indices'])

    pipeline = cfg.train_dataloader.dataset.pipeline
    assert [t.prob for t in _transforms(pipeline, 'RandomFlip')] == [ref['train']['flip']]
    (choice, ) = _transforms(pipeline, 'RandomChoice')
    policies = []
    for policy in choice.transforms:
        steps_ = []
        for t in policy:
            if t.type == 'RandomChoiceResize':
                assert t.keep_ratio
                steps_.append(dict(resize=[tuple(s) for s in t.scales]))
            else:
                assert t.type == 'RandomCrop'
                steps_.append(dict(crop_type=t.crop_type, crop_size=tuple(t.crop_size),
                                   allow_negative_crop=t.allow_negative_crop))
        policies.append(steps_)
    assert policies == ref['train']['policies']
    assert not _transforms(pipeline, 'Resize')  # no single-scale resize besides the policies

    test = cfg.test_dataloader.dataset.pipeline
    (resize, ) = _transforms(test, 'Resize')
    assert (tuple(resize.scale), resize.keep_ratio) == (ref['test']['scale'], ref['test']['keep_ratio'])
    assert bool(_transforms(test, 'RandomFlip')) == ref['test']['flip']
    assert cfg.model.data_preprocessor.pad_size_divisor == ref['test']['size_divisor']


@pytest.mark.parametrize('name', sorted(n for n in MMDAT_CONFIGS if task(n) == 'seg'))
def test_ade20k_recipe(name):
    cfg, ref = load(name), official(name)
    opt = cfg.optim_wrapper.optimizer
    batch = cfg.train_dataloader.batch_size
    assert batch == ref['per_gpu'] and GPUS * batch == ref['images']
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=ref['images'])
    assert (opt.type, opt.lr, tuple(opt.betas), opt.weight_decay) == (
        ref['optimizer'], ref['lr'], ref['betas'], ref['weight_decay'])
    assert 'momentum' not in opt and cfg.optim_wrapper.get('clip_grad') == ref['grad_clip']
    _check_precision(cfg, ref['fp16'])
    backbone = cfg.model.backbone
    assert (backbone.with_cp, backbone.drop_path_rate) == (ref['with_cp'], ref['drop_path'])

    # mmcv 1.x: the poly lr over all iterations, the warmup factor applied on top of it
    poly = ref['poly']
    *warmup, decay = cfg.param_scheduler
    assert (decay.type, decay.power, decay.eta_min, decay.begin, decay.end, decay.by_epoch) == (
        'PolyLR', poly['power'], poly['min_lr'], 0, ref['iters'], False)
    if poly['warmup_iters']:
        (w, ) = warmup
        assert (w.type, w.start_factor, w.begin, w.end, w.by_epoch) == (
            'LinearLR', poly['warmup_ratio'], 0, poly['warmup_iters'], False)
    else:
        assert not warmup
    assert cfg.train_cfg.max_iters == ref['iters']

    train = cfg.train_dataloader.dataset.pipeline
    (resize, ) = _transforms(train, 'RandomResize')
    assert (tuple(resize.scale), tuple(resize.ratio_range), resize.keep_ratio) == (
        ref['train']['scale'], ref['train']['ratio_range'], True)
    (crop, ) = _transforms(train, 'RandomCrop')
    assert (tuple(crop.crop_size), crop.cat_max_ratio) == (ref['train']['crop_size'], ref['train']['cat_max_ratio'])
    assert [t.prob for t in _transforms(train, 'RandomFlip')] == [ref['train']['flip']]
    assert bool(_transforms(train, 'PhotoMetricDistortion')) == ref['train']['photometric']
    pre = cfg.model.data_preprocessor
    assert (tuple(pre.size), pre.seg_pad_val) == (ref['train']['crop_size'], ref['train']['seg_pad_val'])

    test = cfg.test_dataloader.dataset.pipeline
    (resize, ) = _transforms(test, 'Resize')
    assert (tuple(resize.scale), resize.keep_ratio) == (ref['test']['scale'], ref['test']['keep_ratio'])
    assert cfg.model.test_cfg.mode == ref['test']['mode']
    # `--tta`: mmseg 0.x's MultiScaleFlipAug(img_scale, img_ratios, flip) scales
    (aug, ) = _transforms(cfg.tta_pipeline, 'TestTimeAug')
    resizes, flips = aug.transforms[0], aug.transforms[1]
    w, h = ref['test']['scale']
    assert [(tuple(t.scale), t.keep_ratio) for t in resizes] == [
        ((int(w * r), int(h * r)), True) for r in ref['test']['aug_test_ratios']]
    assert all('scale_factor' not in t for t in resizes)
    assert [t.prob for t in flips] == ([0., 1.] if ref['test']['aug_test_flip'] else [0.])


@pytest.mark.parametrize('name', sorted(n for n in MMDAT_CONFIGS if task(n) == 'cls'))
def test_imagenet_recipe(name):
    cfg, ref = load(name), official(name)
    opt = cfg.optim_wrapper.optimizer
    batch = cfg.train_dataloader.batch_size
    total = ref['gpus'] * ref['per_gpu']
    assert batch == ref['per_gpu'] and cfg.auto_scale_lr.base_batch_size == total
    scale = total / 512  # main.py: lr, warmup lr and minimum lr all scale with the batch
    assert math.isclose(opt.lr, ref['lr_per_512'] * scale)
    assert (opt.type, tuple(opt.betas), opt.eps, opt.weight_decay) == (
        ref['optimizer'], ref['betas'], ref['eps'], ref['weight_decay'])
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=ref['grad_clip'])
    _check_precision(cfg, ref['amp'])
    backbone = cfg.model.backbone
    assert (backbone.get('with_cp', False), backbone.drop_path_rate) == (ref['with_cp'], ref['drop_path'])
    assert backbone.pretrain_img_size == ref['model_img_size']
    arch = backbone.arch if isinstance(backbone.arch, dict) else {}
    assert arch.get('window_size', 7) == ref['window_size']

    *warmup, cosine = cfg.param_scheduler
    # timm's CosineLRScheduler (warmup_prefix False): the cosine runs over all epochs
    assert (cosine.type, cosine.begin, cosine.end, cosine.by_epoch, cosine.convert_to_iter_based) == (
        'CosineAnnealingLR', 0, ref['epochs'], True, True)
    assert math.isclose(cosine.eta_min, ref['min_lr_per_512'] * scale)
    if ref['warmup_epochs']:
        (w, ) = warmup
        assert (w.type, w.begin, w.end, w.by_epoch, w.convert_to_iter_based) == (
            'LinearLR', 0, ref['warmup_epochs'], True, True)
        assert math.isclose(w.start_factor, ref['warmup_lr_per_512'] / ref['lr_per_512'])
    else:
        assert not warmup
    assert cfg.train_cfg.max_epochs == ref['epochs']

    assert cfg.model.head.loss == dict(type='LabelSmoothLoss', label_smooth_val=ref['label_smoothing'], mode='original')
    assert cfg.model.train_cfg.augments == [dict(type='Mixup', alpha=ref['mixup']),
                                            dict(type='CutMix', alpha=ref['cutmix'])]
    train = cfg.train_dataloader.dataset.pipeline
    (crop, ) = _transforms(train, 'RandomResizedCrop')
    assert (crop.scale, crop.interpolation) == (ref['img_size'], 'bicubic')
    (rand, ) = _transforms(train, 'RandAugment')
    assert (rand.magnitude_level, rand.magnitude_std, rand.num_policies, rand.policies) == (
        ref['randaugment']['magnitude'], ref['randaugment']['std'], 2, 'timm_increasing')
    (erase, ) = _transforms(train, 'RandomErasing')
    assert (erase.erase_prob, erase.mode) == (ref['erasing'], 'rand')

    test = cfg.test_dataloader.dataset.pipeline
    (resize, ) = _transforms(test, 'Resize')
    side = int(256 / 224 * ref['img_size']) if ref['test_crop'] else ref['img_size']
    assert (tuple(resize.scale), resize.interpolation) == ((side, side), 'bicubic')  # a square resize
    crops = _transforms(test, 'CenterCrop')
    assert [c.crop_size for c in crops] == ([ref['img_size']] if ref['test_crop'] else [])
    assert not _transforms(test, 'ResizeEdge')


# ----------------------------------------------------------------------------- weight decay
# Which parameters are decayed, by the official rule on the official names. The official
# names come from the shared parity fixtures (official state dicts of small models with
# the published block types): mmdat's converter maps them onto mmdat's names.

_FIXTURE = {'det': 'v1_nano_det_224x288.pth', 'cls': 'v1_nano_cls_224.pth', 'pp': 'pp_nano_det_256x320.pth'}


def _official_names(fixture):
    """mmdat backbone parameter name -> official name, for the fixture's official state dict."""
    from mmdat.models.backbones.dat_checkpoint import _convert_key
    sd = fixture['state_dict']
    v1_stem = sd['patch_proj.0.weight'].shape[-1] == 4
    names = {_convert_key(key, v1_stem): key for key in sd}
    names.pop(None, None)  # buffers mmdat recomputes
    return names


def _decay_groups():
    """One representative config per distinct (model, decay rules) pair."""
    groups = {}
    for name in sorted(MMDAT_CONFIGS):
        cfg = _load(name)
        kind = task(name)
        flavor = 'v1' if name.startswith('dat_') or '_dat_' in name else 'pp'
        model_type = cfg.model.type + ('+' + cfg.model.decode_head.type if 'decode_head' in cfg.model else '')
        key = (kind, flavor, model_type, repr(cfg.optim_wrapper.paramwise_cfg))
        groups.setdefault(key, name)
    return sorted(groups.values())


def _nano_model(cfg, kind, flavor):
    from mmengine.registry import MODELS

    from mmdat.models.backbones.dat_checkpoint import official_arch
    fixture_name = _FIXTURE['pp' if flavor == 'pp' else ('cls' if kind == 'cls' else 'det')]
    path = osp.join(fixtures_dir(), fixture_name)
    if not osp.isfile(path):
        pytest.skip(f'no parity fixture {path}')
    fixture = torch.load(path, map_location='cpu', weights_only=True)
    arch = official_arch(fixture['config'], fixture['flavor'])
    dims = list(arch['arch']['embed_dims'])
    model = copy.deepcopy(cfg.model)
    model.backbone.arch = arch['arch']  # replaced, not merged
    model.backbone.pretrain_img_size = arch['pretrain_img_size']
    model.backbone.init_cfg = None
    if kind == 'cls':
        model.backbone.out_indices = (3, )
        model.head.in_channels = dims[3]
    elif 'decode_head' in model and model.decode_head.type == 'UPerHead':
        model.decode_head.in_channels = dims
        model.auxiliary_head.in_channels = dims[2]
    else:
        model.neck.in_channels = [dims[i] for i in model.backbone.out_indices]
    init_default_scope(cfg.default_scope)
    return MODELS.build(model), fixture


def _official_decay(ref, kind, official_name, param, module):
    from mmengine.utils.dl_utils.parrots_wrapper import _BatchNorm, _InstanceNorm
    from torch.nn import GroupNorm, LayerNorm
    if kind == 'cls':  # optimizer.py: set_weight_decay_and_lr
        exempt = (param.dim() == 1 or official_name.endswith('.bias')
                  or any(k in official_name for k in ref['no_decay_keywords']))
        return 0. if exempt else 1.
    # mmcv 1.x DefaultOptimizerConstructor: custom keys (substrings of the full name) first
    if any(k in official_name for k in ref['no_decay_keys']):
        return 0.
    if ref['norm_decay_mult'] is not None and isinstance(module, (_BatchNorm, _InstanceNorm, GroupNorm, LayerNorm)):
        return ref['norm_decay_mult']
    return 1.


@pytest.mark.parametrize('name', _decay_groups())
def test_weight_decay_as_official(name):
    """Every parameter of the config's model (backbone narrowed to the fixture's size) is
    decayed exactly where the official recipe decays it: e.g. DAT++'s neighborhood-attention
    bias (`rpb`) and the segmentation heads' SyncBN are, the deformable-attention tables,
    v1's window tables and every LayerNorm are not."""
    from mmengine.optim import build_optim_wrapper
    cfg, ref, kind = load(name), official(name), task(name)
    flavor = 'v1' if name.startswith('dat_') or '_dat_' in name else 'pp'
    model, fixture = _nano_model(cfg, kind, flavor)
    names = _official_names(fixture)
    optim_cfg = copy.deepcopy(cfg.optim_wrapper)
    optim_cfg.type = 'OptimWrapper'  # AmpOptimWrapper needs an accelerator; the groups are the same
    optim_cfg.pop('loss_scale', None)
    wrapper = build_optim_wrapper(model, optim_cfg)
    base = optim_cfg.optimizer.weight_decay
    ours = {id(p): g['weight_decay'] / base for g in wrapper.optimizer.param_groups for p in g['params']}
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    checked, differ = 0, []
    prefix = '' if kind == 'cls' else 'backbone.'
    for full_name, p in model.named_parameters():
        if full_name.startswith('backbone.'):
            official_name = names.get(full_name[len('backbone.'):])
            assert official_name is not None, f'{full_name}: no official counterpart in {_FIXTURE}'
            official_name = prefix + official_name
        elif kind == 'cls':
            official_name = {'head.fc.weight': 'cls_head.weight', 'head.fc.bias': 'cls_head.bias'}[full_name]
        else:  # neck and heads: the same mmdet / mmseg modules under the same names
            official_name = full_name
        expected = _official_decay(ref, kind, official_name, p, owner[id(p)])
        checked += 1
        if ours[id(p)] != expected:
            differ.append(f'{full_name} ({official_name}): {ours[id(p)]} vs official {expected}')
    assert checked > 50 and not differ, '\n'.join(differ)
    # the rules above reach the parameters they are about
    named = dict(model.named_parameters())
    if flavor == 'pp':
        rpb = [n for n in named if n.endswith('attn.relative_position_bias_table')]
        assert rpb and all(ours[id(named[n])] == 1. for n in rpb)  # neighborhood attention: decayed
    if kind == 'seg':
        bn = [p for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              for p in m.parameters()]
        assert bn and all(ours[id(p)] == 1. for p in bn)
