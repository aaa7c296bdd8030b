"""Atomic writes of local files, checkpoints included.

MMEngine's ``LocalBackend.put`` opens the final path with ``'wb'``: a process killed while
writing a checkpoint leaves a truncated file under the final name, and destroys the previous
good one when the name existed (``--resume`` after a crash that repeats an iteration,
``save_last`` / ``save_best``). :class:`AtomicLocalBackend` writes a temporary file in the same
folder, ``fsync``\\ s it, renames it over the final name (``os.replace``) and ``fsync``\\ s the
folder: a crash leaves the old file or the new one, never a broken one. A killed writer's
``.<name>.tmp-<pid>`` is left behind (it matches no ``*.pth`` glob); a failed write removes it.
:mod:`mmdat.patches` registers the backend as MMEngine's ``local`` storage backend.
"""
import io
import os
import os.path as osp
import re
from typing import Union

import torch
from mmengine.fileio.backends import LocalBackend

__all__ = ['AtomicLocalBackend', 'atomic_write', 'atomic_save_checkpoint']


def _fsync_dir(folder: str) -> None:
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


def atomic_write(path: Union[str, os.PathLike], data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = str(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = osp.join(folder, f'.{osp.basename(path)}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


class AtomicLocalBackend(LocalBackend):
    """MMEngine's ``LocalBackend`` whose ``put`` and ``put_text`` replace files atomically."""

    def put(self, obj: bytes, filepath: Union[str, os.PathLike]) -> None:
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, os.PathLike], encoding: str = 'utf-8') -> None:
        atomic_write(filepath, obj.encode(encoding))


def atomic_save_checkpoint(checkpoint: dict, filename: str) -> None:
    """``torch.save`` of ``checkpoint`` to ``filename``, atomic for local paths."""
    if re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*://', str(filename)):  # s3://, pavi://: MMEngine's
        from mmengine.runner.checkpoint import save_checkpoint
        return save_checkpoint(checkpoint, filename)
    with io.BytesIO() as f:
        torch.save(checkpoint, f)
        atomic_write(filename, f.getvalue())
