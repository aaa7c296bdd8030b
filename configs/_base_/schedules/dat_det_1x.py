# 1x (12 epochs) detection schedule of DAT-Detection (configs/dat/*_1x_*), in mmdet 3 terms.
#
# Official: AdamW lr 4e-4 for 64 images (4 nodes x 8 GPUs x 2; RetinaNet 2e-4),
# betas (0.9, 0.999), weight decay 0.05, none on norms (`norm_decay_mult=0.` and the key
# 'norm') and on the deformable-attention tables (key 'rpe_table', mmdat's
# `relative_position_table`); linear warmup over 500 iterations from 0.001, steps at epochs
# 8 and 11; fp16 with dynamic loss scale (Fp16OptimizerHook), no gradient clipping.
# Here: 8 GPUs x 2 images with the lr scaled linearly (1e-4 for 16 images);
# `tools/train.py --auto-scale-lr` rescales it for another total batch.
#
# The official key 'relative_position_bias_table' names the window attention tables
# (v1's L / S blocks); the v1 configs add it. DAT++'s neighborhood-attention tables are
# `rpb` in the official code, which no key names: they are decayed, so the DAT++ configs
# leave mmdat's `relative_position_bias_table` (the same tables) decayed too.
_base_ = ['mmdet::_base_/schedules/schedule_1x.py']

max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1)
]

optim_wrapper = dict(
    type='AmpOptimWrapper',  # fp16 autocast; loss_scale='dynamic' is its default
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            'relative_position_table': dict(decay_mult=0.),  # official `rpe_table`
            'norm': dict(decay_mult=0.),
        }))

auto_scale_lr = dict(enable=False, base_batch_size=16)
