# 1x (12 epochs) detection schedule of DAT-Detection, in mmdet 3 terms:
# AdamW, lr 1e-4 per 16 images (the official 4e-4 is for 4 nodes x 8 GPUs x 2 images),
# weight decay 0.05 except on norms and position tables, linear warmup over 500
# iterations from 0.001, step decay at epochs 8 and 11.
# AMP is optional: `tools/train.py ... --amp` of mmdet switches to AmpOptimWrapper.
_base_ = ['mmdet::_base_/schedules/schedule_1x.py']

max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1)
]

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            # deformable-attention bias tables (official `rpe_table`)
            'relative_position_table': dict(decay_mult=0.),
            # window / neighborhood attention bias tables
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
        }))

# 8 GPUs x 2 images; `--auto-scale-lr` rescales lr for other batch sizes.
auto_scale_lr = dict(enable=False, base_batch_size=16)
