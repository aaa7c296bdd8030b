"""Every switch of mmdat's attention ops, in one place.

Environment variables (read when a kernel is first built or loaded):

* ``MMDAT_NATIVE_OPS=0`` disables every compiled kernel: the ops then run their PyTorch
  implementations (:func:`native_ops_enabled`).
* ``MMDAT_FLEX=0`` makes the CUDA paths of the deformable and neighborhood attention skip
  FlexAttention and run their fallbacks (:func:`flex_enabled`; :func:`mmdat.ops.flex.with_fallback`):
  for a GPU where FlexAttention's kernels fail where no caller can catch it (at the first
  backward, or inside a compiled model).
* ``MMDAT_CACHE_DIR``: where built kernels are kept (default ``$XDG_CACHE_HOME/mmdat``,
  else ``~/.cache/mmdat``; :func:`cache_dir`).

Context managers:

* ``with attention_impl('reference'):`` makes every module (or only those of the ``kinds``
  given) use that implementation whatever its own ``attn_impl``.
* ``with force_backend('cuda'):`` runs the CUDA paths of the modules (of ``kinds``) that take
  a fast path whatever the tensors' device: off CUDA they run FlexAttention's dense math path
  (:mod:`mmdat.ops.flex`), which checks the CUDA paths' math on a CPU.
* ``with deformable_cpu_strategy('torch-bias'):`` caps the implementation inside the CPU
  deformable attention op (:data:`DEFORMABLE_CPU_STRATEGIES`), to check one against another.

Per-module choice, the one function every module with an op calls::

    choose_backend(kind: str, attn_impl: str, x: torch.Tensor, dropout: bool = False,
                   natten_kernel_size: Optional[int] = None) -> str

``kind`` is one of :data:`KINDS`, ``attn_impl`` the module's ``'fast'`` or ``'reference'``,
``x`` a tensor of the call (its device decides), ``dropout`` whether attention dropout is
active (``module.training and p > 0``: only the reference formulation has it),
``natten_kernel_size`` the kernel size of a neighborhood module that allows NATTEN (its
``use_natten``). Returns ``'reference'`` (the official formulation in PyTorch ops), ``'cpu'``
(the CPU op: C kernels, or their PyTorch fallback when no compiler works), ``'cuda'`` (the
CUDA path) or ``'natten'`` (NATTEN's ops, where installed and they agree with the reference:
:mod:`mmdat.ops.neighborhood.natten`). While jit-tracing or scripting (FLOP counters) it is
``'reference'``; on devices without an mmdat op too, with one warning per device.

This module imports torch only (as does all of :mod:`mmdat.ops`).
"""
import contextlib
import os
import os.path as osp
import warnings
from typing import Callable, ContextManager, Dict, Iterable, Iterator, Optional, Sequence, Union

import torch

from .neighborhood import natten as _natten

#: The attention kinds (and other ops) a module can ask :func:`choose_backend` about.
KINDS = ('deformable', 'neighborhood', 'window', 'dwconv')
#: A module's ``attn_impl``: the fast ops, or the official formulation.
ATTN_IMPLS = ('fast', 'reference')
#: What :func:`choose_backend` returns.
BACKENDS = ('reference', 'cpu', 'cuda', 'natten')
#: What :func:`force_backend` can force: the CUDA paths run on any device (see :mod:`mmdat.ops.flex`).
FORCEABLE_BACKENDS = ('cuda', )
#: The implementations inside the CPU deformable attention op, best first: both passes in
#: fused C kernels (needs PyTorch's MKL), tiles with the bias in C, tiles in PyTorch alone
#: (as without a C compiler). Each runs where it can, else the next one.
DEFORMABLE_CPU_STRATEGIES = ('fused', 'native-bias', 'torch-bias')

_overrides: Dict[str, str] = {}
_forced: Dict[str, str] = {}
_deformable_cpu_strategy = DEFORMABLE_CPU_STRATEGIES[0]
_warned = set()


def native_ops_enabled() -> bool:
    """Whether compiled kernels may be built and used (``MMDAT_NATIVE_OPS`` is not ``0``)."""
    return os.environ.get('MMDAT_NATIVE_OPS', '1') != '0'


def flex_enabled() -> bool:
    """Whether the CUDA paths may run FlexAttention (``MMDAT_FLEX`` is not ``0``)."""
    return os.environ.get('MMDAT_FLEX', '1') != '0'


def cache_dir() -> str:
    """Folder of the built kernels: ``$MMDAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmdat``,
    else ``~/.cache/mmdat``."""
    return os.environ.get('MMDAT_CACHE_DIR') or osp.join(
        os.environ.get('XDG_CACHE_HOME') or osp.join(osp.expanduser('~'), '.cache'), 'mmdat')


