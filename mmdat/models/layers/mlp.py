import torch
import torch.nn as nn
import torch.nn.functional as F

from mmdat.ops.config import check_attn_impl
from mmdat.ops.dwconv import cpu as dwconv_cpu

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
        attn_impl: ``'fast'`` (default: the CPU op where it applies, see
            :func:`.residual_dwconv.kernel_applies`) or ``'reference'`` (PyTorch's convolutions).
            Also an attribute; ``mmdat.ops.attention_impl(impl, 'dwconv')`` overrides it.
    """

    def __init__(self, embed_dims: int, hidden_dims: int, drop: float = 0., attn_impl: str = 'fast'):
        super().__init__()
        self.attn_impl = check_attn_impl(attn_impl)
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
        if rdw.kernel_applies(x, self.dwconv, self.attn_impl, dropout=self.training and self.drop.p > 0):
            # one op that keeps nothing hidden-sized for backward (see mmdat.ops.dwconv.cpu)
            x = dwconv_cpu.conv_mlp(x, w1, self.fc1.bias, self.dwconv.weight, self.dwconv.bias, w2, self.fc2.bias)
        else:
            x = rdw.residual_dwconv(self.drop(F.linear(x, w1, self.fc1.bias)), self.dwconv, True, self.attn_impl)
            x = self.drop(F.linear(x, w2, self.fc2.bias))
        return x.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f'attn_impl={self.attn_impl!r}'
