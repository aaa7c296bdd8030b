"""``act(x + DWConv3x3(x))`` on a channels-last map: DAT++'s MLP middle (GELU) and its local
perception unit (no activation), by the CPU op where it applies (:mod:`mmdat.ops.dwconv`)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmdat.ops.config import check_attn_impl, choose_backend
from mmdat.ops.dwconv import cpu as dwconv_cpu


def is_residual_3x3(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is what the op computes: depth-wise 3x3, zero padding 1, with bias."""
    return (conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding_mode == 'zeros' and conv.bias is not None
            and conv.groups == conv.in_channels == conv.out_channels)


def kernel_applies(x: torch.Tensor, conv: nn.Conv2d, attn_impl: str, dropout: bool = False) -> bool:
    """Whether the CPU op runs ``conv`` on ``x`` for a module with ``attn_impl``: float32 /
    float64 outside autocast (other dtypes keep the PyTorch convolution in their precision),
    the CPU backend chosen (:func:`mmdat.ops.config.choose_backend`, kind ``'dwconv'``)."""
    return (is_residual_3x3(conv) and x.dtype in (torch.float32, torch.float64) and conv.weight.dtype == x.dtype
            and not torch.is_autocast_enabled(x.device.type)
            and choose_backend('dwconv', attn_impl, x, dropout) == 'cpu')


def residual_dwconv(x: torch.Tensor, conv: nn.Conv2d, gelu: bool, attn_impl: str) -> torch.Tensor:
    """``act(x + conv(x))`` for a depth-wise ``conv``.

    Args:
        x: ``B x H x W x Ch`` (channels last, as the Linear layers around it produce it).
        conv: ``nn.Conv2d(Ch, Ch, 3, padding=1, groups=Ch)``; its weights keep their layout.
        gelu: Apply the exact (erf) GELU; otherwise no activation.
        attn_impl: The calling module's ``'fast'`` or ``'reference'``.
    Returns:
        ``B x H x W x Ch``.
    """
    if x.shape[-1] == conv.in_channels and kernel_applies(x, conv, attn_impl):
        return dwconv_cpu.residual_dwconv(x, conv.weight, conv.bias, gelu)
    y = x.permute(0, 3, 1, 2)
    y = y + nn.Conv2d.forward(conv, y)  # the convolution alone, also for a LocalPerception
    return (F.gelu(y) if gelu else y).permute(0, 2, 3, 1)


class LocalPerception(nn.Conv2d):
    """DAT++'s local perception unit: ``x + DWConv3x3(x)`` on ``B x C x H x W``.

    An ``nn.Conv2d`` (depth-wise 3x3, padding 1) for its parameters, their names and
    initialisation, which are the official unit's; its forward adds the input.

    Args:
        embed_dims: Channels.
        attn_impl: ``'fast'`` (default: the CPU op where it applies, see
            :func:`kernel_applies`) or ``'reference'`` (PyTorch's convolution). Also an attribute.
    """

    def __init__(self, embed_dims: int, attn_impl: str = 'fast'):
        super().__init__(embed_dims, embed_dims, 3, padding=1, groups=embed_dims)
        self.attn_impl = check_attn_impl(attn_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return residual_dwconv(x.permute(0, 2, 3, 1), self, False, self.attn_impl).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, attn_impl={self.attn_impl!r}'
