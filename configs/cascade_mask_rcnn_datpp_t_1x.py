# Cascade Mask R-CNN, DAT-T++, COCO 1x (12 epochs), multi-scale training, 16 images per iteration (8 GPUs x 2).
# DAT++ paper / DAT-Detection README: box AP 52.2, mask AP 45.0.
# Recipe: DAT-Detection configs/dat/cmrcn_tiny_1x_4n_dp00_lr4.py.
_base_ = [
    '_base_/models/cascade_mask_rcnn_dat_fpn.py',
    '_base_/datasets/coco_instance_ms_crop.py',
    '_base_/schedules/dat_det_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='pp-tiny',
        drop_path_rate=0.0,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_tiny_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))
