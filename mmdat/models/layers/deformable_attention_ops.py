"""Memory-lean deformable attention with the bilinear relative-position bias.

The reference formulation (``DeformableAttention`` with ``attn_impl='reference'``)
materialises, per block, the ``(B*M) x HW x Ns`` logits, a bias of the same size read by
``grid_sample`` from the position table at every query-key displacement, and the
displacement grid itself. This module computes the same function tile by tile:

* Queries are processed in tiles of whole query rows (and groups), so the largest
  temporaries are two tile-sized buffers, allocated once per call and reused: peak memory
  does not grow with ``HW x Ns``. The backward pass recomputes each tile's logits from the
  saved ``q, k, v`` and log-sum-exp (as flash attention does) instead of storing the
  attention weights.
* The bias is computed without the displacement grid. With queries on a regular grid, the
  table coordinate of query ``(a, b)`` and key ``j`` separates per axis: the row coordinate
  depends on ``(a, j)`` only and the column coordinate on ``(b, j)`` only. A tile first
  interpolates, for each key and each of its query rows, the table along ``y`` over the
  band of table columns the key's queries can reach (``R``, about ``Wq / W`` of the tile's
  size), then interpolates ``R`` along ``x`` for every query column with one gather of
  ``R`` and one of its column differences. The backward pass scatters the bias gradient
  back the same way (two ``scatter_add`` into ``R``-sized buffers) and derives the table
  and position gradients at ``R`` size.

Semantics are those of ``F.grid_sample(table, (q - p) / 2, mode='bilinear',
padding_mode='zeros', align_corners=True)``: the table is padded with one zero row and
column on every side and corner indices are clamped into the padded table, which gives
zero for corners outside the table at any distance; gradients w.r.t. the positions are the
corner differences, as grid_sample's.

Everything runs in float32 (inputs are cast up under autocast) and works on any device; on
CPU the tile size is chosen to keep the working set near the L2 cache.
"""
import math
from typing import Optional, Tuple

import torch

#: Target number of logits per tile, by device type (overridable per call).
DEFAULT_TILE_ELEMENTS = {'cpu': 1 << 19, 'cuda': 1 << 26}


