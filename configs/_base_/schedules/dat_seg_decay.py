# Weight decay of the DAT-Segmentation configs, in mmdat's parameter names.
#
# Official: `paramwise_cfg=dict(custom_keys={'absolute_pos_embed', 'relative_position_bias_table',
# 'rpe_table', 'norm': decay_mult 0})` and no `norm_decay_mult`. Every official backbone
# LayerNorm is a `.norm` submodule, so the key 'norm' exempts all of them; the heads'
# SyncBN layers (ConvModule's `bn`) are decayed. mmdat's stem and downsampling LayerNorms
# are not named `norm` (`stem.1`, `stages.i.downsample.1`), hence `norm_decay_mult=0.`
# for them, and the heads decayed in full by name, their SyncBN included, as official.
# 'rpe_table' is mmdat's `relative_position_table`; the key 'relative_position_bias_table'
# (window attention, v1's L / S blocks) is added by the v1 configs: DAT++'s
# neighborhood-attention tables (official `rpb`, mmdat `relative_position_bias_table`)
# are decayed.
seg_paramwise_cfg = dict(
    norm_decay_mult=0.,
    custom_keys={
        'relative_position_table': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
        'decode_head': dict(decay_mult=1.),
        'auxiliary_head': dict(decay_mult=1.),
    })
