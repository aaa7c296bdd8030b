import torch
import torch.nn as nn


class DropPathResidual(nn.Module):
    """``x + drop_path(y)`` (stochastic depth on a residual branch) as one op.

    mmcv's ``DropPath`` followed by the residual add makes three full-size tensors in the
    forward pass and two in the backward; ``addcmul`` with the per-sample scale makes one of
    each. The mask is drawn exactly as mmcv draws it (one ``torch.rand`` of shape ``B x 1 x ...``),
    so a seed gives the same samples dropped.

    Args:
        drop_prob: Probability of dropping the branch of a sample during training.
    """

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        if not 0 <= drop_prob < 1:
            raise ValueError(f'drop path probability must be in [0, 1), got {drop_prob}')
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0:
            return x + y
        keep_prob = 1 - self.drop_prob
        scale = torch.rand((y.shape[0], ) + (1, ) * (y.ndim - 1), dtype=y.dtype, device=y.device)
        scale = (scale + keep_prob).floor_().div_(keep_prob)
        return torch.addcmul(x, y, scale)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'