def _axis_coords(qc: torch.Tensor, pc: torch.Tensor, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Table coordinate of every (key, query line) pair along one axis.

    Args:
        qc: ``n`` normalised query coordinates along the axis.
        pc: ``(BG, Ns)`` normalised key coordinates along the axis.
        size: Table length along the axis.
    Returns:
        ``(lo, frac)``, both ``(BG, Ns, n)``: ``floor`` of the unnormalised coordinate
        (as float) and its fractional part, computed exactly as grid_sample does for the
        reference's ``(q - p) * 0.5`` grid with ``align_corners=True``.
    """
    g = (qc - pc.unsqueeze(-1)) * 0.5
    coord = (g + 1) * ((size - 1) / 2)
    lo = coord.floor()
    return lo, coord - lo


def _band(qc: torch.Tensor, size: int) -> int:
    """Width of the band of table columns (plus the second corner) a key's queries reach.

    The coordinate span over the ``n`` queries of an axis is the same for every key;
    one cell of slack covers rounding.
    """
    span = (float(qc[-1]) - float(qc[0])) * 0.5 * (size - 1) / 2 if qc.numel() > 1 else 0.
    return int(math.floor(span + 1e-3)) + 3


class _Geometry:
    """Everything about the bias that does not depend on the tile, built once per call.

    The table is zero-padded by one row above and below and by ``P = bx + 1`` columns left
    and right, flattened per head, and unfolded into windows of ``bx`` columns stored as
    complex numbers ``T[s + x] + i (T[s + x + 1] - T[s + x])``: a key's band of one table row
    is then one contiguous row of the unfolded table, and interpolating along ``x`` at a
    query column needs one (complex) gather: ``R[i] + fx * (R[i + 1] - R[i])``.
    """

    def __init__(self, pos: torch.Tensor, table: torch.Tensor, qy: torch.Tensor, qx: torch.Tensor,
                 groups: int):
        BG, Ns, _ = pos.shape
        M, Th, Tw = table.shape
        G, Mg = groups, M // groups
        self.Th, self.Tw, self.Mg, self.G = Th, Tw, Mg, G
        py, px = pos[..., 0], pos[..., 1]
        bx = self.bx = _band(qx, Tw)
        P = bx + 1
        self.Wp = Wp = Tw + 2 * P
        # x: for every key its band start (clamped so that the band stays in the padded table;
        # a band clamped at an edge lies in the zero padding, as do all its key's corners) ...
        lo_x, self.fx = _axis_coords(qx, px, Tw)  # (BG, Ns, W)
        lo_x = lo_x.long()
        start = lo_x[..., :1].clamp(-P, Tw + P - bx)
        # ... and for every query column the first corner's index in the band
        self.ix = (lo_x - start).clamp_(0, bx - 2)  # (BG, Ns, W)
        # y: for every key and query row the two corner rows (clamped into the zero rows)
        lo_y, self.fy = _axis_coords(qy, py, Th)  # (BG, Ns, H)
        lo_y = lo_y.long()
        flat_len = (Th + 2) * Wp
        # flat offset of the band's first column in row 0, plus the group's block of rows
        group_offset = (torch.arange(BG, device=pos.device) % G) * flat_len
        col0 = (start.squeeze(-1) + P) + group_offset[:, None]  # (BG, Ns)
        self.base0 = (lo_y + 1).clamp_(0, Th + 1) * Wp + col0[..., None]  # (BG, Ns, H)
        self.base1 = (lo_y + 2).clamp_(0, Th + 1) * Wp + col0[..., None]
        padded = torch.nn.functional.pad(table.reshape(G, Mg, Th, Tw), (P, P, 1, 1))
        flat = padded.reshape(G, Mg, flat_len).transpose(0, 1).reshape(Mg, G * flat_len)
        windows = torch.nn.functional.pad(flat, (0, bx + 1)).unfold(-1, bx + 1, 1)[:, :G * flat_len]
        self.windows = torch.complex(windows[..., :-1], windows[..., 1:] - windows[..., :-1])  # (Mg, G*len, bx)
        self.flat_len = flat_len

    def rows(self, g: slice, a: slice):
        """``R`` ``(nbg, Mg, Ns, A, bx)`` complex: the table interpolated along y at the
        tile's query rows over each key's band (real part) and its column differences
        (imaginary part); also the two corner rows as real pairs and ``fy``."""
        b0, b1 = self.base0[g, :, a], self.base1[g, :, a]
        n, Ns, A = b0.shape
        shape = (self.Mg, n, Ns, A, self.bx)
        c0 = torch.index_select(self.windows, 1, b0.reshape(-1)).view(shape).transpose(0, 1)
        c1 = torch.index_select(self.windows, 1, b1.reshape(-1)).view(shape).transpose(0, 1)
        if n > 1:
            c0, c1 = c0.contiguous(), c1.contiguous()
        c0, c1 = torch.view_as_real(c0), torch.view_as_real(c1)
        fy = self.fy[g, :, a].view(n, 1, Ns, A, 1, 1)
        return torch.view_as_complex(torch.lerp(c0, c1, fy)), c0, c1, fy

    def bias(self, g: slice, a: slice, W: int, out: torch.Tensor, tmp: torch.Tensor):
        """Writes the tile's bias ``(nbg, Mg, Ns, A, W)`` into ``out`` (``tmp``: complex
        scratch of the same shape); returns what the backward needs."""
        R, c0, c1, fy = self.rows(g, a)
        n, Mg, Ns, A = R.shape[:4]
        index = self.ix[g].view(n, 1, Ns, 1, W).expand(n, Mg, Ns, A, W)
        picked = torch.view_as_real(torch.gather(R, 4, index, out=tmp))
        torch.addcmul(picked[..., 0], picked[..., 1], self.fx[g].view(n, 1, Ns, 1, W), out=out)
        return index, R, c0, c1, fy


def _tiles(BG: int, per_group_row: int, H: int, target: int):
    """``(group slice, row slice)`` tiles of about ``target`` logits each."""
    if BG * per_group_row * H <= target:
        yield slice(0, BG), slice(0, H)
        return
    rows = target // (BG * per_group_row)
    if rows >= 1:
        for a in range(0, H, rows):
            yield slice(0, BG), slice(a, min(a + rows, H))
        return
    nbg = max(1, target // per_group_row)
    for g in range(0, BG, nbg):
        for a in range(H):
            yield slice(g, min(g + nbg, BG)), slice(a, a + 1)


def _buffers(q: torch.Tensor, tiles, per_group_row: int):
    """Two tile-sized scratch buffers (the second one complex-sized), reused by all tiles."""
    numel = max((g.stop - g.start) * (a.stop - a.start) for g, a in tiles) * per_group_row
    return q.new_empty(numel), q.new_empty(2 * numel)


class _DeformableAttentionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, pos, table, qy, qx, groups, tile_elements):
        # q (BM, d, H, W) pre-scaled; k, v (BM, d, Ns); pos (BG, Ns, 2); table (M, Th, Tw) or None
        BM, d, H, W = q.shape
        Ns, BG = k.shape[-1], pos.shape[0]
        Mg = BM // BG
        geo = _Geometry(pos, table, qy, qx, groups) if table is not None else None
        out = q.new_empty(BM, d, H, W)
        lse = q.new_empty(BM, H, W)
        tiles = list(_tiles(BG, Mg * Ns * W, H, tile_elements))
        buf, buf2 = _buffers(q, tiles, Mg * Ns * W)
        qv, kv = q.view(BG, Mg, d, H, W), k.view(BG, Mg, d, Ns)
        # a row of ones under v: the AV product's last row is the softmax denominator
        vv = torch.cat([v, v.new_ones(BM, 1, Ns)], 1).view(BG, Mg, d + 1, Ns)
        for g, a in tiles:
            n, A = g.stop - g.start, a.stop - a.start
            size = n * Mg * Ns * A * W
            S = buf[:size].view(n, Mg, Ns, A, W)
            S3 = S.view(n * Mg, Ns, A * W)
            qt = qv[g, :, :, a].reshape(n * Mg, d, A * W)
            kt = kv[g].reshape(n * Mg, d, Ns)
            if geo is not None:
                geo.bias(g, a, W, S, torch.view_as_complex(buf2[:2 * size].view(*S.shape, 2)))
                S3.baddbmm_(kt.transpose(1, 2), qt)
            else:
                torch.bmm(kt.transpose(1, 2), qt, out=S3)
            m = S3.amax(1, keepdim=True)
            S3.sub_(m).exp_()
            o = torch.bmm(vv[g].reshape(n * Mg, d + 1, Ns), S3)
            l = o[:, d:]
            out.view(BG, Mg, d, H, W)[g, :, :, a] = (o[:, :d] / l).view(n, Mg, d, A, W)
            lse.view(BG, Mg, H, W)[g, :, a] = (m + l.log()).view(n, Mg, A, W)
        ctx.save_for_backward(q, k, v, pos, table, qy, qx, out, lse)
        ctx.groups, ctx.tile_elements = groups, tile_elements
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, pos, table, qy, qx, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grads = _backward(q, k, v, pos, table, qy, qx, out, lse, grad_out.to(q.dtype).contiguous(),
                              ctx.groups, ctx.tile_elements)
        return grads + (None,) * 4


def _backward(q, k, v, pos, table, qy, qx, out, lse, dout, groups, tile_elements):
    BM, d, H, W = q.shape
    Ns, BG = k.shape[-1], pos.shape[0]
    Mg = BM // BG
    geo = _Geometry(pos, table, qy, qx, groups) if table is not None else None
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # Augmented operands fold the two per-query subtractions into the matmuls:
    # [k; 1]^T [q; -lse] = S_qk - lse and [v; 1]^T [dO; -D] = dP - D with D = rowsum(dO * O).
    ones = k.new_ones(BM, 1, Ns)
    ka = torch.cat([k, ones], 1).view(BG, Mg, d + 1, Ns)
    va = torch.cat([v, ones], 1).view(BG, Mg, d + 1, Ns)
    qa = torch.cat([q.view(BM, d, H * W), -lse.view(BM, 1, H * W)], 1).view(BG, Mg, d + 1, H, W)
    doa = torch.cat([dout.view(BM, d, H * W), -(dout * out).sum(1).view(BM, 1, H * W)], 1)
    doa = doa.view(BG, Mg, d + 1, H, W)
    tiles = list(_tiles(BG, Mg * Ns * W, H, tile_elements))
    buf, buf2 = _buffers(q, tiles, Mg * Ns * W)
    if geo is not None:
        dflat = q.new_zeros(Mg, geo.windows.shape[1] + geo.bx + 1)
        dpy, dpx = pos.new_zeros(BG, Ns), pos.new_zeros(BG, Ns)
    dkv, dvv = dk.view(BG, Mg, d, Ns), dv.view(BG, Mg, d, Ns)
    for g, a in tiles:
        n, A = g.stop - g.start, a.stop - a.start
        size = n * Mg * Ns * A * W
        S = buf[:size].view(n, Mg, Ns, A, W)
        S3 = S.view(n * Mg, Ns, A * W)
        qt = qa[g, :, :, a].reshape(n * Mg, d + 1, A * W)
        kt = ka[g].reshape(n * Mg, d + 1, Ns)
        dot = doa[g, :, :, a].reshape(n * Mg, d + 1, A * W)
        if geo is not None:
            saved = geo.bias(g, a, W, S, torch.view_as_complex(buf2[:2 * size].view(*S.shape, 2)))
            S3.baddbmm_(kt.transpose(1, 2), qt)
        else:
            torch.bmm(kt.transpose(1, 2), qt, out=S3)
        S3.exp_()  # P
        dvv[g].view(n * Mg, d, Ns).baddbmm_(dot[:, :d], S3.transpose(1, 2))
        dS = buf2[:size].view(n * Mg, Ns, A * W)
        torch.bmm(va[g].reshape(n * Mg, d + 1, Ns).transpose(1, 2), dot, out=dS).mul_(S3)
        dq.view(BG, Mg, d, H, W)[g, :, :, a] = torch.bmm(kt[:, :d], dS).view(n, Mg, d, A, W)
        dkv[g].view(n * Mg, d, Ns).baddbmm_(qt[:, :d], dS.transpose(1, 2))
        if geo is not None:
            _bias_backward(geo, g, a, dS.view(n, Mg, Ns, A, W), S, saved, dflat, dpy, dpx)
    dpos = dtab = None
    if geo is not None:
        dpos = torch.stack([dpy * (-(geo.Th - 1) / 4), dpx * (-(geo.Tw - 1) / 4)], -1)
        P = geo.bx + 1
        dtab = dflat[:, :geo.G * geo.flat_len].view(Mg, geo.G, geo.Th + 2, geo.Wp).transpose(0, 1)
        dtab = dtab.reshape(BM // (BG // groups), geo.Th + 2, geo.Wp)[:, 1:-1, P:P + geo.Tw]
    return dq, dk, dv, dpos, dtab


def _bias_backward(geo: _Geometry, g: slice, a: slice, dS: torch.Tensor, tmp: torch.Tensor, saved,
                   dflat: torch.Tensor, dpy: torch.Tensor, dpx: torch.Tensor):
    """Accumulates the table and position gradients of one tile's bias from ``dS``."""
    index, R, c0, c1, fy = saved
    n, Mg, Ns, A, W = dS.shape
    bx = geo.bx
    # bias = Re R[i] + fx * Im R[i] at i = index: gradient w.r.t. (Re R, Im R) as pairs
    dR = dS.new_zeros(n, Mg, Ns, A, bx, 2)
    dR[..., 0].scatter_add_(4, index, dS)
    torch.mul(dS, geo.fx[g].view(n, 1, Ns, 1, W), out=tmp)
    dR[..., 1].scatter_add_(4, index, tmp)
    dpx[g] += (dR[..., 0] * R.imag).sum((1, 3, 4))
    # R = c0 + fy * (c1 - c0)
    dpy[g] += (dR * (c1 - c0)).sum((1, 3, 4, 5))
    d1 = dR * fy
    d0 = dR.sub_(d1)
    # window s holds T[s + x] and T[s + x + 1] - T[s + x]: back to the flat table
    offsets = torch.arange(bx + 1, device=dS.device)
    for d_, base in ((d0, geo.base0), (d1, geo.base1)):
        u = torch.nn.functional.pad(d_[..., 0] - d_[..., 1], (0, 1))
        u[..., 1:] += d_[..., 1]
        index_flat = (base[g, :, a].unsqueeze(-1) + offsets).view(1, n, 1, Ns, A, bx + 1)
        dflat.view(Mg, -1).scatter_add_(1, index_flat.expand(Mg, n, 1, Ns, A, bx + 1).reshape(Mg, -1),
                                        u.transpose(0, 1).reshape(Mg, -1))


