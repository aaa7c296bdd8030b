"""Residual depth-wise conv and ConvMlp on CPU: the C kernels of ``csrc/residual_dwconv.c`` as
torch.library ops with fake implementations and registered autograd formulas.

``mmdat::residual_dwconv``: ``act(x + DWConv3x3(x))`` in one pass over the map, forward and
backward, with one full-size output each (PyTorch's conv, add and GELU make three, and as
many again backward, and the GELU saves its input).

``mmdat::conv_mlp``: the whole DAT++ MLP without dropout as one node that keeps nothing
hidden-sized for the backward pass: it recomputes the first 1x1 conv from the input rows
(which the weight gradient needs anyway) and the GELU output from that (one kernel pass).
The hidden layer, 4x the block's width, is most of what an MLP would keep, and fresh
hidden-size tensors cost more here than the recomputation (the OS maps them anew, page by
page, on every call): all hidden-size tensors live in a kept :func:`..build.workspace`,
which no op output views.
"""
from typing import Optional, Tuple

import torch

from .. import build
from ..config import in_full_precision, warn_once
from . import reference

LIBRARY = build.Library('residual_dwconv', ['residual_dwconv.c'],
                        {'residual_dwconv_forward': (5, 6), 'residual_dwconv_backward': (9, 6)}, wide_vectors=True)


def tap_major(weight: torch.Tensor) -> torch.Tensor:
    """A depth-wise 3x3 conv's ``(Ch, 1, 3, 3)`` weights as the kernels take them, ``(9, Ch)``."""
    return weight.reshape(weight.shape[0], 9).t().contiguous()


def kernel_forward(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor, gelu: bool, out: torch.Tensor,
                   input_bias: Optional[torch.Tensor] = None):
    """``out = act(y + DWConv3x3(y))``, ``y = x + input_bias`` (per channel; default 0), by the C
    kernel; ``x``, ``out``: contiguous ``B x H x W x Ch``, ``wt``: :func:`tap_major` weights."""
    B, H, W, Ch = x.shape
    LIBRARY.function('residual_dwconv_forward', x.dtype)(
        *build.pointers(x, wt, bias, input_bias, out), B, H, W, Ch, int(gelu), torch.get_num_threads())


