"""The official recipes, as the official files state them.

Sources (LeapLabTHU on GitHub): DAT-Detection and DAT-Segmentation at their last commit
(4d4023d, fdd2039; DAT++ configs only), DAT at its last commit (32173fc; the DAT++
classification configs) and at 566a593 (the CVPR 2022 release: the v1 classification
configs). Values are in the official terms (the official total batch, lr before any
scaling, the official key names); tests/test_recipes.py translates mmdat's merged configs
into these terms and compares them field by field. mmdat's configs that have no official
recipe (the v1 detection / segmentation ones) name the DAT++ recipe they follow, and
every deliberate difference is listed in MMDAT_CONFIGS with its reason.
"""

# ----------------------------------------------------------------------------- COCO
# configs/_base_/models/*_dat_fpn.py: use_checkpoint=True; configs/dat/*.py: the
# AutoAugment multi-scale pipeline in every config (1x and 3x), AdamW, the paramwise keys,
# the step schedule with a 500-iteration linear warmup from 0.001, `4n` / `8n` nodes of
# 8 GPUs.
_COCO_SCALES = [(s, 1333) for s in range(480, 801, 32)]
COCO_TRAIN = dict(
    flip=0.5,
    policies=[
        [dict(resize=_COCO_SCALES)],
        [dict(resize=[(400, 1333), (500, 1333), (600, 1333)]),
         dict(crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
         dict(resize=_COCO_SCALES)],
    ])
COCO_TEST = dict(scale=(1333, 800), keep_ratio=True, flip=False, size_divisor=32)
_COCO = dict(
    optimizer='AdamW', betas=(0.9, 0.999), weight_decay=0.05,
    no_decay_keys=('absolute_pos_embed', 'relative_position_bias_table', 'rpe_table', 'norm'),
    norm_decay_mult=0.0, grad_clip=None,
    warmup=dict(iters=500, ratio=0.001), with_cp=True, train=COCO_TRAIN, test=COCO_TEST)
_RETINANET_NECK = dict(out_indices=(0, 1, 2, 3), start_level=1, add_extra_convs='on_input', num_outs=5)
_MRCN_NECK = dict(out_indices=(0, 1, 2, 3), start_level=0, add_extra_convs='on_input', num_outs=5)
_CMRCN_NECK = dict(out_indices=(0, 1, 2, 3), start_level=0, add_extra_convs=False, num_outs=5)  # max-pooled P6


def _coco(lr, nodes, per_gpu, epochs, drop_path, fp16, neck):
    return dict(_COCO, lr=lr, images=nodes * 8 * per_gpu, per_gpu=per_gpu, epochs=epochs,
                steps=[8, 11] if epochs == 12 else [27, 33], drop_path=drop_path, fp16=fp16, neck=neck)


OFFICIAL = {
    # DAT-Detection configs/dat/*.py
    'rtn_tiny_1x_4n_dp00_lr2': _coco(2e-4, 4, 2, 12, 0.0, True, _RETINANET_NECK),
    'rtn_tiny_3x_4n_dp02_lr2': _coco(2e-4, 4, 2, 36, 0.2, True, _RETINANET_NECK),
    'rtn_small_1x_4n_dp01_lr2': _coco(2e-4, 4, 2, 12, 0.1, True, _RETINANET_NECK),
    'rtn_small_3x_4n_dp05_lr2': _coco(2e-4, 4, 2, 36, 0.5, True, _RETINANET_NECK),
    'mrcn_tiny_1x_4n_dp00_lr4': _coco(4e-4, 4, 2, 12, 0.0, True, _MRCN_NECK),
    'mrcn_tiny_3x_4n_dp03_lr4': _coco(4e-4, 4, 2, 36, 0.3, True, _MRCN_NECK),
    'mrcn_small_1x_4n_dp01_lr4': _coco(4e-4, 4, 2, 12, 0.1, True, _MRCN_NECK),
    'mrcn_small_3x_4n_dp05_lr4': _coco(4e-4, 4, 2, 36, 0.5, True, _MRCN_NECK),
    'cmrcn_tiny_1x_4n_dp00_lr4': _coco(4e-4, 4, 2, 12, 0.0, True, _CMRCN_NECK),
    'cmrcn_tiny_3x_4n_dp01_lr4': _coco(4e-4, 4, 2, 36, 0.1, True, _CMRCN_NECK),
    # the Cascade S / B 3x configs use OptimizerHook (fp32), not Fp16OptimizerHook
    'cmrcn_small_3x_4n_dp05_lr4': _coco(4e-4, 4, 2, 36, 0.5, False, _CMRCN_NECK),
    'cmrcn_base_3x_8n_dp08_lr4': _coco(4e-4, 8, 1, 36, 0.8, False, _CMRCN_NECK),
}

# ----------------------------------------------------------------------------- ADE20K
# DAT-Segmentation configs/_base_/datasets/ade20k.py (train: Resize (2048, 512) ratio
# 0.5-2.0, RandomCrop 512 cat_max_ratio 0.75, flip 0.5, PhotoMetricDistortion, Pad 512
# with 255 for the labels; test: (2048, 512) keep_ratio, mode 'whole'), tools/test.py
# `--aug-test` (img_ratios 0.5-1.75 of the test scale, flip), configs/dat/*.py.
ADE_TRAIN = dict(scale=(2048, 512), ratio_range=(0.5, 2.0), crop_size=(512, 512), cat_max_ratio=0.75, flip=0.5,
                 photometric=True, seg_pad_val=255)
ADE_TEST = dict(scale=(2048, 512), keep_ratio=True, mode='whole',
                aug_test_ratios=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75], aug_test_flip=True)
