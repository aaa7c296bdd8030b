"""``act(x + DWConv3x3(x))`` on a channels-last map: DAT++'s MLP middle (GELU) and its local
perception unit (no activation), by the CPU op where it applies (:mod:`mmdat.ops.dwconv`)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmdat.ops.config import choose_backend
from mmdat.ops.dwconv import cpu as dwconv_cpu


def is_residual_3x3(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is what the op computes: depth-wise 3x3, zero padding 1, with bias."""
    return (conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding_mode == 'zeros' and conv.bias is not None
            and conv.groups == conv.in_channels == conv.out_channels)


def kernel_applies(x: torch.Tensor, conv: nn.Conv2d, dropout: bool = False) -> bool:
    """Whether the CPU op runs ``conv`` on ``x``: float32 / float64 outside autocast (other
    dtypes keep the PyTorch convolution in their precision), the fast path chosen."""
    return (is_residual_3x3(conv) and x.dtype in (torch.float32, torch.float64) and conv.weight.dtype == x.dtype
            and not torch.is_autocast_enabled(x.device.type) and choose_backend('dwconv', 'fast', x, dropout) == 'cpu')


def residual_dwconv(x: torch.Tensor, conv: nn.Conv2d, gelu: bool) -> torch.Tensor:
    """``act(x + conv(x))`` for a depth-wise ``conv``.

    Args:
        x: ``B x H x W x Ch`` (channels last, as the Linear layers around it produce it).
        conv: ``nn.Conv2d(Ch, Ch, 3, padding=1, groups=Ch)``; its weights keep their layout.
        gelu: Apply the exact (erf) GELU; otherwise no activation.
    Returns:
        ``B x H x W x Ch``.
    """
    if x.shape[-1] == conv.in_channels and kernel_applies(x, conv):
        return dwconv_cpu.residual_dwconv(x, conv.weight, conv.bias, gelu)
    y = x.permute(0, 3, 1, 2)
    y = y + conv(y)
    return (F.gelu(y) if gelu else y).permute(0, 2, 3, 1)
