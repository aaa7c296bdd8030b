# Mask R-CNN, DAT-S++, COCO 1x (12 epochs), 16 images per iteration.
# DAT++ paper: 430G (cited); box AP 49.8, mask AP 44.5. Official config: DAT-Detection mrcn_small_1x_4n_dp01_lr4.
_base_ = [
    '_base_/models/mask_rcnn_dat_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    '_base_/schedules/dat_det_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='pp-small',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_small_in1k_224.pth')))
