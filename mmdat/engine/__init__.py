"""MMEngine components: atomic local writes (:mod:`.atomic_checkpoint`), the RNG state in
checkpoints (:mod:`.rng_state`), bfloat16 mixed precision on CPU (:mod:`.cpu_amp`)."""
from .atomic_checkpoint import AtomicLocalBackend, atomic_save_checkpoint, atomic_write
from .cpu_amp import CPUBF16OptimWrapper
from .rng_state import RNGStateHook, rng_state, set_rng_state

__all__ = ['AtomicLocalBackend', 'atomic_save_checkpoint', 'atomic_write', 'CPUBF16OptimWrapper',
           'RNGStateHook', 'rng_state', 'set_rng_state']

# LoadImageFromFileOrSkip (mmdat/datasets/transforms.py) is registered with the engine
# components, so that `import mmdat` makes it available to mmdet / mmseg / mmpretrain pipelines.
from ..datasets import transforms as _transforms  # noqa: E402,F401
