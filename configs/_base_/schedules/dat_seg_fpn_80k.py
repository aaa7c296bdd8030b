# Semantic FPN "80k" schedule of DAT-Segmentation (the PVT recipe: 80k iterations of 16
# images). DAT-Segmentation runs it on 8 GPUs x 4 images as 40k iterations of 32 images
# with lr 2e-4 (`gpu_multiples = 2`: "lr*2 and max_iters/2"); so does mmseg's PoolFormer
# Semantic FPN. Taken as is: AdamW lr 2e-4 for 32 images, weight decay 1e-4 (none on norms
# and position tables), poly decay (power 0.9) to 0 over 40k iterations.
_base_ = ['mmseg::_base_/schedules/schedule_40k.py']

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            'relative_position_table': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
        }))

param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=40000, by_epoch=False)]

# `--auto-scale-lr`-style rescaling refers to this batch size (8 GPUs x 4 images).
auto_scale_lr = dict(enable=False, base_batch_size=32)
