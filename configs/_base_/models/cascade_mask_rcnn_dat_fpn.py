# Cascade Mask R-CNN + FPN with a DAT backbone: mmdet's Cascade Mask R-CNN with the ResNet
# replaced and, as DAT-Detection (and Swin) use, "4conv1fc" box heads with SyncBN and a
# GIoU loss on decoded boxes in the three cascade stages. The neck is DAT-Detection's too:
# mmdet's FPN with P6 max-pooled from P5 (no extra convs); activation checkpointing as
# DAT-Detection (`use_checkpoint=True`).
_base_ = ['mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py', '../dat_v1_dense.py']


def _bbox_head(target_stds):
    return dict(
        type='ConvFCBBoxHead',
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=target_stds),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(
    backbone=dict(
        _delete_=True,
        type='DAT',
        # DAT-T (v1) run with the DAT++ formulas; see ../dat_v1_dense.py.
        arch=dict(preset='v1-tiny', flavor='pp', key_strides=_base_.v1_dense_key_strides),
        pretrain_img_size=224,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0,
        with_cp=True),
    neck=dict(in_channels=[96, 192, 384, 768]),
    roi_head=dict(bbox_head=[
        _bbox_head([0.1, 0.1, 0.2, 0.2]),
        _bbox_head([0.05, 0.05, 0.1, 0.1]),
        _bbox_head([0.033, 0.033, 0.067, 0.067]),
    ]))
