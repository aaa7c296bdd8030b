"""mmdat: Deformable Attention Transformer (DAT, DAT++) for the OpenMMLab 2.x stack.

Importing it registers the ``DAT`` backbone in MMEngine's root ``MODELS`` registry, which
mmdet, mmseg and mmpretrain registries all fall back to.
"""
from . import models  # noqa: F401
from .version import __version__  # noqa: F401
