# DAT-S++ on ImageNet-1K, 224x224, 300 epochs, 1024 images per iteration (8 GPUs x 128).
# DAT++ paper / DAT README: 53M, 9.4G; top-1 84.6.
# Recipe: configs/dat_small.yaml of LeapLabTHU/DAT.
_base_ = [
    '_base_/models/dat_in1k.py',
    '_base_/datasets/imagenet_dat.py',
    '_base_/schedules/dat_in1k_300e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(arch='pp-small', drop_path_rate=0.4),
    head=dict(in_channels=768))
