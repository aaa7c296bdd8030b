"""Deformable attention with the bilinear relative-position bias, by backend.

* :mod:`.reference`: the official formulation (``grid_sample`` bias, materialised logits);
* :mod:`.cpu`: the ops ``mmdat::deformable_attention_forward`` / ``_backward`` (C kernels on
  CPU, PyTorch tiles elsewhere);
* :mod:`.cuda`: the CUDA path (FlexAttention with the bias in its ``score_mod``).

:func:`deformable_attention` runs the backend :func:`mmdat.ops.config.choose_backend` chose;
every backend takes the operands of :func:`.cpu.deformable_attention` and computes the same
function.
"""
from typing import Optional

import torch

from . import cpu, cuda, reference


def deformable_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                         table: Optional[torch.Tensor], qy: torch.Tensor, qx: torch.Tensor,
                         groups: int) -> torch.Tensor:
    """Attention output ``(B*M, d, H, W)`` by ``backend`` (``'reference'``, ``'cpu'`` or
    ``'cuda'``); operands as :func:`.cpu.deformable_attention`'s (the scale folded into ``k``)."""
    if backend == 'reference':
        return reference.deformable_attention(q, k, v, pos, table, qy, qx, groups)
    if backend == 'cuda':
        return cuda.deformable_attention(q, k, v, pos, table, qy, qx, groups)
    return cpu.deformable_attention(q, k, v, pos, table, qy, qx, groups)


__all__ = ['cpu', 'cuda', 'deformable_attention', 'reference']
