# Mask R-CNN, DAT-S, COCO 1x (12 epochs), multi-scale training, 16 images per iteration (8 GPUs x 2).
# Paper: 69M, 378G; box AP 47.1, mask AP 42.5 (FLOPs at 1280x800).
# No official v1 recipe (DAT-Detection publishes DAT++ configs only): the recipe of its
# configs/dat/mrcn_small_1x_4n_dp01_lr4.py with the v1 backbone; see configs/README.md.
_base_ = [
    '_base_/models/mask_rcnn_dat_fpn.py',
    '_base_/datasets/coco_instance_ms_crop.py',
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

# The official key 'relative_position_bias_table' (no decay) names the window attention
# tables of v1's L / S blocks
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={'relative_position_bias_table': dict(decay_mult=0.)}))
