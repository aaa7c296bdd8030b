"""DINO (mmdet) and Mask2Former (mmseg) with DAT: the four configs build at their real
size with the recipes' parameter groups reaching DAT; DAT-T++'s, shrunk to a nano width on
the demo's shapes data, train (the loss is finite and falls from the first iteration to the
second on one fixed batch) and evaluate (COCO bbox mAP, mIoU), for both flavours."""
import copy
import functools
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from conftest import NANO_PP, NANO_V1, REPO

CONFIGS = {
    'dino_datpp_t_1x': ('mmdet', (128, 256, 512)),
    'dino_dat_t_1x': ('mmdet', (192, 384, 768)),
    'mask2former_datpp_t_160k': ('mmseg', (64, 128, 256, 512)),
    'mask2former_dat_t_160k': ('mmseg', (96, 192, 384, 768)),
}
ITERS = 2
WIDTH = 64  # transformer width of the shrunk heads
CLASSES = ('circle', 'square', 'triangle')


@functools.lru_cache(maxsize=None)
def _parse(name: str) -> Config:
    import mmdat  # noqa: F401  (`mmdet::` / `mmseg::` bases resolve after it)
    return Config.fromfile(osp.join(REPO, 'configs', f'{name}.py'))


def _load(name: str) -> Config:
    """The config ``configs/<name>.py`` (parsed once; a copy: the tests change it)."""
    return copy.deepcopy(_parse(name))


def _build(cfg: Config):
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(cfg.default_scope)
    return MODELS.build(cfg.model)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_config_builds_with_the_recipe_reaching_dat(name):
    """The model builds at its real size with the backbone's stages feeding the head, and the
    recipe's parameter groups reach DAT's own names: no weight decay on its norms and
    position tables; Mask2Former's backbone at lr x0.1 throughout (norms included), DINO's
    at the full lr (the backbone's own rule, as in the other COCO configs)."""
    from mmengine.optim import build_optim_wrapper
    scope, channels = CONFIGS[name]
    cfg = _load(name)
    assert cfg.default_scope == scope and 'mmdat' in cfg.custom_imports['imports']
    model = _build(cfg)
    backbone = model.backbone
    assert type(backbone).__name__ == 'DAT'
    assert backbone.arch_settings['flavor'] == 'pp'  # v1 specs with the dense formulas, as all dense configs
    assert tuple(backbone.arch_settings['embed_dims'][i] for i in backbone.out_indices) == channels
    if scope == 'mmdet':
        assert type(model).__name__ == 'DINO' and model.num_feature_levels == 4
        assert backbone.out_indices == (1, 2, 3) and tuple(cfg.model.neck.in_channels) == channels
        assert cfg.model.neck.num_outs == 4 and cfg.train_cfg.max_epochs == 12
    else:
        assert type(model.decode_head).__name__ == 'Mask2FormerHead'
        assert tuple(cfg.model.decode_head.in_channels) == channels and cfg.train_cfg.max_iters == 160000

    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    base_lr, base_wd = cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay
    groups = {id(p): g for g in optim.optimizer.param_groups for p in g['params']}
    backbone_lr = base_lr * (0.1 if scope == 'mmseg' else 1.0)
    seen = {'norm': 0, 'table': 0, 'weight': 0}
    for pname, p in backbone.named_parameters():
        module = backbone.get_submodule(pname.rsplit('.', 1)[0])
        kind = ('norm' if isinstance(module, torch.nn.LayerNorm) else
                'table' if 'position' in pname else 'weight' if p.dim() > 1 else None)
        if kind is None:
            continue
        seen[kind] += 1
        g = groups[id(p)]
        assert math.isclose(g['lr'], backbone_lr), (pname, g['lr'])
        assert math.isclose(g['weight_decay'], 0.0 if kind != 'weight' else base_wd), (pname, g['weight_decay'])
    assert all(seen.values()), seen


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    from mmdat.datasets.shapes import make_shapes_dataset
    root = str(tmp_path_factory.mktemp('data') / 'shapes')
    return make_shapes_dataset(root, num_train=2, num_val=2, num_cls_train=3, num_cls_val=3)


