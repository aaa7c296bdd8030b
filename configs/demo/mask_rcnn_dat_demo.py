# Embedded demo: Mask R-CNN with a DAT backbone, trained from scratch on CPU in a few
# minutes on the synthetic shapes set (`python tools/make_demo_data.py`, data/shapes).
#
# It is the paper config configs/mask_rcnn_dat_t_3x.py (DAT-T: window + deformable
# attention, the DAT++ formulas, Mask R-CNN + FPN) with only what a CPU demo must change:
# the data (128x128 scenes of 3 shape classes), a narrower and shallower DAT, narrower
# FPN / heads, fewer proposals, a short iteration-based schedule with a larger learning
# rate (no pretrained weights), and the COCO metric on the shapes' val split.
_base_ = ['../mask_rcnn_dat_t_3x.py']

data_root = 'data/shapes/'
classes = ('circle', 'square', 'triangle')
metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 130, 230), (250, 170, 30)])
img_size = 128
max_iters = 500
lr = 1e-3
dims = (32, 64, 128, 256)
neck_channels = 64

model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(
        # DAT-T's layout (window attention, then local / deformable pairs from stage 3),
        # a quarter of the width and one block pair per stage.
        arch=dict(embed_dims=dims, num_heads=(1, 2, 4, 8), groups=(0, 0, 2, 4),
                  stage_specs=('LS', 'LS', 'LD', 'LD')),
        drop_path_rate=0.0,
        with_cp=False,  # the paper config's activation checkpointing costs time, saves no needed memory here
        init_cfg=None),
    neck=dict(in_channels=list(dims), out_channels=neck_channels),
    rpn_head=dict(in_channels=neck_channels, feat_channels=neck_channels),
    # torchvision's RoIAlign: mmcv's (2.1) reads its input as contiguous NCHW memory and
    # pools wrong values from channels-last views (DAT now returns NCHW memory; this keeps
    # the demo independent of the layout of the maps it is given).
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=neck_channels, roi_layer=dict(use_torchvision=True)),
        bbox_head=dict(in_channels=neck_channels, fc_out_channels=256, num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=neck_channels, roi_layer=dict(use_torchvision=True)),
        mask_head=dict(in_channels=neck_channels, conv_out_channels=neck_channels, num_classes=len(classes))),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=128), mask_size=28)),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=20)))

backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(img_size, img_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(img_size, img_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='images/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='images/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# Iteration-based: warm up, then cosine decay; evaluate and save once, at the end.
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, T_max=max_iters - 50,
         eta_min=lr * 0.02),
]
# fp32 (the paper config's fp16 AmpOptimWrapper needs a GPU)
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=lr, weight_decay=0.05),
                     clip_grad=dict(max_norm=10.0, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=8)

default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=2))
log_processor = dict(by_epoch=False, window_size=10)
randomness = dict(seed=0)
