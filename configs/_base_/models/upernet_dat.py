# UperNet with a DAT backbone: mmseg's UperNet-Swin model with the Swin backbone replaced,
# with activation checkpointing as DAT-Segmentation's UperNet (`use_checkpoint=True`).
_base_ = ['mmseg::_base_/models/upernet_swin.py', '../dat_v1_dense.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='DAT',
        # DAT-T (v1) run with the DAT++ formulas; see ../dat_v1_dense.py.
        arch=dict(preset='v1-tiny', flavor='pp', key_strides=_base_.v1_ade_key_strides),
        pretrain_img_size=224,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0,
        with_cp=True),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))
