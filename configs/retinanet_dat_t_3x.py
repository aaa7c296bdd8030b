# RetinaNet, DAT-T, COCO 3x (36 epochs), multi-scale training, 16 images per iteration (8 GPUs x 2).
# Paper: 38M, 253G; box AP 45.6 (FLOPs at 1280x800).
# No official v1 recipe (DAT-Detection publishes DAT++ configs only): the recipe of its
# configs/dat/rtn_tiny_3x_4n_dp02_lr2.py with the v1 backbone; see configs/README.md.
_base_ = [
    '_base_/models/retinanet_dat_fpn.py',
    '_base_/datasets/coco_detection_ms_crop.py',
    '_base_/schedules/dat_det_3x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_tiny_in1k_224.pth')))

# DAT-Detection trains RetinaNet at half the two-stage lr: 2e-4 for 64 images, i.e.
# 5e-5 for 16.
# The official key 'relative_position_bias_table' (no decay) names the window attention
# tables of v1's L / S blocks
optim_wrapper = dict(
    optimizer=dict(lr=5e-5),
    paramwise_cfg=dict(custom_keys={'relative_position_bias_table': dict(decay_mult=0.)}))
