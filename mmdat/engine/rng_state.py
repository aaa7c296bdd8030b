"""Deterministic resume: torch's random-number state travels with the checkpoints.

MMEngine saves no random-number state, so after ``--resume`` the layers that draw from
torch's generator (dropout, drop path, RoI samplers) would see other numbers than the
uninterrupted run. Numpy and Python ``random`` (the data pipeline) need no restoring: the
resumed loop replays the data loader up to the saved iteration, which draws them again as
the first run did.
"""
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

__all__ = ['RNGStateHook', 'rng_state', 'set_rng_state']


def rng_state() -> dict:
    """torch's CPU generator state and, when CUDA is in use, the CUDA generators'."""
    state = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[dict]) -> None:
    """Restores what :func:`rng_state` returned; ignores anything else (older checkpoints)."""
    if not isinstance(state, dict) or 'torch' not in state:
        return
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Saves :func:`rng_state` as ``checkpoint['rng_state']`` and restores it when training
    resumes (at ``before_train``, after everything ``Runner.resume`` does, which may re-seed).

    A checkpoint loaded to start a new run (``load_from`` without resume: the run starts at
    iteration 0) leaves the generators as the run's seed set them. :mod:`mmdat.patches` adds
    this hook to every Runner; a config may list it in ``custom_hooks`` too.
    """

    priority = 'VERY_HIGH'  # before other before_train hooks that might draw numbers

    def __init__(self) -> None:
        self._loaded: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault('rng_state', rng_state())

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded = checkpoint.get('rng_state')

    def before_train(self, runner) -> None:
        if self._loaded is not None and runner.iter > 0:
            set_rng_state(self._loaded)
        self._loaded = None
