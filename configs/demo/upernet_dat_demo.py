# Embedded demo: UperNet with a DAT backbone, trained from scratch on CPU in a few minutes
# on the synthetic shapes set (`python tools/make_demo_data.py`, data/shapes).
#
# It is the paper config configs/upernet_dat_t_160k.py (DAT-T, UperNet + FCN auxiliary
# head) with only what a CPU demo must change: the data (128x128 scenes, ADE20K layout),
# a narrower and shallower DAT, narrower heads, a short schedule with a larger learning
# rate (no pretrained weights). The semantic maps use ADE20K's encoding (0 = background,
# 1..3 = circle, square, triangle); unlike ADE20K (reduce_zero_label=True: 0 ignored) the
# demo keeps the background as class 0, so mIoU is over 4 classes and rewards finding the
# shapes, not only naming them.
_base_ = ['../upernet_dat_t_160k.py']

data_root = 'data/shapes/'
classes = ('background', 'circle', 'square', 'triangle')
palette = [(0, 0, 0), (220, 20, 60), (0, 130, 230), (250, 170, 30)]
img_size = 128
crop_size = (img_size, img_size)
max_iters = 400
lr = 1e-3
dims = (32, 64, 128, 256)
head_channels = 64

data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        # DAT-T's layout (window attention, then local / deformable pairs from stage 3),
        # a quarter of the width and one block pair per stage.
        arch=dict(embed_dims=dims, num_heads=(1, 2, 4, 8), groups=(0, 0, 2, 4),
                  stage_specs=('LS', 'LS', 'LD', 'LD')),
        drop_path_rate=0.0,
        with_cp=False,  # the paper config's activation checkpointing costs time, saves no needed memory here
        init_cfg=None),
    decode_head=dict(in_channels=list(dims), channels=head_channels, num_classes=len(classes)),
    auxiliary_head=dict(in_channels=dims[2], channels=head_channels // 2, num_classes=len(classes)))

dataset_type = 'BaseSegDataset'
metainfo = dict(classes=classes, palette=palette)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
_dataset = dict(type=dataset_type, data_root=data_root, metainfo=metainfo, reduce_zero_label=False,
                img_suffix='.jpg', seg_map_suffix='.png')
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        **_dataset,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        **_dataset,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

# Warm up, then poly decay as the paper's schedule; evaluate and save once, at the end.
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=lr * 0.01, power=1.0, begin=50, end=max_iters, by_epoch=False),
]
# fp32 (the paper config's fp16 AmpOptimWrapper needs a GPU)
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=lr))

default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=2))
log_processor = dict(by_epoch=False, window_size=10)
randomness = dict(seed=0)
