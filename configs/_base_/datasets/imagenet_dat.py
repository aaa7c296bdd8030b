# ImageNet-1K as the official DAT classification code uses it (LeapLabTHU/DAT data/build.py,
# the Swin pipeline), in mmpretrain terms. Train: mmpretrain's Swin augmentation (random
# resized crop 224, bicubic; flip; RandAugment m9 std 0.5 "increasing", 2 ops; random erasing
# 0.25, per-pixel), as timm's create_transform with the official AUG settings; 128 images per
# GPU (the official BATCH_SIZE; 8 GPUs). Test: a square bicubic resize to 256x256
# (int(256 / 224 * 224), TEST.CROP) and a 224 centre crop, not mmpretrain's short-side resize.
_base_ = ['mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py']

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 256), backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=128)
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
