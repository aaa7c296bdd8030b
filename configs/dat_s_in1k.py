# DAT-S on ImageNet-1K, 224x224, 300 epochs, 1024 images per iteration (8 GPUs x 128).
# Paper: 49.70M, 9.0G; top-1 83.7.
# Recipe: dat_small.yaml of the CVPR 2022 release (LeapLabTHU/DAT@566a593).
# The v1 classifier itself (flavor v1, key stride 1): official checkpoints give official logits.
_base_ = [
    '_base_/models/dat_in1k.py',
    '_base_/datasets/imagenet_dat.py',
    '_base_/schedules/dat_in1k_300e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(arch='v1-small', drop_path_rate=0.3),
    head=dict(in_channels=768))

# the keyword 'relative_position_bias_table' (no decay): v1's window attention tables
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.relative_position_bias_table': dict(decay_mult=0.)}))
