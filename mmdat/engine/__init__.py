"""Engine helpers: atomic checkpoint writing (:mod:`mmdat.engine.atomic_checkpoint`) and
bfloat16 mixed precision on CPU (:mod:`mmdat.engine.cpu_amp`)."""
from .atomic_checkpoint import atomic_save_checkpoint, install_atomic_checkpoints
from .cpu_amp import CPUBF16OptimWrapper

__all__ = ['atomic_save_checkpoint', 'install_atomic_checkpoints', 'CPUBF16OptimWrapper']

install_atomic_checkpoints()

# LoadImageFromFileOrSkip (mmdat/datasets/transforms.py) is registered with the engine
# helpers, so that `import mmdat` makes it available to mmdet / mmseg / mmpretrain pipelines.
from ..datasets import transforms as _transforms  # noqa: E402,F401
