import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native
from . import residual_dwconv as rdw


class Mlp(nn.Module):
    """Position-wise MLP of the v1 models: Linear, GELU, Linear on ``B x C x H x W``.

    Args:
        embed_dims: Channels in and out.
        hidden_dims: Channels of the hidden layer.
        drop: Dropout after each linear layer.
    """

    def __init__(self, embed_dims: int, hidden_dims: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dims, embed_dims)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = self.drop(self.act(self.fc1(x)))
        x = self.drop(self.fc2(x))
        return x.permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    """MLP of DAT++: 1x1 conv, residual 3x3 depth-wise conv, GELU, 1x1 conv.

    Args:
        embed_dims: Channels in and out.
        hidden_dims: Channels of the hidden layer.
        drop: Dropout after each 1x1 conv.
    """

    def __init__(self, embed_dims: int, hidden_dims: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Conv2d(embed_dims, hidden_dims, 1)
        self.dwconv = nn.Conv2d(hidden_dims, hidden_dims, 3, padding=1, groups=hidden_dims)
        self.fc2 = nn.Conv2d(hidden_dims, embed_dims, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The 1x1 convs run as matmuls over channels-last positions, and the depth-wise conv
        # on a channels-last map: on CPU both are 2-4x faster than NCHW convs (the weights
        # keep the official conv layout).
        x = x.permute(0, 2, 3, 1)
        w1, w2 = self.fc1.weight.flatten(1), self.fc2.weight.flatten(1)
        if rdw.kernel_applies(x, self.dwconv) and not (self.training and self.drop.p > 0):
            x = _ConvMlpFunction.apply(x.contiguous(), w1, self.fc1.bias, self.dwconv.weight, self.dwconv.bias,
                                       w2, self.fc2.bias)
        else:
            x = rdw.residual_dwconv(self.drop(F.linear(x, w1, self.fc1.bias)), self.dwconv, gelu=True)
            x = self.drop(F.linear(x, w2, self.fc2.bias))
        return x.permute(0, 3, 1, 2)


class _ConvMlpFunction(torch.autograd.Function):
    """``ConvMlp`` without dropout by the residual_dwconv C kernels, as one autograd node, on
    ``B x H x W x C`` rows. Nothing hidden-sized is kept for the backward pass: it recomputes
    the first 1x1 conv from the input rows (which the weight gradient needs anyway) and the
    GELU output from that (one kernel pass). The hidden layer, 4x the block's width, is most
    of what an MLP would keep (600 MB of a DAT-T++ step at 800x1344), and fresh hidden-size
    tensors cost more here than the recomputation: the OS maps them anew, page by page, on
    every call. All hidden-size tensors live in a kept :func:`.native.workspace`."""

    @staticmethod
    def forward(ctx, x, w1, b1, dw_weight, dw_bias, w2, b2):
        B, H, W, C = x.shape
        rows = x.view(-1, C)
        wt = rdw.tap_major(dw_weight)
        ctx.shape = (B, H, W, w1.shape[0])
        hidden, act = native.workspace_views('conv_mlp', ctx.shape, x.dtype, 2)
        _hidden_layer(rows, w1, b1, wt, dw_bias, hidden, act)
        ctx.save_for_backward(rows, w1, b1, wt, dw_bias, w2)
        return torch.addmm(b2, act.view(-1, act.shape[-1]), w2.t()).view(B, H, W, -1)

    @staticmethod
    def backward(ctx, grad_out):
        rows, w1, b1, wt, dw_bias, w2 = ctx.saved_tensors
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        hidden, act, grad_act = native.workspace_views('conv_mlp', ctx.shape, rows.dtype, 3)
        _hidden_layer(rows, w1, b1, wt, dw_bias, hidden, act)
        grad_w2, grad_b2 = grad_out.t().mm(act.view(-1, act.shape[-1])), grad_out.sum(0)
        torch.mm(grad_out, w2, out=grad_act.view(-1, w2.shape[1]))
        grad_hidden = act  # the GELU output is no longer needed
        grad_dw_weight, grad_dw_bias, grad_b1 = rdw.kernel_backward(hidden, wt, dw_bias, True, grad_act,
                                                                    grad_hidden, input_bias=b1)
        grad_hidden = grad_hidden.view(-1, w1.shape[0])
        grad_w1 = grad_hidden.t().mm(rows)
        grad_x = grad_hidden.mm(w1).view(ctx.shape[:3] + (-1, ))
        return grad_x, grad_w1, grad_b1, grad_dw_weight, grad_dw_bias, grad_w2, grad_b2


def _hidden_layer(rows, w1, b1, wt, dw_bias, hidden: torch.Tensor, act: torch.Tensor):
    """``hidden`` = the first 1x1 conv of ``rows`` without its bias ``b1`` (the kernel adds it
    on the fly: one pass fewer over the hidden layer); ``act`` = GELU(y + DWConv3x3(y)),
    ``y = hidden + b1``."""
    torch.mm(rows, w1.t(), out=hidden.view(-1, w1.shape[0]))
    rdw.kernel_forward(hidden, wt, dw_bias, True, act, input_bias=b1)
