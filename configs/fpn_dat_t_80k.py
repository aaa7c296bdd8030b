# Semantic FPN, DAT-T, ADE20K 512x512, the "80k" schedule (PVT: 80k x 16 images),
# run as DAT-Segmentation does: 40k iterations of 32 images (8 GPUs x 4).
# Paper: 32M, 198G; mIoU 42.56 / 44.22 (ms+flip) (FLOPs at 512x2048).
# No official v1 recipe (DAT-Segmentation publishes DAT++ configs only): the recipe of its
# configs/dat/fpn_tiny_80k_dp04_lr2.py with the v1 backbone; see configs/README.md.
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
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_tiny_in1k_224.pth')))

train_dataloader = dict(batch_size=4)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader

# The official key 'relative_position_bias_table' (no decay) names the window attention
# tables of v1's L / S blocks
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'relative_position_bias_table': dict(decay_mult=0.)}))
