# ImageNet-1K schedule of the official DAT classifiers (the Swin recipe, as mmpretrain's
# imagenet_bs1024_adamw_swin): 300 epochs, AdamW lr 1e-3 for 1024 images (16 GPUs x 64),
# weight decay 0.05 except on norms, biases, other 1-d parameters and position tables,
# 20 linear warmup epochs, cosine decay to 1e-5, gradient clipping at norm 5.
_base_ = ['mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py']

optim_wrapper = dict(
    clip_grad=dict(max_norm=5.0),
    paramwise_cfg=dict(
        custom_keys={
            '.relative_position_table': dict(decay_mult=0.0),  # deformable attention
            '.relative_position_bias_table': dict(decay_mult=0.0),  # window attention
        }))
