# DAT-B++ on ImageNet-1K, 224x224, 300 epochs, 1024 images per iteration (16 GPUs x 64).
# Paper: 93M, 16.6G; top-1 84.9.
_base_ = [
    '_base_/models/dat_in1k.py',
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    '_base_/schedules/dat_in1k_300e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(arch='pp-base', drop_path_rate=0.5),
    head=dict(in_channels=1024))
