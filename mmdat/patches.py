"""Everything ``import mmdat`` changes in other libraries, in one place.

:func:`apply` (run by ``import mmdat``; idempotent) makes four changes. Where MMEngine or
torch has an extension point it is used; the two wraps remain where none exists.

1. ``mmdat::`` config bases (:func:`resolve_mmdat_config_bases`): adds mmdat to
   ``mmengine.config.utils.MODULE2PACKAGE`` and **wraps** ``Config._get_cfg_path`` so that
   ``mmdat::<path>`` resolves to the package's configs, flat names and editable installs
   included, with no ``_scope_`` tag. MMEngine's own ``pkg::`` lookup needs a ``/`` in the
   path, finds packages through ``pkg_resources`` (``site-packages/mmdat`` for an editable
   install, where no configs are) and tags external bases with ``_scope_='mmdat'``, a scope
   with no registries behind it (MMEngine would then fall back to its root ``TRANSFORMS``,
   which lacks e.g. mmdet's ``PackDetInputs``). Other ``pkg::`` paths are left to MMEngine.
2. ``weights_only`` loading of MMEngine checkpoints (:func:`allow_mmengine_checkpoints`):
   torch's ``torch.serialization.add_safe_globals`` with exactly the types those checkpoints
   pickle (:func:`mmdat.utils.checkpoint.mmengine_safe_globals`).
3. Atomic local writes (:func:`use_atomic_local_writes`): MMEngine's storage-backend registry
   (``register_backend('local', ..., force=True)``) gets
   :class:`mmdat.engine.AtomicLocalBackend`, so checkpoints and every other local file
   MMEngine writes through its file backends are replaced atomically.
4. Deterministic resume (:func:`add_rng_state_hook`): :class:`mmdat.engine.RNGStateHook`, an
   MMEngine hook, saves torch's RNG state with each checkpoint and restores it on resume.
   MMEngine has no list of hooks every Runner gets, so ``Runner.register_hooks`` is **wrapped**
   to add it unless the config's ``custom_hooks`` already has one.
"""
import functools
from typing import Optional, Tuple

__all__ = ['apply', 'resolve_mmdat_config_bases', 'allow_mmengine_checkpoints', 'use_atomic_local_writes',
           'add_rng_state_hook']


def resolve_mmdat_config_bases() -> None:
    """Lets MMEngine configs inherit ``mmdat::<path>`` (change 1)."""
    from mmengine.config import Config, utils as config_utils

    from .utils.config import MMDAT_PREFIX, get_config_path
    config_utils.MODULE2PACKAGE.setdefault('mmdat', 'mmdat')
    original = Config._get_cfg_path  # the function behind the staticmethod
    if getattr(original, '_mmdat', False):
        return

    @functools.wraps(original)
    def _get_cfg_path(cfg_path: str, filename: str) -> Tuple[str, Optional[str]]:
        if cfg_path.startswith(MMDAT_PREFIX):
            return get_config_path(cfg_path), None  # no scope: see the module docstring
        return original(cfg_path, filename)

    _get_cfg_path._mmdat = True  # type: ignore[attr-defined]
    Config._get_cfg_path = staticmethod(_get_cfg_path)


def allow_mmengine_checkpoints() -> None:
    """Lets ``torch.load(weights_only=True)`` read the checkpoints MMEngine saves (change 2)."""
    import torch

    from .utils.checkpoint import mmengine_safe_globals
    if hasattr(torch.serialization, 'add_safe_globals'):  # torch < 2.4 loads them anyway
        torch.serialization.add_safe_globals(mmengine_safe_globals())


def use_atomic_local_writes() -> None:
    """Makes MMEngine's ``local`` storage backend :class:`~mmdat.engine.AtomicLocalBackend` (change 3)."""
    from mmengine.fileio.backends import register_backend

    from .engine.atomic_checkpoint import AtomicLocalBackend
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')


def add_rng_state_hook() -> None:
    """Gives every MMEngine Runner an :class:`~mmdat.engine.RNGStateHook` (change 4)."""
    from mmengine.runner import Runner

    from .engine.rng_state import RNGStateHook
    original = Runner.register_hooks
    if getattr(original, '_mmdat', False):
        return

    def _is_rng_state_hook(hook) -> bool:
        return isinstance(hook, RNGStateHook) or (isinstance(hook, dict) and hook.get('type') in
                                                  ('RNGStateHook', RNGStateHook))

    @functools.wraps(original)
    def register_hooks(self, default_hooks=None, custom_hooks=None):
        custom_hooks = list(custom_hooks or [])
        if not any(_is_rng_state_hook(h) for h in custom_hooks):
            custom_hooks.append(RNGStateHook())
        return original(self, default_hooks, custom_hooks)

    register_hooks._mmdat = True  # type: ignore[attr-defined]
    Runner.register_hooks = register_hooks


def apply() -> None:
    """Makes all four changes (idempotent)."""
    resolve_mmdat_config_bases()
    allow_mmengine_checkpoints()
    use_atomic_local_writes()
    add_rng_state_hook()
