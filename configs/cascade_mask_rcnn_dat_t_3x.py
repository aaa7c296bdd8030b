# Cascade Mask R-CNN, DAT-T, COCO 3x (36 epochs, multi-scale training), 16 images per iteration.
# Paper: 86M, 750G; box AP 51.3, mask AP 44.5 (FLOPs at 1280x800).
# Recipe: DAT-Detection cmrcn_tiny_3x_4n_dp01_lr4.
_base_ = [
    '_base_/models/cascade_mask_rcnn_dat_fpn.py',
    '_base_/datasets/coco_instance_ms_crop.py',
    '_base_/schedules/dat_det_3x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_tiny_in1k_224.pth')))
