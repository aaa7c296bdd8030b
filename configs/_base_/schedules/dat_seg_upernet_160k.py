# UperNet 160k schedule of DAT-Segmentation (configs/dat/upn_*_160k_*), in mmseg 1.x terms:
# AdamW lr 6e-5 for 16 images (8 GPUs x 2), betas (0.9, 0.999), weight decay 0.01; poly
# (power 1) from 6e-5 to 0 over all 160k iterations with a linear warmup from 1e-6 over the
# first 1500 on top (mmcv 1.x scales the poly lr by the warmup factor: LinearLR and PolyLR
# both from iteration 0 here); fp16 with dynamic loss scale (Fp16OptimizerHook) for T / S,
# fp32 for B (upn_base_160k sets OptimizerHook; upernet_*_b_160k override the type).
_base_ = ['mmseg::_base_/schedules/schedule_160k.py', './dat_seg_decay.py']

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',  # fp16 autocast; loss_scale='dynamic' is its default
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=_base_.seg_paramwise_cfg)

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=160000, by_epoch=False),
]

# 8 GPUs x 2 images; `tools/train.py --auto-scale-lr` rescales the lr for another batch.
auto_scale_lr = dict(enable=False, base_batch_size=16)
