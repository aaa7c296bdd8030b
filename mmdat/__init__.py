"""mmdat: Deformable Attention Transformer (DAT, DAT++) for the OpenMMLab 2.x stack.

Importing it registers the ``DAT`` backbone in MMEngine's root ``MODELS`` registry, which
mmdet, mmseg and mmpretrain registries all fall back to, and applies :mod:`mmdat.patches`
(``mmdat::`` config bases, ``weights_only`` loading of MMEngine checkpoints, atomic local
writes, the RNG state in checkpoints).

Where mmengine or mmcv is not installed (a bare GPU machine with torch only), none of that
happens and :mod:`mmdat.ops` still imports; ``mmdat.models`` needs mmengine alone.
"""
from .version import __version__  # noqa: F401


def _openmmlab_installed() -> bool:
    try:
        import mmcv  # noqa: F401
        import mmengine  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name in ('mmcv', 'mmengine'):
            return False
        raise
    return True


#: Whether the OpenMMLab glue above was loaded.
OPENMMLAB = _openmmlab_installed()
if OPENMMLAB:
    from . import engine, models, patches  # noqa: F401  registering DAT, hooks, LoadImageFromFileOrSkip

    patches.apply()
