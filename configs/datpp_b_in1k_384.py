# DAT-B++ on ImageNet-1K at 384x384, as the official dat_base_384 (LeapLabTHU/DAT
# configs/dat_base_384.yaml): DAT-B++ as at 224 (position tables built for 224, `img_size:
# 224`; the bias is sampled at any size), fine-tuned from the 224 model for 30 epochs, 192
# images per iteration (8 GPUs x 24). Official: lr 2e-5 per 512 images, minimum 2e-7 per
# 512 (cosine, no warmup), weight decay 1e-8, drop path 0.6; test: a square resize to
# 384x384, no crop (TEST.CROP False).
# DAT++ paper / DAT README: 49.7G; top-1 85.9.
_base_ = [
    '_base_/models/dat_in1k.py',
    '_base_/datasets/imagenet_dat_384.py',
    '_base_/schedules/dat_in1k_300e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

# An mmdat-layout 224 checkpoint (tools/model_converters/dat2mmdat.py converts official
# ones), its classifier head included.
pretrained_224 = 'checkpoints/dat_pp_base_in1k_224_mmdat.pth'
model = dict(
    backbone=dict(arch='pp-base', drop_path_rate=0.6, init_cfg=dict(type='Pretrained', checkpoint=pretrained_224)),
    head=dict(in_channels=1024,
              init_cfg=dict(_delete_=True, type='Pretrained', checkpoint=pretrained_224, prefix='head.')))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(384, 384), backend='pillow', interpolation='bicubic'),
    dict(type='PackInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# 30 epochs for 192 images: lr 2e-5 * 192 / 512, minimum 2e-7 * 192 / 512, no warmup.
optim_wrapper = dict(optimizer=dict(lr=7.5e-6, weight_decay=1e-8))
param_scheduler = [
    dict(type='CosineAnnealingLR', eta_min=7.5e-8, by_epoch=True, begin=0, end=30, convert_to_iter_based=True)
]
train_cfg = dict(max_epochs=30)
auto_scale_lr = dict(base_batch_size=192)
