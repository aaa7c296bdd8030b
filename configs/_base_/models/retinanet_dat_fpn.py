# RetinaNet + FPN with a DAT backbone: mmdet's RetinaNet with the ResNet replaced. As in
# mmdet's Swin RetinaNet, the backbone returns stages 1-3 only (FPN starts at stride 8).
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py', '../dat_v1_dense.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='DAT',
        # DAT-T (v1) run with the DAT++ formulas; see ../dat_v1_dense.py.
        arch=dict(preset='v1-tiny', flavor='pp', key_strides=_base_.v1_dense_key_strides),
        pretrain_img_size=224,
        out_indices=(1, 2, 3),
        drop_path_rate=0.0,
        with_cp=False),
    neck=dict(in_channels=[192, 384, 768], start_level=0, num_outs=5))
