"""Deformable attention as the official code computes it: logits, a position bias read by
``grid_sample`` from the relative position table at every query-key displacement, softmax.

It materialises the ``(B*M) x HW x Ns`` logits, the bias and the displacement grid; the ops
of :mod:`.cpu` (and :mod:`.cuda`) compute the same function without them. Only PyTorch ops,
so it runs on any device, under jit tracing (FLOP counters), ``torch.compile`` and
``torch.export``, and with attention dropout.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def axis_grid(n: int, centered: bool, flavor: str, device=None, dtype=None) -> torch.Tensor:
    """Normalised coordinates in [-1, 1] of ``n`` positions along one axis.

    ``centered`` positions sit at pixel centres ``i + 0.5`` (reference points), otherwise at
    ``i`` (query grid). v1 (``flavor='v1'``) divides by ``n`` (query grid: also centres); ++
    (``'pp'``) by ``n - 1``. An axis of length 1, where ++ would divide by zero, maps to 0.
    No branch on ``n`` (a symbolic size under ``torch.compile(dynamic=True)``/``torch.export``).
    """
    i = torch.arange(n, device=device, dtype=dtype)
    if flavor == 'v1':
        return (i + 0.5) / n * 2 - 1
    # ++: (i + c) / (n - 1) * 2 - 1, written as (2 (i + c) - (n - 1)) / (n - 1) so that n = 1
    # (i = 0, c = 0 there) gives 0 / 1 = 0
    c = 0.5 * size_min(n - 1, 1) if centered else 0.
    return ((i + c) * 2 - (n - 1)) / size_max(n - 1, 1)


def size_min(a, b):
    """``min`` of sizes without a branch on symbolic ones (``torch.compile``, ``torch.export``);
    jit tracing's sizes (tensors) as before."""
    return torch.sym_min(a, b) if isinstance(a, (int, torch.SymInt)) else min(a, b)


def size_max(a, b):
    """``max`` of sizes: see :func:`size_min`."""
    return torch.sym_max(a, b) if isinstance(a, (int, torch.SymInt)) else max(a, b)


def grid(h: int, w: int, centered: bool, flavor: str, device=None, dtype=None) -> torch.Tensor:
    """``h x w x 2`` grid of normalised ``(y, x)`` (see :func:`axis_grid`)."""
    ys = axis_grid(h, centered, flavor, device, dtype)
    xs = axis_grid(w, centered, flavor, device, dtype)
    return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)


def position_bias(pos: torch.Tensor, table: torch.Tensor, qy: torch.Tensor, qx: torch.Tensor,
                  groups: int) -> torch.Tensor:
    """``(B*M) x HW x Ns`` bias read from ``table`` ``(M, Th, Tw)`` at each displacement
    ``(q - p) / 2`` between the query grid ``qy x qx`` and the key positions ``pos``
    ``(B*G, Hk, Wk, 2)`` or ``(B*G, Ns, 2)``."""
    BG = pos.shape[0]
    H, W = qy.shape[0], qx.shape[0]
    pos = pos.reshape(BG, 1, -1, 2)
    q_grid = torch.stack(torch.meshgrid(qy, qx, indexing='ij'), dim=-1).reshape(1, H * W, 1, 2)
    displacement = (q_grid - pos) * 0.5
    tab = table.reshape(1, groups, -1, *table.shape[-2:]).expand(BG // groups, -1, -1, -1, -1)
    bias = F.grid_sample(tab.reshape(BG, -1, *table.shape[-2:]).to(pos.dtype), displacement.flip(-1),
                         mode='bilinear', align_corners=True)  # (B*G) x M/G x HW x Ns
    return bias.reshape(-1, H * W, pos.shape[2])


def deformable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                         table: Optional[torch.Tensor], qy: torch.Tensor, qx: torch.Tensor, groups: int,
                         scale: float = 1.0,
                         attn_drop: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The official formulation on the operands of :func:`.cpu.deformable_attention`:
    ``softmax(scale * q . k + bias) v``.

    Args:
        q: ``(B*M, d, H, W)`` queries.
        k, v: ``(B*M, d, Ns)`` keys and values.
        pos: ``(B*G, Ns, 2)`` (or ``(B*G, Hk, Wk, 2)``) normalised ``(y, x)`` key positions.
        table: ``(M, Th, Tw)`` relative position table, or ``None`` for no bias.
        qy, qx: ``H`` and ``W`` normalised query grid coordinates.
        groups: ``G``; heads ``[g*M/G, (g+1)*M/G)`` use group ``g``'s positions.
        scale: Factor of the ``q . k`` products (the official code applies it to them).
        attn_drop: Applied to the attention weights (e.g. an ``nn.Dropout``).
    Returns:
        ``(B*M, d, H, W)``.
    """
    BM, d, H, W = q.shape
    attn = torch.einsum('bcm,bcn->bmn', q.reshape(BM, d, H * W), k) * scale
    if table is not None:
        attn = attn + position_bias(pos, table, qy, qx, groups)
    attn = attn.softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    return torch.einsum('bmn,bcn->bcm', attn, v).reshape(BM, d, H, W)
