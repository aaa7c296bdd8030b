# Cascade Mask R-CNN, DAT-S++, COCO 3x (36 epochs), multi-scale training, 16 images per iteration (8 GPUs x 2).
# DAT++ paper / DAT-Detection README: box AP 54.2, mask AP 46.9.
# Recipe: DAT-Detection configs/dat/cmrcn_small_3x_4n_dp05_lr4.py.
_base_ = [
    '_base_/models/cascade_mask_rcnn_dat_fpn.py',
    '_base_/datasets/coco_instance_ms_crop.py',
    '_base_/schedules/dat_det_3x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='pp-small',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_small_in1k_224.pth')))

# fp32: cmrcn_small_3x_4n_dp05_lr4 trains without Fp16OptimizerHook (OptimizerHook).
optim_wrapper = dict(type='OptimWrapper')
