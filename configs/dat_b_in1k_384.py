# DAT-B on ImageNet-1K at 384x384, as the official dat_base_384: the v1 DAT-B with window
# size 12 and position tables built for 384 (stage maps 96, 48, 24, 12), fine-tuned from
# the 224 model for 30 epochs (the Swin fine-tuning recipe of the official code: AdamW,
# lr 2e-5 per 512 images, weight decay 1e-8, no warmup, cosine to 2e-7 per 512 images;
# full-image 384 resize at test time, no center crop).
# Paper: 88M, 49.8G; top-1 84.8.
_base_ = ['./dat_b_in1k.py']
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

# An mmdat-layout 224 checkpoint (tools/model_converters/dat2mmdat.py converts official
# ones): the backbone loader interpolates its position tables to the 384 sizes and the
# classifier head is loaded as it is.
pretrained_224 = 'checkpoints/dat_base_in1k_224_mmdat.pth'
model = dict(
    backbone=dict(
        arch=dict(_delete_=True, preset='v1-base', window_size=12),
        pretrain_img_size=384,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained_224)),
    head=dict(init_cfg=dict(_delete_=True, type='Pretrained', checkpoint=pretrained_224, prefix='head.')))

# data: the 224 recipe's augmentation at 384
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=384, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(
        type='RandAugment',
        policies='timm_increasing',
        num_policies=2,
        total_level=10,
        magnitude_level=9,
        magnitude_std=0.5,
        hparams=dict(pad_val=[104, 116, 124], interpolation='bicubic')),
    dict(
        type='RandomErasing',
        erase_prob=0.25,
        mode='rand',
        min_area_ratio=0.02,
        max_area_ratio=1 / 3,
        fill_color=[103.53, 116.28, 123.675],
        fill_std=[57.375, 57.12, 58.395]),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=384, backend='pillow', interpolation='bicubic'),
    dict(type='PackInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# schedule: 30 fine-tuning epochs (lr and minimum lr for 1024 images)
optim_wrapper = dict(optimizer=dict(lr=4e-5, weight_decay=1e-8))
param_scheduler = [dict(type='CosineAnnealingLR', eta_min=4e-7, by_epoch=True, begin=0, end=30)]
train_cfg = dict(max_epochs=30)
