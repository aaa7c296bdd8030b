"""FlexAttention as the CUDA paths of mmdat's attention call it.

On CUDA, ``flex_attention`` compiled (fused Triton kernels, forward and backward; inside an
enclosing ``torch.compile`` the call is inlined instead). On any other device the same
``score_mod`` and ``mask_mod`` run through FlexAttention's dense math implementation,
forward and backward, gradients to the ``score_mod``'s captured tensors included: that is
what lets the CUDA paths be verified without a GPU. The public ``flex_attention`` refuses a
CPU backward, so there the higher-order op is called directly with the captured tensors
passed explicitly (as Dynamo passes them on CUDA). The math path materialises the scores:
it is for verification, not for speed.

``score_mod(score, b, h, q_idx, kv_idx, *buffers)`` takes its tensors as trailing arguments,
``buffers``, instead of closing over them, so that both calls see the same function.

A failed kernel build never stops training: :func:`with_fallback` runs a kind's fused path
and, where compiling it fails (Inductor, Triton, :func:`compile_failure`), warns once and runs
the kind's fallback from then on. The backward is lowered with the forward, so that its
compile failures surface in the forward call, where they can be caught.

Imports torch only.
"""
import contextlib
import functools
import logging
from typing import Callable, Dict, Optional, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask

from .config import flex_enabled, warn_once

#: Attention kinds whose FlexAttention failed to compile in this process, and why.
_failures: Dict[str, str] = {}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's for ``x``'s device when it is on, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@functools.lru_cache(maxsize=None)
def _compiled(entry: Callable) -> Callable:
    # dynamic=None: the first map size compiles static, another one recompiles with dynamic
    # sizes, so multi-scale training does not run into the recompile limit
    return torch.compile(entry)


def _lower_backward_with_forward():
    # AOTAutograd otherwise lowers the backward at the first backward call, where no caller
    # of ours can catch a failure (the option is in torch 2.11 and 2.13; checked, not assumed)
    import torch._functorch.config as config  # not loaded by `import torch`

    if 'force_non_lazy_backward_lowering' in config.get_config_copy():
        return config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def compile_failure(exc: BaseException) -> Optional[str]:
    """Why building the fused kernels failed, when ``exc`` (or an exception it chains to) says
    so: torch.compile's backend (``BackendCompilerFailed``, Inductor's ``InductorError``),
    Dynamo itself (``InternalTorchDynamoError``), Inductor or Triton at the first launch.
    ``None`` for anything else (out of memory, wrong operands): a fallback would not help."""
    if isinstance(exc, torch.OutOfMemoryError):
        return None
    from torch._dynamo import exc as dynamo_exc

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        module = type(exc).__module__ or ''
        if (isinstance(exc, (dynamo_exc.BackendCompilerFailed, dynamo_exc.InternalTorchDynamoError))
                or module.split('.')[0] == 'triton' or module.startswith('torch._inductor')):
            inner = getattr(exc, 'inner_exception', None) or exc
            lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
            return f'{type(inner).__name__}: {lines[0] if lines else ""}'[:300]
        exc = exc.__cause__ or exc.__context__
    return None


def compile_failures() -> Dict[str, str]:
    """The attention kinds running their fallback in this process, and why (see
    :func:`with_fallback`)."""
    return dict(_failures)


def with_fallback(kind: str, fused: Callable, fallback: Callable, *args):
    """``fused(*args)``, the FlexAttention path of ``kind``; where compiling it fails
    (:func:`compile_failure` says why), a warning naming the reason and ``fallback(*args)``,
    then and for the rest of the process; ``fallback(*args)`` from the start where
    ``MMDAT_FLEX=0`` (:func:`mmdat.ops.config.flex_enabled`).

    Inside an enclosing ``torch.compile`` the call is traced as it is, nothing caught: the
    enclosing compile fails as a whole.
    """
    if kind in _failures or not flex_enabled():
        return fallback(*args)
    if torch.compiler.is_compiling():
        return fused(*args)
    try:
        return fused(*args)
    except Exception as exc:
        reason = compile_failure(exc)
        if reason is None:
            raise
        # the whole traceback once, for a bug report: the warning has its first line only
        logging.getLogger(__name__).warning('FlexAttention build error (%s attention)', kind, exc_info=True)
    _failures[kind] = reason
    warn_once(f'mmdat: FlexAttention for the {kind} attention could not be compiled ({reason}); '
              f'running {fallback.__module__}.{fallback.__name__} instead from now on (slower, more memory)')
    return fallback(*args)


def _dense_flex_attention(q, k, v, score_mod, buffers, block_mask, scale):
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op
    from torch.nn.attention.flex_attention import _apply_kernel_options, _create_empty_block_mask, _identity

    if score_mod is None:
        score_mod, buffers = _identity, ()
    if block_mask is None:
        block_mask = _create_empty_block_mask(q, k)
    options = _apply_kernel_options(q, k, v, False, None)
    out, _, _ = flex_attention_op(q, k, v, score_mod, block_mask.as_tuple(), scale, options, tuple(buffers), ())
    return out


def flex_attention_call(entry: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        score_mod: Optional[Callable] = None, buffers: Sequence[torch.Tensor] = (),
                        block_mask: Optional[BlockMask] = None, scale: float = 1.0) -> torch.Tensor:
    """``flex_attention(q, k, v)`` (``B x heads x L x d``) with ``score_mod(..., *buffers)``
    and ``block_mask``: fused on CUDA, the dense math path elsewhere (see the module).

    ``entry(q, k, v, score_mod, block_mask, scale)`` calls ``flex_attention``: a function of
    the caller's own, compiled on CUDA. Dynamo keeps its compiled graphs (and counts them
    against its recompile limit) per code object, so each attention kind has its own.
    """
    if q.device.type == 'cuda':
        return _fused_flex_attention(entry, q, k, v, score_mod, buffers, block_mask, scale)
    return _dense_flex_attention(q, k, v, score_mod, buffers, block_mask, scale)


def _fused_flex_attention(entry, q, k, v, score_mod, buffers, block_mask, scale):
    mod = None if score_mod is None else (lambda s, b, h, i, j: score_mod(s, b, h, i, j, *buffers))
    if torch.compiler.is_compiling():
        return entry(q, k, v, mod, block_mask, scale)
    with _lower_backward_with_forward():
        return _compiled(entry)(q, k, v, mod, block_mask, scale)
