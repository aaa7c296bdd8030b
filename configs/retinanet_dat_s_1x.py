# RetinaNet, DAT-S, COCO 1x (12 epochs), 16 images per iteration.
# Paper: 60M, 359G; box AP 45.7 (FLOPs at 1280x800).
# Recipe: DAT-Detection rtn_small_1x_4n_dp01_lr2.
_base_ = [
    '_base_/models/retinanet_dat_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    '_base_/schedules/dat_det_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        # merged into the model base's arch: flavor 'pp' and the v1 dense key grid stay
        arch=dict(preset='v1-small'),
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_small_in1k_224.pth')))

# DAT-Detection trains RetinaNet at half the two-stage lr: 2e-4 for 64 images, i.e.
# 5e-5 for 16.
optim_wrapper = dict(optimizer=dict(lr=5e-5))
