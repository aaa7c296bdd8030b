import torch
import torch.nn as nn
import torch.nn.functional as F

from .residual_dwconv import residual_dwconv


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
        x = F.linear(x.permute(0, 2, 3, 1), self.fc1.weight.flatten(1), self.fc1.bias)
        x = residual_dwconv(self.drop(x), self.dwconv, gelu=True)
        x = F.linear(x, self.fc2.weight.flatten(1), self.fc2.bias)
        return self.drop(x).permute(0, 3, 1, 2)
