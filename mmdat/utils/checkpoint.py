"""What MMEngine checkpoints pickle beyond ``torch.load(weights_only=True)``'s allow-list.

MMEngine 0.10.7 calls ``torch.load`` without ``weights_only``, which torch >= 2.6 defaults to
True; its checkpoints hold a few objects beyond torch's allow-list, so ``runner.resume()``
and testing a saved checkpoint fail with ``UnpicklingError: Weights only load failed``.
:mod:`mmdat.patches` adds exactly these to the allow-list; the safe unpickler stays on, so a
checkpoint that names any other global (``os.system``, ``eval``, a class with a malicious
``__reduce__``) is still refused before anything runs:

* ``mmengine.logging.history_buffer.HistoryBuffer`` (``message_hub.log_scalars``);
* ``builtins.getattr``, which ``HistoryBuffer.__getstate__`` pickles as
  ``getattr(HistoryBuffer, 'mean')`` etc.: bound to :func:`_history_buffer_statistic`, which
  resolves only public methods of ``HistoryBuffer`` and refuses everything else;
* numpy arrays, dtypes (and ``numpy.dtypes.*DType``) and scalars, under their numpy 2 and
  numpy 1 module paths.
"""
import pickle
from typing import Any, List, Tuple, Union

import numpy as np

__all__ = ['mmengine_safe_globals']


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
    """The entries :mod:`mmdat.patches` adds to torch's allow-list (``add_safe_globals``)."""
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

