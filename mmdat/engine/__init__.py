"""Engine helpers: atomic checkpoint writing (see :mod:`mmdat.engine.atomic_checkpoint`)."""
from .atomic_checkpoint import atomic_save_checkpoint, install_atomic_checkpoints

__all__ = ['atomic_save_checkpoint', 'install_atomic_checkpoints']

install_atomic_checkpoints()

# LoadImageFromFileOrSkip (mmdat/datasets/transforms.py) is registered with the engine
# helpers, so that `import mmdat` makes it available to mmdet / mmseg / mmpretrain pipelines.
from ..datasets import transforms as _transforms  # noqa: E402,F401
