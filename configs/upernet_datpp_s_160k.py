# UperNet, DAT-S++, ADE20K 512x512, 160k iterations of 16 images (8 GPUs x 2).
# DAT++ paper / DAT-Segmentation README: mIoU 50.5 / 51.2 (ms+flip).
# Recipe: DAT-Segmentation configs/dat/upn_small_160k_dp05_lr6.py.
_base_ = [
    '_base_/models/upernet_dat.py',
    '_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    '_base_/schedules/dat_seg_upernet_160k.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='pp-small',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_small_in1k_224.pth')))

train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
