# Semantic FPN with a DAT backbone: mmseg's FPN segmentor with the ResNet replaced (no
# activation checkpointing: DAT-Segmentation's FPN sets `use_checkpoint=False`).
_base_ = ['mmseg::_base_/models/fpn_r50.py', '../dat_v1_dense.py']

model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='DAT',
        # DAT-T (v1) run with the DAT++ formulas; see ../dat_v1_dense.py.
        arch=dict(preset='v1-tiny', flavor='pp', key_strides=_base_.v1_ade_key_strides),
        pretrain_img_size=224,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0,
        with_cp=False),
    neck=dict(in_channels=[96, 192, 384, 768]),
    decode_head=dict(num_classes=150))
