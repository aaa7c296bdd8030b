"""Window and shifted-window attention on CUDA: one ``F.scaled_dot_product_attention`` call.

The relative position bias and, for the shifted variant, the shift mask (cached by
:mod:`.reference`) go in as the float ``attn_mask``, in the attention dtype. On CUDA the call is pinned to the
memory-efficient backend, the one that returns the bias gradient (cuDNN's backward returns
none and has had NaN bugs with masks on H100/H200), with the math backend as the fallback
for what it does not take (float64); elsewhere the math backend runs.

The operands are those of :func:`.reference.window_attention` and the CPU op: the qkv
projection of the unpadded map and the projection's bias, which is what the padded positions
hold (the projection of zeros).

Imports torch only.
"""
import torch
import torch.nn.functional as F

from ..flex import compute_dtype
from .reference import relative_position_index, shift_mask


def _backends(x: torch.Tensor, dtype: torch.dtype):
    from torch.nn.attention import SDPBackend

    if x.is_cuda and dtype != torch.float64:
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [SDPBackend.MATH]


def window_attention_sdpa(qkv: torch.Tensor, qkv_bias: torch.Tensor, table: torch.Tensor, num_heads: int,
                          window_size: int, shift_size: int, scale: float) -> torch.Tensor:
    """(Shifted-)window attention by SDPA: the function of ``WindowAttention``'s reference path
    between its two Linear layers (zero padding at the bottom and right to a multiple of the
    window, roll by ``-shift_size``, -100 between regions, roll back, crop).

    Args:
        qkv: ``B x H x W x (3 * heads * d)``: the qkv projection of the unpadded map.
        qkv_bias: ``3 * heads * d``: the projection's bias, i.e. q, k, v at padded positions.
        table: ``heads x (2w-1)^2`` relative position bias (the module's table transposed).
        num_heads, window_size, shift_size, scale: As the module's.
    Returns:
        ``B x H x W x (heads * d)``; under autocast in its dtype, else in ``qkv``'s.
    """
    B, H, W, C3 = qkv.shape
    nh, w, s = num_heads, window_size, shift_size
    if C3 % (3 * nh) or qkv_bias.shape != (C3,) or table.shape != (nh, (2 * w - 1) ** 2) or not 0 <= s < w:
        raise ValueError(f'inconsistent window attention operands: qkv {tuple(qkv.shape)}, qkv_bias '
                         f'{tuple(qkv_bias.shape)}, table {tuple(table.shape)}, heads {nh}, window {w}, shift {s}')
    C, d, N = C3 // 3, C3 // (3 * nh), w * w
    Hp, Wp = -(-H // w) * w, -(-W // w) * w
    nwy, nwx = Hp // w, Wp // w
    dtype = compute_dtype(qkv)
    with torch.autocast(qkv.device.type, enabled=False):
        x = qkv.to(dtype)
        if (Hp, Wp) != (H, W):  # padded positions hold the projection's bias
            bias = qkv_bias.to(dtype)
            x = F.pad(x - bias, (0, 0, 0, Wp - W, 0, Hp - H)) + bias
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = x.view(B, nwy, w, nwx, w, 3, nh, d).permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, -1, nh, N, d)
        q, k, v = x.unbind(0)
        mask = table[:, relative_position_index(w, qkv.device)].view(nh, N, N)
        if s:
            regions = shift_mask(Hp, Wp, w, s, qkv.device).to(mask.dtype)
            mask = (mask[None, None] + regions[None, :, None]).expand(B, -1, -1, -1, -1).reshape(-1, nh, N, N)
        else:
            mask = mask[None]
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_backends(qkv, dtype)):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(dtype), scale=scale)
        out = out.view(B, nwy, nwx, nh, w, w, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, C)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
    return out[:, :H, :W]


#: The CUDA path of the window attention ops.
window_attention = window_attention_sdpa
