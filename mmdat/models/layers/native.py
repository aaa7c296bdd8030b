"""Transition shim: the kernel builder now lives in :mod:`mmdat.ops.build`.

Kept until every kernel is a source file in ``mmdat/ops/csrc/``: :func:`load` still takes C
source text (``common.h`` is included before it).
"""
from typing import Callable, Dict, Optional, Tuple

import torch

from mmdat.ops import build
from mmdat.ops.build import (Blas, blas, enabled, function, pointers, workspace,  # noqa: F401
                             workspace_views)

_workspaces = build._workspaces
_FLAGS = build.FLAG_SETS
_WIDE_FLAGS = build.WIDE_FLAGS
_cpu_fingerprint = build.cpu_fingerprint


def usable(x: torch.Tensor, library: Callable[[], Optional[object]]) -> bool:
    """Whether a kernel of ``library()`` can run on ``x``: on CPU, outside jit tracing and
    scripting (FLOP counters trace the PyTorch ops), once built."""
    return (x.device.type == 'cpu' and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and library() is not None)


def load(name: str, kernels: str, signatures: Dict[str, Tuple[int, int]], wide_vectors: bool = False):
    """The compiled C source text ``kernels`` (see :func:`mmdat.ops.build.load`), or ``None``."""
    if not enabled():
        return None
    import ctypes
    import warnings
    try:
        lib = ctypes.CDLL(build.build(name, [(f'{name}.c', '#include "common.h"\n' + kernels)],
                                      (_WIDE_FLAGS, ) * wide_vectors + _FLAGS))
    except Exception as e:
        warnings.warn(f'mmdat: native {name} kernels unavailable ({e}); using the PyTorch implementation')
        return None
    for kernel, (n_pointers, n_ints, *restype) in signatures.items():
        for suffix in ('f32', 'f64'):
            f = getattr(lib, f'{kernel}_{suffix}')
            f.argtypes = [ctypes.c_void_p] * n_pointers + [ctypes.c_int] * n_ints
            f.restype = restype[0] if restype else None
    return lib
