# DAT-B on ImageNet-1K, 224x224, 300 epochs, 1024 images per iteration (8 GPUs x 128).
# Paper: 87.88M, 15.8G; top-1 84.0.
# Recipe: dat_base.yaml of the CVPR 2022 release (LeapLabTHU/DAT@566a593).
# The v1 classifier itself (flavor v1, key stride 1): official checkpoints give official logits.
_base_ = [
    '_base_/models/dat_in1k.py',
    '_base_/datasets/imagenet_dat.py',
    '_base_/schedules/dat_in1k_300e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(arch='v1-base', drop_path_rate=0.5),
    head=dict(in_channels=1024))

# DAT-B: lr 4e-4 per 512 images (8e-4 for 1024), 50 warmup epochs (from 5e-7 per 512 images),
# gradient clipping at norm 1.
optim_wrapper = dict(
    optimizer=dict(lr=8e-4),
    clip_grad=dict(max_norm=1.0),
    # the keyword 'relative_position_bias_table' (no decay): v1's window attention tables
    paramwise_cfg=dict(custom_keys={'.relative_position_bias_table': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6 / 8e-4, by_epoch=True, begin=0, end=50, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=0, end=300, convert_to_iter_based=True),
]