def deformable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                         table: Optional[torch.Tensor], qy: torch.Tensor, qx: torch.Tensor, groups: int,
                         tile_elements: Optional[int] = None) -> torch.Tensor:
    """Tiled deformable attention with bilinear relative-position bias, fwd and bwd.

    Args:
        q: ``(B*M, d, H, W)`` queries, already multiplied by the scale.
        k, v: ``(B*M, d, Ns)`` keys and values.
        pos: ``(B*G, Ns, 2)`` normalised ``(y, x)`` key positions.
        table: ``(M, Th, Tw)`` relative position table, or ``None`` for no bias.
        qy, qx: ``H`` and ``W`` normalised query grid coordinates.
        groups: ``G``; heads ``[g*M/G, (g+1)*M/G)`` use group ``g``'s positions.
        tile_elements: Logits per tile; default by device (``DEFAULT_TILE_ELEMENTS``).
    Returns:
        ``(B*M, d, H, W)`` attention output (before the output projection), float32.
    """
    BM, d = q.shape[:2]
    BG, Ns = pos.shape[:2]
    if (k.shape != (BM, d, Ns) or v.shape != k.shape or pos.shape[2:] != (2,) or BG % groups or BM % BG
            or (table is not None and table.shape[0] != BM // (BG // groups))):
        raise ValueError(f'inconsistent shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, '
                         f'pos {tuple(pos.shape)}, table {None if table is None else tuple(table.shape)}, '
                         f'groups {groups}')
    if tile_elements is None:
        tile_elements = DEFAULT_TILE_ELEMENTS.get(q.device.type, DEFAULT_TILE_ELEMENTS['cuda'])
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return deformable_attention(q.float(), k.float(), v.float(), pos.float(),
                                        None if table is None else table.float(), qy.float(), qx.float(),
                                        groups, tile_elements)
    return _DeformableAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                              pos.contiguous(), table, qy, qx, groups, tile_elements)
