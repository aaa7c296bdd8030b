# Cascade Mask R-CNN, DAT-B++, COCO 3x (36 epochs), multi-scale training, 8 images per iteration (8 GPUs x 1).
# DAT++ paper / DAT-Detection README: box AP 54.5, mask AP 47.0.
# Recipe: DAT-Detection configs/dat/cmrcn_base_3x_8n_dp08_lr4.py.
_base_ = [
    '_base_/models/cascade_mask_rcnn_dat_fpn.py',
    '_base_/datasets/coco_instance_ms_crop.py',
    '_base_/schedules/dat_det_3x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='pp-base',
        drop_path_rate=0.8,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_base_in1k_224.pth')),
    neck=dict(in_channels=[128, 256, 512, 1024]))

train_dataloader = dict(batch_size=1, num_workers=1)
auto_scale_lr = dict(base_batch_size=8)

# DAT-Detection's DAT-B++ Cascade Mask R-CNN: 1 image per GPU (8 nodes x 8 GPUs, 4e-4 for 64
# images), i.e. 5e-5 for 8 images.
# fp32: cmrcn_base_3x_8n_dp08_lr4 trains without Fp16OptimizerHook (OptimizerHook).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(lr=5e-5))
