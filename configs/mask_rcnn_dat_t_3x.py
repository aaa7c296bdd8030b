# Mask R-CNN, DAT-T, COCO 3x (36 epochs, multi-scale training), 16 images per iteration.
# Paper: 48M, 272G; box AP 47.1, mask AP 42.4 (FLOPs at 1280x800).
# Recipe: DAT-Detection mrcn_tiny_3x_4n_dp03_lr4.
_base_ = [
    '_base_/models/mask_rcnn_dat_fpn.py',
    '_base_/datasets/coco_instance_ms_crop.py',
    '_base_/schedules/dat_det_3x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_tiny_in1k_224.pth')))
