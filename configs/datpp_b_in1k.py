# DAT-B++ on ImageNet-1K, 224x224, 300 epochs, 512 images per iteration (8 GPUs x 64).
# DAT++ paper / DAT README: 93M, 16.6G; top-1 84.9.
# Recipe: configs/dat_base.yaml of LeapLabTHU/DAT.
_base_ = [
    '_base_/models/dat_in1k.py',
    '_base_/datasets/imagenet_dat.py',
    '_base_/schedules/dat_in1k_300e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(arch='pp-base', drop_path_rate=0.7),
    head=dict(in_channels=1024))

# DAT-B++: 64 images per GPU (BATCH_SIZE 64), 512 in all: lr 5e-4, warmup from 5e-7, minimum 5e-6.
train_dataloader = dict(batch_size=64)
optim_wrapper = dict(optimizer=dict(lr=5e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=5e-6, by_epoch=True, begin=0, end=300, convert_to_iter_based=True),
]
auto_scale_lr = dict(base_batch_size=512)
