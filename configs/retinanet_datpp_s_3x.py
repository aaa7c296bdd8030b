# RetinaNet, DAT-S++, COCO 3x (36 epochs), multi-scale training, 16 images per iteration (8 GPUs x 2).
# DAT++ paper / DAT-Detection README: box AP 50.2.
# Recipe: DAT-Detection configs/dat/rtn_small_3x_4n_dp05_lr2.py.
_base_ = [
    '_base_/models/retinanet_dat_fpn.py',
    '_base_/datasets/coco_detection_ms_crop.py',
    '_base_/schedules/dat_det_3x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='pp-small',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_small_in1k_224.pth')))

# DAT-Detection trains RetinaNet at half the two-stage lr: 2e-4 for 64 images, i.e.
# 5e-5 for 16.
optim_wrapper = dict(optimizer=dict(lr=5e-5))
