"""Loading MMEngine checkpoints under ``torch.load(weights_only=True)``.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``: it unpickles only tensors,
builtin containers and an allow-list of globals. MMEngine 0.10.7 calls ``torch.load`` without
the argument, and the checkpoints it saves hold a few objects beyond that list (the
``MessageHub``'s ``HistoryBuffer`` log buffers with their numpy arrays and scalars), so
``runner.resume()`` and testing with a saved checkpoint fail with
``UnpicklingError: Weights only load failed``.

:func:`allow_mmengine_checkpoints` (called when :mod:`mmdat` is imported) adds exactly those
types to torch's allow-list with :func:`torch.serialization.add_safe_globals`. The safe
unpickler stays on: a checkpoint that names any other global (``os.system``, ``eval``, a
class with a malicious ``__reduce__``, ...) is still refused before anything runs.

What an MMEngine checkpoint pickles, beyond torch's own allow-list:

* ``mmengine.logging.history_buffer.HistoryBuffer`` (``message_hub.log_scalars``);
* ``builtins.getattr``: ``HistoryBuffer.__getstate__`` pickles its statistics methods as
  ``getattr(HistoryBuffer, 'mean')`` etc. ``getattr`` itself is *not* allowed: the name is
  bound to :func:`_history_buffer_statistic`, which resolves only public methods of
  ``HistoryBuffer`` and refuses everything else;
* numpy arrays, dtypes and scalars: ``numpy.ndarray``, ``numpy.dtype`` (and its per-type
  subclasses ``numpy.dtypes.*DType``), ``numpy._core.multiarray._reconstruct`` and
  ``numpy._core.multiarray.scalar`` (also under their numpy 1.x names ``numpy.core.*``, for
  checkpoints saved with numpy 1).

``collections.OrderedDict``/``Counter`` (state dicts, ``MultiStepLR`` milestones),
``torch.Size``, tensors and storages are in torch's default list already.
"""
import pickle
from typing import Any, List, Tuple, Union

import numpy as np
import torch

__all__ = ['allow_mmengine_checkpoints', 'mmengine_safe_globals']


def _history_buffer_statistic(obj: Any, name: Any) -> Any:
    """Stands in for ``builtins.getattr`` while unpickling: only ``getattr(HistoryBuffer, m)``
    for a public method ``m`` defined on ``HistoryBuffer`` (``min``, ``max``, ``mean``, ...)."""
    from mmengine.logging import HistoryBuffer
    if (obj is HistoryBuffer and isinstance(name, str) and not name.startswith('_')
            and callable(vars(HistoryBuffer).get(name))):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'weights_only load: refusing getattr({obj!r}, {name!r}); mmdat allows getattr only '
        'for the statistics methods of mmengine.logging.HistoryBuffer')


def _numpy_core():
    try:
        from numpy import _core as core  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy import core
    return core


def mmengine_safe_globals() -> List[Union[Any, Tuple[Any, str]]]:
    """The entries :func:`allow_mmengine_checkpoints` adds to torch's allow-list."""
    from mmengine.logging import HistoryBuffer
    core = _numpy_core()
    reconstruct, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    entries: List[Union[Any, Tuple[Any, str]]] = [
        HistoryBuffer,
        (_history_buffer_statistic, 'builtins.getattr'),
        np.ndarray,
        np.dtype,
    ]
    # Both module paths, whatever numpy saved the checkpoint.
    for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        entries += [(reconstruct, f'{module}._reconstruct'), (scalar, f'{module}.scalar')]
    dtypes = getattr(np, 'dtypes', None)  # numpy >= 1.25
    if dtypes is not None:
        entries += [getattr(dtypes, n) for n in dir(dtypes)
                    if n.endswith('DType') and isinstance(getattr(dtypes, n), type)]
    return entries


_done = False


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read the checkpoints MMEngine saves. Idempotent."""
    global _done
    if _done or not hasattr(torch.serialization, 'add_safe_globals'):  # torch < 2.4: nothing to do
        return
    torch.serialization.add_safe_globals(mmengine_safe_globals())
    _done = True


allow_mmengine_checkpoints()
