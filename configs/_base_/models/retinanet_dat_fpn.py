# RetinaNet + FPN with a DAT backbone: mmdet's RetinaNet with the ResNet replaced, laid out
# as DAT-Detection's: the backbone returns (and norms) all four stages, the FPN starts at
# the second (`start_level=1`, stride 8) and P6 is a stride-2 conv on C5
# (`add_extra_convs='on_input'`), so official checkpoints load key for key; activation
# checkpointing as DAT-Detection (`use_checkpoint=True`).
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py', '../dat_v1_dense.py']

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
    neck=dict(in_channels=[96, 192, 384, 768], start_level=1, add_extra_convs='on_input', num_outs=5))
