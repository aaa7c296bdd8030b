"""mmdat: Deformable Attention Transformer (DAT, DAT++) for the OpenMMLab 2.x stack.

Importing it registers the ``DAT`` backbone in MMEngine's root ``MODELS`` registry, which
mmdet, mmseg and mmpretrain registries all fall back to, and applies :mod:`mmdat.patches`
(``mmdat::`` config bases, ``weights_only`` loading of MMEngine checkpoints, atomic local
writes, the RNG state in checkpoints).
"""
from . import engine, models, patches  # noqa: F401  registering DAT, hooks, LoadImageFromFileOrSkip
from .version import __version__  # noqa: F401

patches.apply()
