"""mmdat: Deformable Attention Transformer (DAT, DAT++) for the OpenMMLab 2.x stack.

Importing it registers the ``DAT`` backbone in MMEngine's root ``MODELS`` registry, which
mmdet, mmseg and mmpretrain registries all fall back to, and lets MMEngine configs inherit
mmdat's own as ``_base_ = 'mmdat::mask_rcnn_dat_t_3x.py'`` (see :mod:`mmdat.utils.config`).
"""
from . import models  # noqa: F401
from .utils import checkpoint  # noqa: F401  torch.load(weights_only=True) reads mmengine checkpoints
from .utils.config import register_mmdat_configs
from . import engine  # noqa: F401  atomic checkpoint writing; LoadImageFromFileOrSkip transform
from .version import __version__  # noqa: F401

register_mmdat_configs()
