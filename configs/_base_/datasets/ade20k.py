# ADE20K as DAT-Segmentation uses it: mmseg's ADE20K base (train: random resize of (2048, 512)
# by 0.5-2.0, 512x512 crops, flip, photometric distortion; test: (2048, 512) keeping the
# aspect ratio, the whole image at once), and the official multi-scale test: mmseg 0.x's
# `--aug-test` sets the ratios 0.5-1.75 of the test scale (2048, 512) plus flip, whereas
# mmseg 1.x's own `tta_pipeline` scales the original image (`scale_factor`).
_base_ = ['mmseg::_base_/datasets/ade20k.py']

test_scale = (2048, 512)
aug_test_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=(int(test_scale[0] * r), int(test_scale[1] * r)), keep_ratio=True)
             for r in aug_test_ratios],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
