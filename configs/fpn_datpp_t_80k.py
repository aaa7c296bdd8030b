# Semantic FPN, DAT-T++, ADE20K 512x512, the "80k" schedule (PVT: 80k x 16 images),
# run as DAT-Segmentation does: 40k iterations of 32 images (8 GPUs x 4).
# DAT++ paper / DAT-Segmentation README: mIoU 48.4 / 48.8 (ms+flip).
# Recipe: DAT-Segmentation configs/dat/fpn_tiny_80k_dp04_lr2.py.
_base_ = [
    '_base_/models/fpn_dat.py',
    '_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    '_base_/schedules/dat_seg_fpn_80k.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='pp-tiny',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_tiny_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))

train_dataloader = dict(batch_size=4)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
