# Mask R-CNN, DAT-S++, COCO 1x (12 epochs), multi-scale training, 16 images per iteration (8 GPUs x 2).
# DAT++ paper / DAT-Detection README: box AP 49.8, mask AP 44.5; 430G (cited).
# Recipe: DAT-Detection configs/dat/mrcn_small_1x_4n_dp01_lr4.py.
_base_ = [
    '_base_/models/mask_rcnn_dat_fpn.py',
    '_base_/datasets/coco_instance_ms_crop.py',
    '_base_/schedules/dat_det_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='pp-small',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_small_in1k_224.pth')),
    # P6 is a stride-2 conv on C5, as DAT-Detection's Mask R-CNN (neck.fpn_convs.4)
    neck=dict(add_extra_convs='on_input'))
