# Mask R-CNN, DAT-T, COCO 1x (12 epochs), 16 images per iteration.
# Paper: 48M, 272G; box AP 44.4, mask AP 40.4 (FLOPs at 1280x800).
# Recipe: DAT-Detection mrcn_tiny_1x_4n_dp00_lr4.
_base_ = [
    '_base_/models/mask_rcnn_dat_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    '_base_/schedules/dat_det_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        drop_path_rate=0.0,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_tiny_in1k_224.pth')))
