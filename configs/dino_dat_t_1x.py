# DINO (4 scales), DAT-T, COCO 1x (12 epochs), 16 images per iteration (8 GPUs x 2).
# No published result: DINO is not in the DAT / DAT++ papers.
# Recipe: as configs/dino_datpp_t_1x.py (mmdet's dino-4scale_r50_8xb2-12e_coco with the
# backbone's own lr / decay rules); DAT-T on the v1 dense key grid of our other COCO configs.
_base_ = ['_base_/models/dino_dat.py']
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_tiny_in1k_224.pth')),
    neck=dict(in_channels=[192, 384, 768]))
