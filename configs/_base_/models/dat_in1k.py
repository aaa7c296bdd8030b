# ImageNet-1K classifier with a DAT backbone, as the official classification model:
# DAT -> LayerNorm of the last stage (the backbone's `norm3`, the official `cls_norm`)
# -> global average pooling -> linear classifier. Loss and batch augmentation follow
# mmpretrain's Swin recipe (label smoothing 0.1, Mixup 0.8 / CutMix 1.0).
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='DAT',
        arch='v1-tiny',
        pretrain_img_size=224,
        out_indices=(3, ),
        drop_path_rate=0.2),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=768,
        init_cfg=None,  # initialised by the classifier's init_cfg below
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        cal_acc=False),
    init_cfg=[
        dict(type='TruncNormal', layer='Linear', std=0.02, bias=0.),
        dict(type='Constant', layer='LayerNorm', val=1., bias=0.)
    ],
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)
