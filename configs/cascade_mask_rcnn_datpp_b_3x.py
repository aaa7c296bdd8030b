# Cascade Mask R-CNN, DAT-B++, COCO 3x (36 epochs, multi-scale training), 16 images per iteration.
# DAT++ paper: box AP 54.5, mask AP 47.0. Official config: DAT-Detection cmrcn_base_3x_8n_dp08_lr4.
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
