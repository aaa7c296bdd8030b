# ImageNet-1K schedule of the official DAT classifiers (LeapLabTHU/DAT: the Swin recipe),
# in mmpretrain terms. Official: 300 epochs, AdamW (betas (0.9, 0.999), eps 1e-8), lr 5e-4
# per 512 images (lr, warmup lr and minimum lr all scale linearly with the total batch),
# weight decay 0.05 except on 1-d parameters, biases and the keywords
# 'relative_position_bias_table' / 'rpe_table'; 20 warmup epochs from 5e-7 per 512 images;
# cosine to 5e-6 per 512 images over all 300 epochs (timm's CosineLRScheduler with
# `t_initial` = all steps: the warmup is not a prefix), stepped per iteration; gradient
# clipping at norm 5; AMP (`train.sh` passes `--amp`: autocast + GradScaler).
# Here for 1024 images (8 GPUs x 128, as the official configs' BATCH_SIZE on one 8-GPU node):
# lr 1e-3, warmup from 1e-6 (factor 1e-3), minimum 1e-5; `--auto-scale-lr` rescales the lr.
#
# 'rpe_table' is mmdat's `relative_position_table`; the v1 configs add the window
# attention key '.relative_position_bias_table'. DAT++'s neighborhood-attention tables
# (official `rpb`, 3-d, not named by a keyword) are decayed, as official.
_base_ = ['mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py']

optim_wrapper = dict(
    type='AmpOptimWrapper',  # fp16 autocast; loss_scale='dynamic' is its default
    clip_grad=dict(max_norm=5.0),
    paramwise_cfg=dict(custom_keys=dict(_delete_=True, **{'.relative_position_table': dict(decay_mult=0.0)})))

max_epochs = 300
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=0, end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)

auto_scale_lr = dict(base_batch_size=1024)
