# Mask2Former, DAT-T++, ADE20K 512x512, 160k iterations of 16 images (8 GPUs x 2).
# No published result: Mask2Former is not in the DAT / DAT++ papers.
# Recipe: as configs/mask2former_dat_t_160k.py (mmseg's Mask2Former Swin-T recipe).
_base_ = ['_base_/models/mask2former_dat.py']

model = dict(
    backbone=dict(
        arch='pp-tiny',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_tiny_in1k_224.pth')),
    decode_head=dict(in_channels=[64, 128, 256, 512]))

# DAT++'s stem and downsampling norms (overlapping patches: conv, norm, ...)
_norm = dict(lr_mult=0.1, decay_mult=0.0)
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={'backbone.stem.1': _norm, 'backbone.stem.4': _norm, 'downsample.1': _norm}))