def _nano_dino(cfg: Config, root: str, arch: dict) -> Config:
    # mmdet 3.3's DINO decoder encodes its reference points at 128 features per coordinate
    # (a fixed 2 x 256): the transformer keeps its width of 256, with fewer layers and queries
    root = root.rstrip('/') + '/'
    cfg.merge_from_dict(dict(model=dict(
        num_queries=30,
        backbone=dict(arch=dict(arch, _delete_=True), init_cfg=None),
        neck=dict(in_channels=list(arch['embed_dims'][1:])),
        encoder=dict(num_layers=1, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=256))),
        decoder=dict(num_layers=2, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=256))),
        bbox_head=dict(num_classes=len(CLASSES)),
        dn_cfg=dict(group_cfg=dict(num_dn_queries=10)),
        test_cfg=dict(max_per_img=20))))
    pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
                dict(type='Resize', scale=(128, 128), keep_ratio=True), dict(type='PackDetInputs')]
    data = dict(data_root=root, metainfo=dict(classes=CLASSES), data_prefix=dict(img='images/'))
    cfg.train_dataloader = dict(
        batch_size=2, num_workers=0, persistent_workers=False, sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=dict(type='CocoDataset', ann_file='annotations/instances_train.json', pipeline=pipeline, **data))
    cfg.val_dataloader = dict(
        batch_size=2, num_workers=0, persistent_workers=False,
        sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=dict(type='CocoDataset', ann_file='annotations/instances_val.json', test_mode=True,
                     pipeline=pipeline, **data))
    cfg.val_evaluator = dict(type='CocoMetric', ann_file=root + 'annotations/instances_val.json', metric='bbox')
    return cfg


def _nano_mask2former(cfg: Config, root: str, arch: dict) -> Config:
    layer = dict(embed_dims=WIDTH, num_heads=4)
    ffn = dict(embed_dims=WIDTH, feedforward_channels=2 * WIDTH)
    num_classes = 4  # background + the three shapes (the demo keeps the background as a class)
    cfg.merge_from_dict(dict(model=dict(
        data_preprocessor=dict(size=(128, 128)),
        backbone=dict(arch=dict(arch, _delete_=True), init_cfg=None),
        decode_head=dict(
            in_channels=list(arch['embed_dims']), feat_channels=WIDTH, out_channels=WIDTH, num_queries=20,
            num_classes=num_classes,
            pixel_decoder=dict(encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=layer, ffn_cfg=ffn)),
                               positional_encoding=dict(num_feats=WIDTH // 2)),
            positional_encoding=dict(num_feats=WIDTH // 2),
            transformer_decoder=dict(num_layers=3, layer_cfg=dict(self_attn_cfg=layer, cross_attn_cfg=layer,
                                                                  ffn_cfg=ffn)),
            loss_cls=dict(class_weight=[1.0] * num_classes + [0.1]),
            train_cfg=dict(num_points=1024)))))
    pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'), dict(type='PackSegInputs')]
    data = dict(type='BaseSegDataset', data_root=root, reduce_zero_label=False, img_suffix='.jpg',
                seg_map_suffix='.png', pipeline=pipeline,
                metainfo=dict(classes=('background', ) + CLASSES, palette=[(0, 0, 0)] * num_classes))
    cfg.train_dataloader = dict(
        batch_size=2, num_workers=0, persistent_workers=False, sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=dict(data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'), **data))
    cfg.val_dataloader = dict(
        batch_size=1, num_workers=0, persistent_workers=False, sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=dict(data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'), **data))
    return cfg


def _train_and_evaluate(cfg: Config, work_dir: str, lr: float, iters: int = ITERS):
    from mmengine.runner import Runner
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=iters)  # one evaluation, at the end
    cfg.param_scheduler = None
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.optim_wrapper.optimizer.foreach = True  # the recipe's AdamW, one multi-tensor update (CPU default: a loop)
    cfg.default_hooks = dict(cfg.default_hooks, checkpoint=None, logger=dict(type='LoggerHook', interval=1))
    cfg.log_processor = dict(by_epoch=False, window_size=1)
    cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None
    cfg.randomness = dict(seed=0)
    cfg.load_from = cfg.resume = None
    runner = Runner.from_cfg(cfg)
    runner.train()
    hub = runner.message_hub
    losses = [float(v) for v in hub.get_scalar('train/loss').data[0]]
    metrics = {k[len('val/'):]: v.current() for k, v in hub.log_scalars.items() if k.startswith('val/')}
    return losses, metrics


def _assert_learns(losses):
    assert len(losses) == ITERS and all(math.isfinite(v) for v in losses), losses
    # one fixed batch: the second iteration's loss is below the first's
    assert max(losses[1:]) < losses[0], losses


NANO = [pytest.param('datpp', NANO_PP, id='pp'), pytest.param('dat', NANO_V1, id='v1')]


@pytest.mark.parametrize('flavour,arch', NANO)
def test_dino_trains_and_evaluates_on_the_demo_data(shapes, tmp_path, flavour, arch):
    cfg = _nano_dino(_load(f'dino_{flavour}_t_1x'), shapes, arch)
    losses, metrics = _train_and_evaluate(cfg, str(tmp_path), lr=1e-3)
    _assert_learns(losses)
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0, metrics


@pytest.mark.parametrize('flavour,arch', NANO)
def test_mask2former_trains_and_evaluates_on_the_demo_data(shapes, tmp_path, flavour, arch):
    cfg = _nano_mask2former(_load(f'mask2former_{flavour}_t_160k'), shapes, arch)
    losses, metrics = _train_and_evaluate(cfg, str(tmp_path), lr=1e-3)
    _assert_learns(losses)
    assert 0.0 <= metrics['mIoU'] <= 100.0, metrics
