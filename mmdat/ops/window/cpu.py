"""Window attention on CPU: the C kernels of ``csrc/window_attention.c`` as the torch.library
ops ``mmdat::window_attention_forward`` / ``_backward``, with a fake implementation and a
registered autograd formula. No padded, rolled or partitioned copy of the map is made.
"""
from typing import Tuple

import torch

from .. import build
from ..config import in_full_precision, warn_once
from . import reference

LIBRARY = build.Library('window_attention', ['window_attention.c'], {'wa_forward': (6, 8), 'wa_backward': (10, 8)})


def _check(qkv: torch.Tensor, qkv_bias: torch.Tensor, table: torch.Tensor, num_heads: int, window_size: int,
           shift_size: int):
    C3 = qkv.shape[-1]
    if (qkv.dim() != 4 or num_heads < 1 or C3 % (3 * num_heads) or tuple(qkv_bias.shape) != (C3, )
            or tuple(table.shape) != (num_heads, (2 * window_size - 1) ** 2) or not 0 <= shift_size < window_size):
        raise ValueError(f'window attention: inconsistent arguments: qkv {tuple(qkv.shape)}, qkv_bias '
                         f'{tuple(qkv_bias.shape)}, table {tuple(table.shape)}, {num_heads} heads, window '
                         f'{window_size}, shift {shift_size}')


@torch.library.custom_op('mmdat::window_attention_forward', mutates_args=())
def window_attention_forward(qkv: torch.Tensor, qkv_bias: torch.Tensor, table: torch.Tensor, num_heads: int,
                             window_size: int, shift_size: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output ``B x H x W x C`` and log-sum-exp ``B x heads x H x W`` (float32 / float64)."""
    _check(qkv, qkv_bias, table, num_heads, window_size, shift_size)  # the kernels' bounds
    B, H, W, C3 = qkv.shape
    qkv, qkv_bias, table = qkv.contiguous(), qkv_bias.contiguous(), table.contiguous()
    out, lse = qkv.new_empty(B, H, W, C3 // 3), qkv.new_empty(B, num_heads, H, W)
    scale_ = qkv.new_tensor([scale])  # held: the kernel reads it through its pointer
    LIBRARY.function('wa_forward', qkv.dtype)(
        *build.pointers(qkv, qkv_bias, table, out, lse, scale_), B, num_heads, H, W,
        C3 // (3 * num_heads), window_size, shift_size, torch.get_num_threads())
    return out, lse


@window_attention_forward.register_fake
def _(qkv, qkv_bias, table, num_heads, window_size, shift_size, scale):
    B, H, W, C3 = qkv.shape
    return qkv.new_empty(B, H, W, C3 // 3), qkv.new_empty(B, num_heads, H, W)


@torch.library.custom_op('mmdat::window_attention_backward', mutates_args=())
def window_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, qkv_bias: torch.Tensor,
                              table: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
                              window_size: int, shift_size: int,
                              scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``qkv``, ``qkv_bias`` and ``table``."""
    B, H, W, C3 = qkv.shape
    qkv, qkv_bias, table = qkv.contiguous(), qkv_bias.contiguous(), table.contiguous()
    threads = torch.get_num_threads()
    # per-thread sums of the bias and table gradients
    dqkv, dbias, dtable = (torch.empty_like(qkv), qkv_bias.new_zeros(threads, C3),
                           table.new_zeros(threads, *table.shape))
    # held in variables: the kernel reads them through their pointers
    out, lse, grad_out, scale_ = (out.contiguous(), lse.contiguous(), grad_out.to(qkv.dtype).contiguous(),
                                  qkv.new_tensor([scale]))
    LIBRARY.function('wa_backward', qkv.dtype)(
        *build.pointers(qkv, qkv_bias, table, out, lse, grad_out, dqkv, dbias, dtable, scale_),
        B, num_heads, H, W, C3 // (3 * num_heads), window_size, shift_size, threads)
    return dqkv, dbias.sum(0), dtable.sum(0)


@window_attention_backward.register_fake
def _(grad_out, qkv, qkv_bias, table, out, lse, num_heads, window_size, shift_size, scale):
    return qkv.new_empty(qkv.shape), qkv_bias.new_empty(qkv_bias.shape), table.new_empty(table.shape)


def _setup_context(ctx, inputs, output):
    qkv, qkv_bias, table, *ctx.args = inputs
    ctx.save_for_backward(qkv, qkv_bias, table, *output)


def _backward(ctx, grad_out, grad_lse):
    return (*window_attention_backward(grad_out, *ctx.saved_tensors, *ctx.args), None, None, None, None)


torch.library.register_autograd('mmdat::window_attention_forward', _backward, setup_context=_setup_context)


def window_attention(qkv: torch.Tensor, qkv_bias: torch.Tensor, table: torch.Tensor, num_heads: int,
                     window_size: int, shift_size: int, scale: float) -> torch.Tensor:
    """:func:`.reference.window_attention` (without dropout) by the C kernels.

    Other floating dtypes and autocast run in float32 (:func:`.config.in_full_precision`);
    tensors the kernels cannot take (not on CPU, not strided) and a missing C compiler run the
    reference formulation (the former with one warning naming the reason).
    """
    _check(qkv, qkv_bias, table, num_heads, window_size, shift_size)
    reason = build.unsupported('window attention', qkv, qkv_bias, table)
    if reason is not None or not LIBRARY.available():
        if reason is not None:
            warn_once(f'mmdat: the CPU window attention op {reason}; running the reference formulation')
        return reference.window_attention(qkv, qkv_bias, table, num_heads, window_size, shift_size, scale)
    return in_full_precision(
        lambda qkv, bias, table: window_attention_forward(qkv, bias, table, num_heads, window_size, shift_size,
                                                          scale)[0], (qkv, qkv_bias, table))
