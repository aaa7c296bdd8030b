"""Atomic checkpoint writing for MMEngine runners.

MMEngine 0.10.7's ``save_checkpoint`` writes ``iter_N.pth`` / ``epoch_N.pth`` in place
(``LocalBackend.put`` opens the final path with ``'wb'``). A process killed while writing
leaves a truncated file under the final name; when the name already existed (re-running
into the same work dir, ``save_last``/``save_best`` files, ``--resume`` after a crash
that repeats an iteration) the previous good checkpoint is destroyed.

:func:`install_atomic_checkpoints` (called once when :mod:`mmdat` is imported) replaces
the one name the Runner calls, ``mmengine.runner.runner.save_checkpoint``, with
:func:`atomic_save_checkpoint`: for a local path it has MMEngine write the checkpoint to a
temporary file *in the same folder*, flushes it to disk (``fsync``), then renames it over
the final name with ``os.replace`` (atomic on POSIX and Windows within one file system)
and fsyncs the folder. A crash at any point leaves either the old file or the new one,
never a broken one; the temporary ``.<name>.tmp-<pid>`` file of a killed writer is left
behind (it never matches ``*.pth`` globs used by ``find_latest_checkpoint``), and is
removed when the write fails with an exception. Remote URIs (``s3://``, ``pavi://``...)
go to MMEngine unchanged.

The ``last_checkpoint`` pointer is written by ``CheckpointHook`` only after
``save_checkpoint`` returns, so it never names a partial file.

Deterministic resume: MMEngine saves no random-number state, so after ``--resume`` the
layers that draw from torch's generator (dropout in the heads, drop path, RoI samplers)
see different numbers than the uninterrupted run would have. Checkpoints saved by the
Runner therefore also hold ``rng_state`` (torch's CPU generator and, when present, the CUDA
generators: tensors, fine for ``weights_only`` loading), and ``Runner.resume`` restores it.
Numpy and Python ``random`` (the data pipeline) are not restored: on resume the loop
replays the data loader up to the saved iteration, which consumes them again exactly as the
first run did.
"""
import os
import os.path as osp
import re

import torch

__all__ = ['atomic_save_checkpoint', 'install_atomic_checkpoints']

_original_save = None
_original_resume = None


def rng_state() -> dict:
    state = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    if not isinstance(state, dict) or 'torch' not in state:
        return
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def _is_local(path) -> bool:
    return not re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*://', str(path))


def _fsync_dir(folder: str):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None):
    """``mmengine.runner.checkpoint.save_checkpoint`` made atomic for local paths."""
    from mmengine.runner import checkpoint as mm_checkpoint
    save = _original_save or mm_checkpoint.save_checkpoint
    filename = str(filename)
    if not _is_local(filename) or file_client_args is not None or backend_args is not None:
        return save(checkpoint, filename, file_client_args=file_client_args, backend_args=backend_args)
    folder = osp.dirname(osp.abspath(filename))
    os.makedirs(folder, exist_ok=True)
    tmp = osp.join(folder, f'.{osp.basename(filename)}.tmp-{os.getpid()}')
    try:
        save(checkpoint, tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _runner_save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None):
    """What the Runner calls: adds the RNG state, then saves atomically."""
    if isinstance(checkpoint, dict) and 'rng_state' not in checkpoint:
        checkpoint['rng_state'] = rng_state()
    return atomic_save_checkpoint(checkpoint, filename, file_client_args, backend_args)


def _resume(self, filename, *args, **kwargs):
    """``Runner.resume`` that also restores the RNG state saved with the checkpoint."""
    loaded = {}
    load = self.load_checkpoint

    def load_and_keep(*a, **k):
        loaded['checkpoint'] = load(*a, **k)
        return loaded['checkpoint']

    self.load_checkpoint = load_and_keep
    try:
        result = _original_resume(self, filename, *args, **kwargs)
    finally:
        del self.load_checkpoint
    checkpoint = loaded.get('checkpoint')
    if isinstance(checkpoint, dict):
        set_rng_state(checkpoint.get('rng_state'))
    return result


def install_atomic_checkpoints():
    """Makes MMEngine's Runner save checkpoints through :func:`atomic_save_checkpoint` (with
    the RNG state) and restore the RNG state in ``Runner.resume``."""
    global _original_save, _original_resume
    from mmengine.runner import checkpoint as mm_checkpoint
    from mmengine.runner import runner as mm_runner
    if _original_save is None:
        _original_save = mm_checkpoint.save_checkpoint
        _original_resume = mm_runner.Runner.resume
    mm_runner.save_checkpoint = _runner_save_checkpoint
    mm_runner.Runner.resume = _resume
