# Semantic FPN "80k" schedule of DAT-Segmentation (configs/dat/fpn_*_80k_*; the PVT recipe:
# 80k iterations of 16 images). DAT-Segmentation runs it on 8 GPUs x 4 images as 40k
# iterations of 32 images with lr 2e-4 (`gpu_multiples = 2`: "lr*2 and max_iters/2"), and
# so does this schedule: AdamW lr 2e-4 for 32 images, betas (0.9, 0.999), weight decay
# 1e-4, poly (power 0.9) to 0 over 40k iterations, no warmup, fp32 (`optimizer_config =
# dict()`), no gradient clipping.
_base_ = ['mmseg::_base_/schedules/schedule_40k.py', './dat_seg_decay.py']

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=_base_.seg_paramwise_cfg)

param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=40000, by_epoch=False)]

# 8 GPUs x 4 images; `tools/train.py --auto-scale-lr` rescales the lr for another batch.
auto_scale_lr = dict(enable=False, base_batch_size=32)