def kernel_backward(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor, gelu: bool, grad_out: torch.Tensor,
                    grad_x: torch.Tensor, input_bias: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Writes the gradient w.r.t. ``x`` (hence ``y``) into ``grad_x`` (all contiguous ``B x H x W x
    Ch``) and returns those w.r.t. the conv's weight ``(Ch, 1, 3, 3)``, its bias and
    ``input_bias`` (the sum of ``grad_x`` over the positions; ``None`` without it)."""
    B, H, W, Ch = x.shape
    threads = torch.get_num_threads()
    dwt, dbias = x.new_zeros(threads, 9, Ch), x.new_zeros(threads, Ch)  # per-thread sums
    dinput = None if input_bias is None else x.new_zeros(threads, Ch)
    LIBRARY.function('residual_dwconv_backward', x.dtype)(
        *build.pointers(x, wt, bias, input_bias, grad_out, grad_x, dwt, dbias, dinput), B, H, W, Ch, int(gelu),
        threads)
    dwt, dbias = dwt.sum(0), dbias.sum(0)
    if input_bias is not None:
        dwt += input_bias * dbias
    # contiguous, as the ops' fake implementations declare (inductor asserts the strides)
    dw = dwt.t().contiguous().view(Ch, 1, 3, 3)
    return dw, dbias, None if input_bias is None else dinput.sum(0)


# ----------------------------------------------------------------------------- residual_dwconv

@torch.library.custom_op('mmdat::residual_dwconv', mutates_args=())
def residual_dwconv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool) -> torch.Tensor:
    """``act(x + DWConv3x3(x))`` of a ``B x H x W x Ch`` map (float32 / float64)."""
    _check_dwconv(x, weight, bias, x.shape[-1])  # the kernels' bounds
    x = x.contiguous()
    out = torch.empty_like(x)
    kernel_forward(x, tap_major(weight), bias.contiguous(), gelu, out)
    return out


@residual_dwconv_forward.register_fake
def _(x, weight, bias, gelu):
    return x.new_empty(x.shape)


@torch.library.custom_op('mmdat::residual_dwconv_backward', mutates_args=())
def residual_dwconv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             gelu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``x``, ``weight`` and ``bias``."""
    x = x.contiguous()
    grad_x = torch.empty_like(x)
    grad_weight, grad_bias, _ = kernel_backward(x, tap_major(weight), bias.contiguous(), gelu,
                                                grad_out.to(x.dtype).contiguous(), grad_x)
    return grad_x, grad_weight, grad_bias


@residual_dwconv_backward.register_fake
def _(grad_out, x, weight, bias, gelu):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _dwconv_setup_context(ctx, inputs, output):
    x, weight, bias, ctx.gelu = inputs
    ctx.save_for_backward(x, weight, bias)


def _dwconv_backward(ctx, grad_out):
    return (*residual_dwconv_backward(grad_out, *ctx.saved_tensors, ctx.gelu), None)


torch.library.register_autograd('mmdat::residual_dwconv', _dwconv_backward, setup_context=_dwconv_setup_context)


# ----------------------------------------------------------------------------- conv_mlp

def _hidden_layer(rows, w1, b1, wt, dw_bias, hidden: torch.Tensor, act: torch.Tensor):
    """``hidden`` = the first 1x1 conv of ``rows`` without its bias ``b1`` (the kernel adds it
    on the fly: one pass fewer over the hidden layer); ``act`` = GELU(y + DWConv3x3(y)),
    ``y = hidden + b1``."""
    torch.mm(rows, w1.t(), out=hidden.view(-1, w1.shape[0]))
    kernel_forward(hidden, wt, dw_bias, True, act, input_bias=b1)


@torch.library.custom_op('mmdat::conv_mlp', mutates_args=())
def conv_mlp_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, dw_weight: torch.Tensor,
                     dw_bias: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """:func:`.reference.conv_mlp` (no dropout) of ``B x H x W x C`` rows (float32 / float64)."""
    B, H, W, C = x.shape
    rows = x.reshape(-1, C)
    w1, b1, dw_bias, w2 = w1.contiguous(), b1.contiguous(), dw_bias.contiguous(), w2.contiguous()
    hidden, act = build.workspace_views('conv_mlp', (B, H, W, w1.shape[0]), x.dtype, 2)
    _hidden_layer(rows, w1, b1, tap_major(dw_weight), dw_bias, hidden, act)
    return torch.addmm(b2, act.view(-1, act.shape[-1]), w2.t()).view(B, H, W, -1)


@conv_mlp_forward.register_fake
def _(x, w1, b1, dw_weight, dw_bias, w2, b2):
    return x.new_empty(*x.shape[:3], w2.shape[0])


@torch.library.custom_op('mmdat::conv_mlp_backward', mutates_args=())
def conv_mlp_backward(grad_out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                      dw_weight: torch.Tensor, dw_bias: torch.Tensor,
                      w2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``x``, ``w1``, ``b1``, ``dw_weight``, ``dw_bias``, ``w2`` and ``b2``."""
    B, H, W, C = x.shape
    hidden_dims = w1.shape[0]
    rows = x.reshape(-1, C)
    w1, b1, dw_bias, w2 = w1.contiguous(), b1.contiguous(), dw_bias.contiguous(), w2.contiguous()
    wt = tap_major(dw_weight)
    grad_out = grad_out.to(x.dtype).reshape(-1, grad_out.shape[-1])
    hidden, act, grad_act = build.workspace_views('conv_mlp', (B, H, W, hidden_dims), x.dtype, 3)
    _hidden_layer(rows, w1, b1, wt, dw_bias, hidden, act)
    grad_w2, grad_b2 = grad_out.t().mm(act.view(-1, hidden_dims)), grad_out.sum(0)
    torch.mm(grad_out, w2, out=grad_act.view(-1, hidden_dims))
    grad_hidden = act  # the GELU output is no longer needed
    grad_dw_weight, grad_dw_bias, grad_b1 = kernel_backward(hidden, wt, dw_bias, True, grad_act, grad_hidden,
                                                            input_bias=b1)
    grad_hidden = grad_hidden.view(-1, hidden_dims)
    grad_w1 = grad_hidden.t().mm(rows)
    grad_x = grad_hidden.mm(w1).view(B, H, W, C)
    return grad_x, grad_w1, grad_b1, grad_dw_weight, grad_dw_bias, grad_w2, grad_b2


@conv_mlp_backward.register_fake
def _(grad_out, x, w1, b1, dw_weight, dw_bias, w2):
    return tuple(t.new_empty(t.shape) for t in (x, w1, b1, dw_weight, dw_bias, w2)) + (w2.new_empty(w2.shape[0]), )


def _mlp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])


def _mlp_backward(ctx, grad_out):
    return conv_mlp_backward(grad_out, *ctx.saved_tensors)


torch.library.register_autograd('mmdat::conv_mlp', _mlp_backward, setup_context=_mlp_setup_context)


# ----------------------------------------------------------------------------- entry points

def _check_dwconv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, channels: int):
    if x.dim() != 4 or tuple(weight.shape) != (channels, 1, 3, 3) or tuple(bias.shape) != (channels, ):
        raise ValueError(f'residual dwconv: inconsistent arguments: x {tuple(x.shape)} (channels last), weight '
                         f'{tuple(weight.shape)}, bias {tuple(bias.shape)} for {channels} channels')


def _fallback(op: str, *tensors) -> bool:
    """Whether ``op`` runs its reference formulation here (one warning for tensors the kernels
    cannot take; none when the kernels are off or did not build: that warned already)."""
    reason = build.unsupported(op, *tensors)
    if reason is not None:
        warn_once(f'mmdat: the CPU {op} op {reason}; running the reference formulation')
        return True
    return not LIBRARY.available()


def residual_dwconv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool) -> torch.Tensor:
    """:func:`.reference.residual_dwconv` by the C kernels (other floating dtypes and autocast
    in float32; see :func:`_fallback` for what runs the reference)."""
    _check_dwconv(x, weight, bias, x.shape[-1])
    if _fallback('residual dwconv', x, weight, bias):
        return reference.residual_dwconv(x, weight, bias, gelu)
    return in_full_precision(lambda x, w, b: residual_dwconv_forward(x, w, b, gelu), (x, weight, bias))


def conv_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor,
             w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """:func:`.reference.conv_mlp` (no dropout) by one op; ``w1 (hidden, C)``, ``w2 (C, hidden)``."""
    hidden = w1.shape[0]
    if (x.dim() != 4 or tuple(w1.shape) != (hidden, x.shape[-1]) or tuple(b1.shape) != (hidden, )
            or w2.dim() != 2 or w2.shape[1] != hidden or tuple(b2.shape) != (w2.shape[0], )):
        raise ValueError(f'conv mlp: inconsistent arguments: x {tuple(x.shape)} (channels last), w1 '
                         f'{tuple(w1.shape)}, b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}')
    _check_dwconv(x, dw_weight, dw_bias, hidden)
    params = (x, w1, b1, dw_weight, dw_bias, w2, b2)
    if _fallback('conv mlp', *params):
        return reference.conv_mlp(*params)
    return in_full_precision(conv_mlp_forward, params)
