# UperNet, DAT-B++, ADE20K 512x512, 160k iterations of 16 images (8 GPUs x 2).
# DAT++ paper / DAT-Segmentation README: mIoU 51.0 / 51.5 (ms+flip).
# Recipe: DAT-Segmentation configs/dat/upn_base_160k_dp07_lr6.py.
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
        arch='pp-base',
        drop_path_rate=0.7,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_base_in1k_224.pth')),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))

train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader

# fp32: upn_base_160k_dp07_lr6 trains without Fp16OptimizerHook (OptimizerHook).
optim_wrapper = dict(type='OptimWrapper')
