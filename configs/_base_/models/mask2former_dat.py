# Mask2Former with a DAT backbone: mmseg's Mask2Former Swin-T ADE20K 160k recipe with the
# Swin Transformer replaced.
_base_ = ['mmseg::mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py', '../dat_v1_dense.py']
custom_imports = dict(imports=['mmdet.models', 'mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='DAT',
        # DAT-T (v1) run with the DAT++ formulas on the ADE20K key grid; see ../dat_v1_dense.py.
        arch=dict(preset='v1-tiny', flavor='pp', key_strides=_base_.v1_ade_key_strides),
        pretrain_img_size=224,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,
        with_cp=False),
    decode_head=dict(in_channels=[96, 192, 384, 768]))

# The Swin recipe's rules in DAT's names: the backbone at lr x0.1; its norms and position
# tables, and the queries' and levels' embeddings, without weight decay. MMEngine applies
# the longest key that a parameter's name contains, so every backbone norm needs a key
# longer than 'backbone' (DAT-T v1: stem.2 and downsample.2 are the stem's and the
# downsampling layers' norms; DAT++ configs add theirs).
backbone_norm_multi = dict(lr_mult=0.1, decay_mult=0.0)
embed_multi = dict(lr_mult=1.0, decay_mult=0.0)
custom_keys = {
    'backbone': dict(lr_mult=0.1, decay_mult=1.0),
    'backbone.norm': backbone_norm_multi,
    'backbone.stem.2': backbone_norm_multi,
    'downsample.2': backbone_norm_multi,
    'attn.offset.norm': backbone_norm_multi,
    'relative_position_table': backbone_norm_multi,
    'relative_position_bias_table': backbone_norm_multi,
    'query_embed': embed_multi,
    'query_feat': embed_multi,
    'level_embed': embed_multi,
}
# norm1 / norm2 of every block (18: the deepest stage of the presets)
custom_keys.update({f'blocks.{i}.norm': backbone_norm_multi for i in range(18)})
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dict(_delete_=True, **custom_keys), norm_decay_mult=0.0))
