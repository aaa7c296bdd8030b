"""Residual depth-wise 3x3 convolution and DAT++'s ConvMlp in PyTorch ops."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def residual_dwconv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool) -> torch.Tensor:
    """``act(x + DWConv3x3(x))``.

    Args:
        x: ``B x H x W x Ch`` (channels last, as the Linear layers around it produce it).
        weight, bias: The depth-wise conv's ``(Ch, 1, 3, 3)`` weights and ``(Ch,)`` bias
            (zero padding 1).
        gelu: Apply the exact (erf) GELU; otherwise no activation.
    Returns:
        ``B x H x W x Ch``.
    """
    y = x.permute(0, 3, 1, 2)
    y = y + F.conv2d(y, weight, bias, padding=1, groups=weight.shape[0])
    return (F.gelu(y) if gelu else y).permute(0, 2, 3, 1)


def conv_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor,
             w2: torch.Tensor, b2: torch.Tensor, drop: Optional[nn.Module] = None) -> torch.Tensor:
    """DAT++'s MLP on ``B x H x W x C`` rows: 1x1 conv (``w1 (hidden, C)``, ``b1``), residual
    depth-wise 3x3 conv, GELU, 1x1 conv (``w2 (C, hidden)``, ``b2``); ``drop`` after each 1x1."""
    drop = drop or nn.Identity()
    x = residual_dwconv(drop(F.linear(x, w1, b1)), dw_weight, dw_bias, gelu=True)
    return drop(F.linear(x, w2, b2))
