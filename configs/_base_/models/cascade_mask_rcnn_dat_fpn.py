# Cascade Mask R-CNN + FPN with a DAT backbone: mmdet's Cascade Mask R-CNN with the
# ResNet replaced (3 cascade stages with shared 2-fc box heads, as DAT-Detection).
_base_ = ['mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py', '../dat_v1_dense.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='DAT',
        # DAT-T (v1) run with the DAT++ formulas; see ../dat_v1_dense.py.
        arch=dict(preset='v1-tiny', flavor='pp', key_strides=_base_.v1_dense_key_strides),
        pretrain_img_size=224,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0,
        with_cp=False),
    neck=dict(in_channels=[96, 192, 384, 768]))
