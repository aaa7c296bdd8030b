"""Neighborhood attention by NATTEN's ops, where NATTEN is installed and agrees.

NATTEN is optional and imported on first use. Its unfused QK (with relative position bias)
and AV ops exist up to NATTEN 0.17 (``na2d_qk(rpb=...)`` / ``na2d_av`` from 0.15,
``natten2dqkrpb`` / ``natten2dav`` before); 0.20 dropped the bias, so it is not used.
:func:`usable` runs them once per kernel size and device on a probe input against
:func:`.reference.neighborhood_attention`; :func:`mmdat.ops.config.choose_backend` asks it
before answering ``'natten'``.

Imports torch only (and natten, lazily).
"""
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference

#: ``qk(q, k, rpb, kernel_size)`` and ``av(attn, v, kernel_size)``
_Ops = Tuple[Callable, Callable]
#: NATTEN's ops by (kernel size, device type) once probed; ``None`` where missing or wrong.
_probed: Dict[Tuple[int, str], Optional[_Ops]] = {}


def _functions() -> Optional[_Ops]:
    """NATTEN's unfused QK / AV ops (dilation 1), if an installed NATTEN has them."""
    try:
        import natten.functional as functional
    except ImportError:
        return None
    qk, av = getattr(functional, 'na2d_qk', None), getattr(functional, 'na2d_av', None)
    if qk is not None and av is not None:  # natten 0.15 - 0.17
        return (lambda q, k, rpb, ks: qk(q, k, kernel_size=ks, dilation=1, rpb=rpb),
                lambda a, v, ks: av(a, v, kernel_size=ks, dilation=1))
    qk, av = getattr(functional, 'natten2dqkrpb', None), getattr(functional, 'natten2dav', None)
    if qk is not None and av is not None:  # natten < 0.15
        return (lambda q, k, rpb, ks: qk(q, k, rpb, ks, 1), lambda a, v, ks: av(a, v, ks, 1))
    return None


def _probe(kernel_size: int, device: str) -> Optional[_Ops]:
    ops = _functions()
    if ops is None:
        return None
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, kernel_size + 3, kernel_size + 2, 8, generator=gen).to(device) for _ in range(3))
    rpb = torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen).to(device)
    try:
        theirs = ops[1](ops[0](q, k, rpb, kernel_size).softmax(dim=-1), v, kernel_size)
    except Exception as e:  # an installed natten that cannot run here (e.g. built for CUDA only)
        warnings.warn(f'natten is installed but cannot run on {device} ({e}); using mmdat\'s neighborhood attention')
        return None
    if not torch.allclose(theirs, reference.neighborhood_attention(q, k, v, rpb, kernel_size), atol=1e-5):
        warnings.warn('natten disagrees with the NA2D reference; using mmdat\'s neighborhood attention')
        return None
    return ops


# a constant to torch.compile: traced, the probe would break the graph
@torch.compiler.assume_constant_result
def usable(kernel_size: int, device: str) -> bool:
    """Whether NATTEN is installed and computes :func:`.reference.neighborhood_attention` at
    ``kernel_size`` on ``device`` (a device type) tensors; checked once each."""
    key = (kernel_size, device)
    if key not in _probed:
        _probed[key] = _probe(kernel_size, device)
    return _probed[key] is not None


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                           kernel_size: int) -> torch.Tensor:
    """:func:`.reference.neighborhood_attention` (no dropout) by NATTEN's ops, where
    :func:`usable` found them (``q``, ``k``, ``v``: ``B x heads x H x W x d``, ``q`` scaled)."""
    ops = _probed.get((kernel_size, q.device.type))
    if ops is None:
        raise RuntimeError(f'natten is not usable for kernel size {kernel_size} on {q.device.type} '
                           '(see mmdat.ops.config.choose_backend)')
    qk, av = ops
    return av(qk(q, k, bias_table, kernel_size).softmax(dim=-1), v, kernel_size)
