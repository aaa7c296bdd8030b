# Mask2Former, DAT-T, ADE20K 512x512, 160k iterations of 16 images (8 GPUs x 2).
# No published result: Mask2Former is not in the DAT / DAT++ papers.
# Recipe: mmseg's mask2former_swin-t_8xb2-160k_ade20k-512x512 (AdamW lr 1e-4, weight
# decay 0.05, grad clip 0.01, poly 0.9, backbone lr x0.1, drop path 0.3).
_base_ = ['_base_/models/mask2former_dat.py']

model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_tiny_in1k_224.pth')))
