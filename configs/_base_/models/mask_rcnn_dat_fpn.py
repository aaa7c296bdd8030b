# Mask R-CNN + FPN with a DAT backbone: mmdet's Mask R-CNN with the ResNet replaced, with
# activation checkpointing as DAT-Detection (`use_checkpoint=True`). P6 is max-pooled from P5
# here (mmdet's and Swin's neck; the v1 paper's 48M / 69M count it so); DAT-Detection's
# DAT++ configs make P6 a stride-2 conv on C5 (`add_extra_convs='on_input'`, checkpoints
# with `neck.fpn_convs.4.*`), and so do mmdat's mask_rcnn_datpp_* configs.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', '../dat_v1_dense.py']

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
    neck=dict(in_channels=[96, 192, 384, 768]))
