"""Deformable attention on CUDA: FlexAttention with the bilinear position bias in its ``score_mod``.

The logits, the bias and the displacement grid are never materialised: the ``score_mod``
reads the four table cells of each (query, key) pair from the captured table and the
captured key positions, inside the fused kernel; FlexAttention's backward then sends the
gradients to the table and to the positions (captured tensors get them by atomic adds).

Layout: heads of a group share their key positions, so FlexAttention's batch is ``B * G``
(indexing the positions) and its heads are the group's ``M / G`` heads; the table head of
flex (batch ``b``, head ``h``) is ``(b % G) * M / G + h``.

Where FlexAttention cannot be compiled (an Inductor or Triton error on the user's GPU), the
path warns once and runs :func:`deformable_attention_sdpa_bias` instead
(:func:`mmdat.ops.flex.with_fallback`).

Off CUDA the same ``score_mod`` runs through FlexAttention's dense math path (see
:mod:`mmdat.ops.flex`; it materialises the scores: for verification only).

Imports torch only.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from ..flex import compute_dtype, flex_attention_call, with_fallback
from .reference import position_bias


def _check_shapes(q, k, v, pos, table, groups):
    BM, d = q.shape[:2]
    BG, Ns = pos.shape[:2]
    if (q.dim() != 4 or k.shape != (BM, d, Ns) or v.shape != k.shape or pos.dim() != 3 or pos.shape[2] != 2
            or groups < 1 or BG % groups or BM % BG
            or (table is not None and (table.dim() != 3 or table.shape[0] != BM // (BG // groups)))):
        raise ValueError(f'inconsistent shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, '
                         f'pos {tuple(pos.shape)}, table {None if table is None else tuple(table.shape)}, '
                         f'groups {groups}')


def _table_coordinates(c: torch.Tensor, size: int) -> torch.Tensor:
    """Unnormalised table coordinate (``align_corners=True``) of displacement ``c / 2``, up
    to the part that depends on the other side: ``(c / 2 + 1) * (size - 1) / 2``."""
    return c * ((size - 1) / 4)


def _bilinear_bias(score, b, h, q_idx, kv_idx, padded, heads, query_y, query_x, key_y, key_x):
    # No Python numbers but through tensor sizes: a compiled kernel is then reused (once
    # dynamic) across stages and map sizes instead of being specialised on each.
    cy = query_y[q_idx] - key_y[b, kv_idx]
    cx = query_x[q_idx] - key_x[b, kv_idx]
    y0, x0 = cy.floor(), cx.floor()
    fy, fx = cy - y0, cx - x0
    # rows / columns of the two corners in the padded table; off the table: on its zero ring
    last_y, last_x = padded.size(1) - 1, padded.size(2) - 1
    y0i, x0i = y0.to(torch.int32) + 1, x0.to(torch.int32) + 1
    y1i, x1i = (y0i + 1).clamp(0, last_y), (x0i + 1).clamp(0, last_x)
    y0i, x0i = y0i.clamp(0, last_y), x0i.clamp(0, last_x)
    m = heads[b] + h
    top = padded[m, y0i, x0i] * (1 - fx) + padded[m, y0i, x1i] * fx
    bottom = padded[m, y1i, x0i] * (1 - fx) + padded[m, y1i, x1i] * fx
    return score + (top * (1 - fy) + bottom * fy).to(score.dtype)


def bilinear_bias(table: torch.Tensor, pos: torch.Tensor, qy: torch.Tensor, qx: torch.Tensor,
                  groups: int) -> Tuple[Callable, Tuple[torch.Tensor, ...]]:
    """``score_mod`` and its tensors adding ``grid_sample(table, (q - p) / 2)`` (bilinear,
    zero padding, ``align_corners=True``) for flex batch ``b`` (the ``B * G`` index), head
    ``h``, query ``q_idx`` (row-major over ``len(qy) x len(qx)``) and key ``kv_idx``.

    The tensors: the table padded by a ring of zeros (a corner outside the table is clamped
    onto the ring, hence zero, at any distance), each flex batch's first table head, and the
    table coordinates of the queries and of the keys along each axis (their difference is
    the pair's), float32 (float64 for float64 positions) whatever the attention dtype.
    """
    M, Th, Tw = table.shape
    H, W = qy.shape[0], qx.shape[0]
    BG = pos.shape[0]
    work = torch.float64 if pos.dtype == torch.float64 else torch.float32
    pos = pos.to(work)
    query_y = (_table_coordinates(qy.to(work), Th) + (Th - 1) / 2).repeat_interleave(W)  # (H*W,)
    query_x = (_table_coordinates(qx.to(work), Tw) + (Tw - 1) / 2).repeat(H)
    key_y = _table_coordinates(pos[..., 0], Th).contiguous()  # (B*G, Ns)
    key_x = _table_coordinates(pos[..., 1], Tw).contiguous()
    padded = F.pad(table.to(torch.promote_types(table.dtype, work)), (1, 1, 1, 1))  # (M, Th+2, Tw+2)
    heads = (torch.arange(BG, device=pos.device, dtype=torch.int32) % groups) * (M // groups)
    return _bilinear_bias, (padded, heads, query_y, query_x, key_y, key_x)


def _flex_entry(q, k, v, score_mod, block_mask, scale):
    # compiled on CUDA (see mmdat.ops.flex): this kind's own compile cache
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def _flex_layout(q, k, v, BG, dtype):
    BM, d, H, W = q.shape
    Mg = BM // BG
    qf = q.to(dtype).reshape(BG, Mg, d, H * W).transpose(-1, -2).contiguous()
    kf = k.to(dtype).reshape(BG, Mg, d, -1).transpose(-1, -2).contiguous()
    vf = v.to(dtype).reshape(BG, Mg, d, -1).transpose(-1, -2).contiguous()
    return qf, kf, vf


def deformable_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                              table: Optional[torch.Tensor], qy: torch.Tensor, qx: torch.Tensor,
                              groups: int) -> torch.Tensor:
    """Deformable attention with bilinear relative-position bias by FlexAttention.

    Same arguments and function as
    :func:`mmdat.ops.deformable.cpu.deformable_attention` (and the official formulation,
    :func:`.reference.deformable_attention` with ``scale=1``):

    Args:
        q: ``(B*M, d, H, W)`` queries.
        k, v: ``(B*M, d, Ns)`` keys and values; the attention scale is folded into ``k``.
        pos: ``(B*G, Ns, 2)`` normalised ``(y, x)`` key positions.
        table: ``(M, Th, Tw)`` relative position table, or ``None`` for no bias.
        qy, qx: ``H`` and ``W`` normalised query grid coordinates.
        groups: ``G``; heads ``[g*M/G, (g+1)*M/G)`` use group ``g``'s positions.
    Returns:
        ``(B*M, d, H, W)``. Under autocast in autocast's dtype (the attention runs in it;
        the positions, the bias and the softmax statistics in float32); otherwise in
        ``q``'s dtype.
    """
    _check_shapes(q, k, v, pos, table, groups)
    BM, d, H, W = q.shape
    BG = pos.shape[0]
    dtype = compute_dtype(q)
    qf, kf, vf = _flex_layout(q, k, v, BG, dtype)
    score_mod, buffers = (None, ()) if table is None else bilinear_bias(table, pos, qy, qx, groups)
    with torch.autocast(q.device.type, enabled=False):
        out = flex_attention_call(_flex_entry, qf, kf, vf, score_mod, buffers)
    return out.transpose(-1, -2).reshape(BM, d, H, W)


def deformable_attention_sdpa_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                                   table: Optional[torch.Tensor], qy: torch.Tensor, qx: torch.Tensor,
                                   groups: int) -> torch.Tensor:
    """The fallback: the bias materialised (in the attention dtype) and
    ``F.scaled_dot_product_attention`` pinned to the memory-efficient backend on CUDA (the
    one that returns the bias gradient; cuDNN's does not), the math one elsewhere.

    Same arguments and result as :func:`deformable_attention_flex`; the bias takes
    ``B*M x H*W x Ns`` elements.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _check_shapes(q, k, v, pos, table, groups)
    BM, d, H, W = q.shape
    BG = pos.shape[0]
    dtype = compute_dtype(q)
    qf, kf, vf = _flex_layout(q, k, v, BG, dtype)
    with torch.autocast(q.device.type, enabled=False):
        bias = None if table is None else position_bias(
            pos.float() if dtype != torch.float64 else pos, table, qy, qx, groups).to(dtype).view(*qf.shape[:3], -1)
        backends = [SDPBackend.EFFICIENT_ATTENTION] if q.is_cuda and dtype != torch.float64 else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=bias, scale=1.0)
    return out.transpose(-1, -2).reshape(BM, d, H, W)


def deformable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                         table: Optional[torch.Tensor], qy: torch.Tensor, qx: torch.Tensor,
                         groups: int) -> torch.Tensor:
    """The CUDA path :func:`mmdat.ops.deformable.deformable_attention` runs:
    :func:`deformable_attention_flex`, or :func:`deformable_attention_sdpa_bias` once compiling
    FlexAttention has failed in this process (warned once; :func:`mmdat.ops.flex.with_fallback`)."""
    return with_fallback('deformable', deformable_attention_flex, deformable_attention_sdpa_bias,
                         q, k, v, pos, table, qy, qx, groups)
