# COCO detection with the multi-scale training augmentation of every DAT-Detection
# config, 1x and 3x alike (originally DETR / Sparse R-CNN's AutoAugment: either a resize of
# the short side to 480-800 (step 32, long side at most 1333), or a resize to 400-600, a
# random crop of 384-600 and the 480-800 resize), written as mmdet 3's `RandomChoice`, as
# in mmdet's swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py. Test: (1333, 800), one scale.
_base_ = ['mmdet::_base_/datasets/coco_detection.py']

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=_base_.backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=False),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [
                dict(type='RandomChoiceResize',
                     scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
                             (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)],
                     keep_ratio=True)
            ],
            [
                dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
                dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
                dict(type='RandomChoiceResize',
                     scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
                             (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)],
                     keep_ratio=True)
            ],
        ]),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
