# DAT-B on ImageNet-1K at 384x384, as the official dat_base_384 of the CVPR 2022 release
# (LeapLabTHU/DAT@566a593 configs/dat_base_384.yaml): the v1 DAT-B with window size 12 and
# position tables built for 384 (stage maps 96, 48, 24, 12), fine-tuned from the 224 model
# for 30 epochs, 192 images per iteration (8 GPUs x 24). Official: lr 2e-6 per 512 images,
# minimum 1e-7 per 512 (cosine, no warmup), weight decay 1e-8, drop path 0.5; test: a square
# resize to 438x438 (int(256 / 224 * 384)) and a 384 centre crop.
# Paper: 88M, 49.8G; top-1 84.8.
_base_ = [
    '_base_/models/dat_in1k.py',
    '_base_/datasets/imagenet_dat_384.py',
    '_base_/schedules/dat_in1k_300e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

# An mmdat-layout 224 checkpoint (tools/model_converters/dat2mmdat.py converts official
# ones): the backbone loader interpolates its position tables to the 384 sizes and the
# classifier head is loaded as it is.
pretrained_224 = 'checkpoints/dat_base_in1k_224_mmdat.pth'
model = dict(
    backbone=dict(
        arch=dict(_delete_=True, preset='v1-base', window_size=12),
        pretrain_img_size=384,
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained_224)),
    head=dict(in_channels=1024,
              init_cfg=dict(_delete_=True, type='Pretrained', checkpoint=pretrained_224, prefix='head.')))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(438, 438), backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=384),
    dict(type='PackInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# 30 epochs for 192 images: lr 2e-6 * 192 / 512, minimum 1e-7 * 192 / 512, no warmup;
# clipping at norm 5 (the official default: dat_base_384.yaml does not set the 224 DAT-B's 1.0).
optim_wrapper = dict(
    optimizer=dict(lr=7.5e-7, weight_decay=1e-8),
    # the keyword 'relative_position_bias_table' (no decay): v1's window attention tables
    paramwise_cfg=dict(custom_keys={'.relative_position_bias_table': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='CosineAnnealingLR', eta_min=3.75e-8, by_epoch=True, begin=0, end=30, convert_to_iter_based=True)
]
train_cfg = dict(max_epochs=30)
auto_scale_lr = dict(base_batch_size=192)
