# Cascade Mask R-CNN, DAT-S, COCO 3x (36 epochs), multi-scale training, 16 images per iteration (8 GPUs x 2).
# Paper: 107M, 857G; box AP 52.7, mask AP 45.5 (FLOPs at 1280x800).
# No official v1 recipe (DAT-Detection publishes DAT++ configs only): the recipe of its
# configs/dat/cmrcn_small_3x_4n_dp05_lr4.py with the v1 backbone; see configs/README.md.
_base_ = [
    '_base_/models/cascade_mask_rcnn_dat_fpn.py',
    '_base_/datasets/coco_instance_ms_crop.py',
    '_base_/schedules/dat_det_3x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        # merged into the model base's arch: flavor 'pp' and the v1 dense key grid stay
        arch=dict(preset='v1-small'),
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_small_in1k_224.pth')))

# fp32: cmrcn_small_3x_4n_dp05_lr4 trains without Fp16OptimizerHook (OptimizerHook).
# The official key 'relative_position_bias_table' (no decay) names the window attention
# tables of v1's L / S blocks
optim_wrapper = dict(
    type='OptimWrapper',
    paramwise_cfg=dict(custom_keys={'relative_position_bias_table': dict(decay_mult=0.)}))
