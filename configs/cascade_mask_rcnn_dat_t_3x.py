# Cascade Mask R-CNN, DAT-T, COCO 3x (36 epochs), multi-scale training, 16 images per iteration (8 GPUs x 2).
# Paper: 86M, 750G; box AP 51.3, mask AP 44.5 (FLOPs at 1280x800).
# No official v1 recipe (DAT-Detection publishes DAT++ configs only): the recipe of its
# configs/dat/cmrcn_tiny_3x_4n_dp01_lr4.py with the v1 backbone; see configs/README.md.
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

# The official key 'relative_position_bias_table' (no decay) names the window attention
# tables of v1's L / S blocks
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={'relative_position_bias_table': dict(decay_mult=0.)}))
