# DINO with a DAT backbone: mmdet's 4-scale DINO 1x recipe with the ResNet replaced.
# Stages 2-4 feed the ChannelMapper, which adds the fourth level (a stride-2 conv on the
# last stage), as in mmdet's Swin DINO configs.
_base_ = ['mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py', '../dat_v1_dense.py']

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
    neck=dict(in_channels=[192, 384, 768], num_outs=4))

# The backbone's own rules (as configs/_base_/schedules/dat_det_1x.py): full lr, no weight
# decay on norms and position tables. DINO's optimizer, clip and schedule stay.
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        norm_decay_mult=0.,
        custom_keys={
            'relative_position_table': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
        }))
