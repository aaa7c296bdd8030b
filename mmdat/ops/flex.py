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

Imports torch only.
"""
import functools
from typing import Callable, Optional, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask


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
        mod = None if score_mod is None else (lambda s, b, h, i, j: score_mod(s, b, h, i, j, *buffers))
        fn = entry if torch.compiler.is_compiling() else _compiled(entry)
        return fn(q, k, v, mod, block_mask, scale)
    return _dense_flex_attention(q, k, v, score_mod, buffers, block_mask, scale)