_ADE = dict(
    optimizer='AdamW', betas=(0.9, 0.999),
    # paramwise_cfg=dict(custom_keys=...) only: no norm_decay_mult, so the heads' SyncBN are decayed
    no_decay_keys=('absolute_pos_embed', 'relative_position_bias_table', 'rpe_table', 'norm'),
    norm_decay_mult=None, grad_clip=None, train=ADE_TRAIN, test=ADE_TEST)
_UPERNET = dict(_ADE, lr=6e-5, weight_decay=0.01, images=16, per_gpu=2, iters=160000,
                poly=dict(power=1.0, min_lr=0.0, warmup_iters=1500, warmup_ratio=1e-6), with_cp=True)
# gpu_multiples = 2: "lr*2 and max_iters/2" of the PVT 80k x 16-image schedule, on 8 GPUs x 4
_FPN = dict(_ADE, lr=2e-4, weight_decay=1e-4, images=32, per_gpu=4, iters=40000,
            poly=dict(power=0.9, min_lr=0.0, warmup_iters=0), with_cp=False, fp16=False)
OFFICIAL.update({
    'upn_tiny_160k_dp03_lr6': dict(_UPERNET, drop_path=0.3, fp16=True),
    'upn_small_160k_dp05_lr6': dict(_UPERNET, drop_path=0.5, fp16=True),
    'upn_base_160k_dp07_lr6': dict(_UPERNET, drop_path=0.7, fp16=False),  # OptimizerHook
    'fpn_tiny_80k_dp04_lr2': dict(_FPN, drop_path=0.4),
    'fpn_small_80k_dp04_lr2': dict(_FPN, drop_path=0.4),
    'fpn_base_80k_dp07_lr2': dict(_FPN, drop_path=0.7),
})

# ----------------------------------------------------------------------------- ImageNet
# DAT config.py defaults (the Swin ones), main.py (lr, warmup lr and minimum lr scale with
# total batch / 512), lr_scheduler.py (timm CosineLRScheduler: t_initial = all steps,
# warmup_t inside them, per iteration), optimizer.py (no decay: 1-d, '.bias', keywords),
# data/build.py (test: TEST.CROP -> square resize to int(256 / 224 * size), centre crop),
# train.sh (`--amp`). 8 GPUs of BATCH_SIZE images, as the README's `train.sh 8`.
_IN1K = dict(
    optimizer='AdamW', betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, lr_per_512=5e-4, warmup_lr_per_512=5e-7,
    min_lr_per_512=5e-6, warmup_epochs=20, epochs=300, grad_clip=5.0, amp=True, with_cp=False, gpus=8,
    no_decay_keywords=('relative_position_bias_table', 'rpe_table'), label_smoothing=0.1,
    mixup=0.8, cutmix=1.0, randaugment=dict(magnitude=9, std=0.5, increasing=True), erasing=0.25,
    img_size=224, test_crop=True, model_img_size=224, window_size=7)