def check_attn_impl(impl: str) -> str:
    """``impl`` if it is one of :data:`ATTN_IMPLS`; else a ``ValueError`` naming them."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {impl!r}')
    return impl


def _check_kinds(kinds: Optional[Union[str, Iterable[str]]]) -> Sequence[str]:
    kinds = KINDS if kinds is None else ((kinds,) if isinstance(kinds, str) else tuple(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f'attention kinds must be among {KINDS}, got {bad}')
    return kinds


@contextlib.contextmanager
def _per_kind(table: Dict[str, str], value: str, kinds: Sequence[str]) -> Iterator[None]:
    previous = {k: table.get(k) for k in kinds}
    table.update({k: value for k in kinds})
    try:
        yield
    finally:
        for k, p in previous.items():
            if p is None:
                table.pop(k, None)
            else:
                table[k] = p


def attention_impl(impl: str, kinds: Optional[Union[str, Iterable[str]]] = None) -> ContextManager[None]:
    """Within the block, every module of ``kinds`` (default: all) uses ``impl`` (``'fast'``
    or ``'reference'``) whatever its ``attn_impl``. Blocks nest; the innermost wins."""
    return _per_kind(_overrides, check_attn_impl(impl), _check_kinds(kinds))


def force_backend(backend: str, kinds: Optional[Union[str, Iterable[str]]] = None) -> ContextManager[None]:
    """Within the block, every module of ``kinds`` (default: all) that takes a fast path runs
    ``backend``'s code (one of :data:`FORCEABLE_BACKENDS`) whatever the tensors' device; the
    reference formulation stays where :func:`choose_backend` picks it. ``'cuda'`` off CUDA
    runs FlexAttention's dense math path: slow, for checking the CUDA paths on a CPU. For the
    ``'dwconv'`` kind, ``'cuda'`` is PyTorch's convolution. Blocks nest; the innermost wins."""
    if backend not in FORCEABLE_BACKENDS:
        raise ValueError(f'force_backend: the backend must be one of {FORCEABLE_BACKENDS}, got {backend!r}')
    return _per_kind(_forced, backend, _check_kinds(kinds))


@contextlib.contextmanager
def deformable_cpu_strategy(strategy: str) -> Iterator[None]:
    """Within the block, the CPU deformable attention op runs ``strategy`` (one of
    :data:`DEFORMABLE_CPU_STRATEGIES`) or, where that cannot run, a later one; by default the
    best that runs. For checking the implementations against each other. Blocks nest."""
    if strategy not in DEFORMABLE_CPU_STRATEGIES:
        raise ValueError(f'deformable_cpu_strategy: one of {DEFORMABLE_CPU_STRATEGIES}, got {strategy!r}')
    global _deformable_cpu_strategy
    previous, _deformable_cpu_strategy = _deformable_cpu_strategy, strategy
    try:
        yield
    finally:
        _deformable_cpu_strategy = previous


def deformable_cpu_allows(strategy: str) -> bool:
    """Whether the CPU deformable attention op may run ``strategy``: it is not before the
    innermost :func:`deformable_cpu_strategy` block's in :data:`DEFORMABLE_CPU_STRATEGIES`."""
    order = DEFORMABLE_CPU_STRATEGIES
    return order.index(strategy) >= order.index(_deformable_cpu_strategy)


def resolved_impl(kind: str, attn_impl: str) -> str:
    """The implementation a module of ``kind`` with ``attn_impl`` uses: the innermost
    :func:`attention_impl` block's, else its own."""
    return _overrides.get(kind, attn_impl)


def choose_backend(kind: str, attn_impl: str, x: torch.Tensor, dropout: bool = False,
                   natten_kernel_size: Optional[int] = None) -> str:
    """One of :data:`BACKENDS`: see the module docstring."""
    impl = resolved_impl(kind, attn_impl)
    if impl != 'fast' or dropout or torch.jit.is_tracing() or torch.jit.is_scripting():
        return 'reference'
    if kind in _forced:
        return _forced[kind]
    device = x.device.type
    if device not in ('cpu', 'cuda'):
        warn_once(f'mmdat has no {kind} attention op for {device} tensors; running the reference formulation')
        return 'reference'
    if kind == 'neighborhood' and natten_kernel_size is not None and _natten.usable(natten_kernel_size, device):
        return 'natten'
    return device


def warn_once(message: str, category=UserWarning):
    """``warnings.warn(message)`` the first time this message comes up in the process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, category, stacklevel=3)


def in_full_precision(fn: Callable, tensors: Sequence[Optional[torch.Tensor]], *args):
    """``fn(*tensors, *args)``, with ``tensors`` all float32 or all float64: the precision
    policy of the CPU kernels.

    Under autocast, or when ``tensors`` (``None`` entries skipped) are not all float32 or
    all float64, ``fn`` gets float32 copies with autocast off; its result is then returned
    in float32 under autocast and in the first tensor's dtype otherwise. A tensor that is not
    floating-point is a ``TypeError``.
    """
    present = [t for t in tensors if t is not None]
    integral = [t.dtype for t in present if not t.is_floating_point()]
    if integral:  # a float32 copy would hide the mistake: attention on integers means nothing
        raise TypeError(f'mmdat attention ops take floating-point tensors, got {integral[0]}')
    device_type = present[0].device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtypes = {t.dtype for t in present}
    if not autocast and (dtypes == {torch.float32} or dtypes == {torch.float64}):
        return fn(*tensors, *args)
    with torch.autocast(device_type, enabled=False):
        out = fn(*(None if t is None else t.float() for t in tensors), *args)
    return out if autocast else _cast(out, present[0].dtype)


def _cast(out, dtype):
    if isinstance(out, (tuple, list)):
        return type(out)(_cast(o, dtype) for o in out)
    return out.to(dtype)
