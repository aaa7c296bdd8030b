# Key grid of the v1 DAT models (DAT-T/S/B, CVPR 2022) on dense-prediction inputs.
#
# The v1 classifiers sample their deformable keys on a grid with stride r = 1 in
# stages 3 and 4: at 224x224 that is all 14x14 (7x7) positions. Kept at r = 1 on a
# 1280x800 COCO image, every D block of stage 3 would attend globally over ~4000
# tokens, which the published detection FLOPs rule out (Mask R-CNN DAT-T: 272G vs
# 267G for Swin-T). The official dense-prediction code (DAT-Detection,
# DAT-Segmentation) runs the v1 stage specs with the DAT++ formulas (flavor 'pp':
# padding, reference grid over (H-1, W-1), any input size), so the v1 dense configs
# use `arch=dict(preset=..., flavor='pp', key_strides=v1_dense_key_strides)`.
#
# The strides below were chosen by measuring every v1 dense config with
# tools/analysis_tools/get_flops.py against the paper's params/FLOPs (see
# configs/README.md for the table): TODO(measure) -- provisional value.
v1_dense_key_strides = (1, 1, 2, 1)