OFFICIAL.update({
    # LeapLabTHU/DAT@566a593 configs/*.yaml (v1)
    'v1 dat_tiny.yaml': dict(_IN1K, per_gpu=128, drop_path=0.2),
    'v1 dat_small.yaml': dict(_IN1K, per_gpu=128, drop_path=0.3),
    'v1 dat_base.yaml': dict(_IN1K, per_gpu=128, drop_path=0.5, lr_per_512=4e-4, warmup_epochs=50, grad_clip=1.0),
    'v1 dat_base_384.yaml': dict(_IN1K, per_gpu=24, drop_path=0.5, lr_per_512=2e-6, min_lr_per_512=1e-7,
                                 warmup_epochs=0, weight_decay=1e-8, epochs=30, img_size=384,
                                 model_img_size=384, window_size=12),
    # LeapLabTHU/DAT@32173fc configs/*.yaml (DAT++)
    'pp dat_tiny.yaml': dict(_IN1K, per_gpu=128, drop_path=0.2),
    'pp dat_small.yaml': dict(_IN1K, per_gpu=128, drop_path=0.4),
    'pp dat_base.yaml': dict(_IN1K, per_gpu=64, drop_path=0.7),
    # img_size 224: the model (its position tables) as at 224; DATA.IMG_SIZE 384, TEST.CROP False
    'pp dat_base_384.yaml': dict(_IN1K, per_gpu=24, drop_path=0.6, lr_per_512=2e-5, warmup_lr_per_512=2e-8,
                                 min_lr_per_512=2e-7, warmup_epochs=0, weight_decay=1e-8, epochs=30,
                                 img_size=384, test_crop=False),
})

# ----------------------------------------------------------------------------- mmdat's configs
# recipe: the official entry above; v1_dense: a v1 detection / segmentation config (no
# official recipe: the DAT++ recipe of the same detector / head, size and schedule, and
# the official key 'relative_position_bias_table' then names the v1 window tables);
# differs: the fields where mmdat's config deliberately departs from that recipe, and why.
_V1_MRCN = dict(neck=dict(_MRCN_NECK, add_extra_convs=False))  # the v1 paper's 48M / 69M count a max-pooled P6
MMDAT_CONFIGS = {}
for _fam in ('dat', 'datpp'):
    _v1 = _fam == 'dat'
    for _s, _size in (('t', 'tiny'), ('s', 'small')):
        for _sch in ('1x', '3x'):
            _dp = {('t', '1x'): '00', ('t', '3x'): '02', ('s', '1x'): '01', ('s', '3x'): '05'}[(_s, _sch)]
            MMDAT_CONFIGS[f'retinanet_{_fam}_{_s}_{_sch}'] = dict(recipe=f'rtn_{_size}_{_sch}_4n_dp{_dp}_lr2', v1_dense=_v1)
            _dp = {('t', '1x'): '00', ('t', '3x'): '03', ('s', '1x'): '01', ('s', '3x'): '05'}[(_s, _sch)]
            MMDAT_CONFIGS[f'mask_rcnn_{_fam}_{_s}_{_sch}'] = dict(
                recipe=f'mrcn_{_size}_{_sch}_4n_dp{_dp}_lr4', v1_dense=_v1, differs=_V1_MRCN if _v1 else {})
    for _name, _recipe in (('t_1x', 'cmrcn_tiny_1x_4n_dp00_lr4'), ('t_3x', 'cmrcn_tiny_3x_4n_dp01_lr4'),
                           ('s_3x', 'cmrcn_small_3x_4n_dp05_lr4'), ('b_3x', 'cmrcn_base_3x_8n_dp08_lr4')):
        MMDAT_CONFIGS[f'cascade_mask_rcnn_{_fam}_{_name}'] = dict(recipe=_recipe, v1_dense=_v1)
    for _s, _size, _upn, _fpn in (('t', 'tiny', '03', '04'), ('s', 'small', '05', '04'), ('b', 'base', '07', '07')):
        MMDAT_CONFIGS[f'upernet_{_fam}_{_s}_160k'] = dict(recipe=f'upn_{_size}_160k_dp{_upn}_lr6', v1_dense=_v1)
        MMDAT_CONFIGS[f'fpn_{_fam}_{_s}_80k'] = dict(recipe=f'fpn_{_size}_80k_dp{_fpn}_lr2', v1_dense=_v1)
        _flavor = 'v1' if _v1 else 'pp'
        MMDAT_CONFIGS[f'{_fam}_{_s}_in1k'] = dict(recipe=f'{_flavor} dat_{_size}.yaml', v1_dense=False)
MMDAT_CONFIGS['dat_b_in1k_384'] = dict(recipe='v1 dat_base_384.yaml', v1_dense=False)
MMDAT_CONFIGS['datpp_b_in1k_384'] = dict(recipe='pp dat_base_384.yaml', v1_dense=False)
