# DINO (4 scales), DAT-T++, COCO 1x (12 epochs), 16 images per iteration (8 GPUs x 2).
# No published result: DINO is not in the DAT / DAT++ papers.
# Recipe: mmdet's dino-4scale_r50_8xb2-12e_coco (AdamW lr 1e-4, weight decay 1e-4, grad
# clip 0.1, lr x0.1 at epoch 11, DETR multi-scale augmentation); the backbone's rules as
# in our other COCO configs: trained at the full lr (no x0.1 of ResNet's recipe), no weight
# decay on norms and position tables. Levels: stages 2-4 (strides 8, 16, 32) and one extra
# stride-2 conv level from the last (ChannelMapper num_outs=4), as mmdet's Swin DINO does.
_base_ = ['_base_/models/dino_dat.py']
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='pp-tiny',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_tiny_in1k_224.pth')),
    neck=dict(in_channels=[128, 256, 512]))
