"""Memory-lean deformable attention with the bilinear relative-position bias.

The reference formulation (``DeformableAttention`` with ``attn_impl='reference'``)
materialises, per block, the ``(B*M) x HW x Ns`` logits, a bias of the same size read by
``grid_sample`` from the position table at every query-key displacement, and the
displacement grid itself. This module computes the same function tile by tile:

* Queries are processed in tiles of whole query rows (and groups), so the largest
  temporaries are two tile-sized buffers, allocated once per call and reused: peak memory
  does not grow with ``HW x Ns``. The backward pass recomputes each tile's logits from the
  saved ``q, k, v`` and log-sum-exp (as flash attention does) instead of storing the
  attention weights; the subtractions of the log-sum-exp and of ``rowsum(dO * O)`` ride on
  the matmuls as an extra channel.
* The bias is computed without the displacement grid. With queries on a regular grid, the
  table coordinate of query ``(a, b)`` and key ``j`` separates per axis: the row coordinate
  depends on ``(a, j)`` only and the column coordinate on ``(b, j)`` only. For each key and
  query row, the table is first interpolated along ``y`` over the band of columns the key's
  queries reach (``R``, about ``Wq / W`` of the tile's size), then ``R`` is interpolated
  along ``x`` at every query column (indices and weights shared by all rows and heads).
  The backward pass sums the bias gradient back into ``R``-sized buffers per key and row
  and derives the table and position gradients from them.

Three implementations, same numbers:

* On CPU with PyTorch's MKL, fused C kernels (:class:`_FusedAttention`): one parallel
  region per pass, whose threads take tiles of one group's queries (a few hundred, whole rows
  where possible) and keep each tile's logits in their core's cache from the GEMM (MKL,
  single-threaded per tile) through the bias and softmax to the products with ``v``; the
  per-thread gradient sums are added up at the end.
* On CPU otherwise, the tiles above with PyTorch matmuls and the bias in C.
* On CUDA (or without a C compiler), the tiles with the bias by PyTorch gathers and scatters.

The C kernels are compiled on first use (see :mod:`.native`); ``MMDAT_NATIVE_OPS=0``
disables them.

Semantics are those of ``F.grid_sample(table, (q - p) / 2, mode='bilinear',
padding_mode='zeros', align_corners=True)``: table cells outside the table are zero at any
distance, and gradients w.r.t. the positions are corner differences, as grid_sample's.
Everything runs in float32 or float64 (inputs are cast to float32 under autocast).
"""
import ctypes
import functools
import math
from typing import Optional, Tuple

import torch

from . import native
from .precision import in_full_precision

#: Most logits per tile, by device type (overridable per call): bounds the two tile buffers.
DEFAULT_TILE_ELEMENTS = {'cpu': 1 << 22, 'cuda': 1 << 24}
#: Default tiles: about this many per call (fewer, larger parallel ops stand up better to a
#: busy CPU), but not smaller than MIN_TILE_ELEMENTS logits nor larger than the bound above.
TILES_PER_CALL, MIN_TILE_ELEMENTS = 8, 1 << 22


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


class _TorchBias:
    """The bias with PyTorch ops (any device); built once per pass, then used per tile.

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
        self.dflat = None

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

    def write(self, g: slice, a: slice, out: torch.Tensor, scratch: torch.Tensor):
        """Writes the tile's bias ``(nbg, Mg, Ns, A, W)`` into ``out`` (``scratch``: twice
        its size); returns what ``backward`` needs."""
        R, c0, c1, fy = self.rows(g, a)
        n, Mg, Ns, A, W = out.shape
        index = self.ix[g].view(n, 1, Ns, 1, W).expand(n, Mg, Ns, A, W)
        tmp = torch.view_as_complex(scratch[:2 * out.numel()].view(*out.shape, 2))
        picked = torch.view_as_real(torch.gather(R, 4, index, out=tmp))
        torch.addcmul(picked[..., 0], picked[..., 1], self.fx[g].view(n, 1, Ns, 1, W), out=out)
        return index, R, c0, c1, fy

    def forward_tile(self, g: slice, a: slice, S: torch.Tensor, kt: torch.Tensor, qt: torch.Tensor,
                     scratch: torch.Tensor) -> torch.Tensor:
        self.write(g, a, S, scratch)
        S3 = _flat(S)
        return _shifted_exp(S3.baddbmm_(kt.transpose(1, 2), qt))

    def probabilities(self, g: slice, a: slice, S: torch.Tensor, kt: torch.Tensor, qt: torch.Tensor,
                      scratch: torch.Tensor):
        saved = self.write(g, a, S, scratch)
        _flat(S).baddbmm_(kt.transpose(1, 2), qt).exp_()
        return saved

    def backward(self, g: slice, a: slice, dS: torch.Tensor, P: torch.Tensor, saved):
        """``dS *= P``, then accumulates the table and position gradients of one tile's bias
        from ``dS`` (``P``'s buffer serves as scratch)."""
        dS.mul_(P)
        scratch = P.view(-1)
        index, R, c0, c1, fy = saved
        n, Mg, Ns, A, W = dS.shape
        bx = self.bx
        if self.dflat is None:
            BG = self.fx.shape[0]
            self.dflat = dS.new_zeros(Mg, self.windows.shape[1] + bx + 1)
            self.dpy, self.dpx = dS.new_zeros(BG, Ns), dS.new_zeros(BG, Ns)
        # bias = Re R[i] + fx * Im R[i] at i = index: gradient w.r.t. (Re R, Im R) as pairs
        dR = dS.new_zeros(n, Mg, Ns, A, bx, 2)
        dR[..., 0].scatter_add_(4, index, dS)
        tmp = scratch[:dS.numel()].view_as(dS)
        torch.mul(dS, self.fx[g].view(n, 1, Ns, 1, W), out=tmp)
        dR[..., 1].scatter_add_(4, index, tmp)
        self.dpx[g] += (dR[..., 0] * R.imag).sum((1, 3, 4))
        # R = c0 + fy * (c1 - c0)
        self.dpy[g] += (dR * (c1 - c0)).sum((1, 3, 4, 5))
        d1 = dR * fy
        d0 = dR.sub_(d1)
        # window s holds T[s + x] and T[s + x + 1] - T[s + x]: back to the flat table
        offsets = torch.arange(bx + 1, device=dS.device)
        for d_, base in ((d0, self.base0), (d1, self.base1)):
            u = torch.nn.functional.pad(d_[..., 0] - d_[..., 1], (0, 1))
            u[..., 1:] += d_[..., 1]
            index_flat = (base[g, :, a].unsqueeze(-1) + offsets).view(1, n, 1, Ns, A, bx + 1)
            self.dflat.view(Mg, -1).scatter_add_(
                1, index_flat.expand(Mg, n, 1, Ns, A, bx + 1).reshape(Mg, -1), u.transpose(0, 1).reshape(Mg, -1))

    def grads(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gradients w.r.t. the positions ``(BG, Ns, 2)`` and the table ``(M, Th, Tw)``."""
        dpos = torch.stack([self.dpy * (-(self.Th - 1) / 4), self.dpx * (-(self.Tw - 1) / 4)], -1)
        P = self.bx + 1
        dtab = self.dflat[:, :self.G * self.flat_len].view(self.Mg, self.G, self.Th + 2, self.Wp).transpose(0, 1)
        return dpos, dtab.reshape(self.G * self.Mg, self.Th + 2, self.Wp)[:, 1:-1, P:P + self.Tw]


# ----------------------------------------------------------------------------- native (CPU)

#: One tile of the bias, forward and backward; included once per scalar type.
_C_KERNELS = r"""
/* 16-lane float vectors (AVX-512) for the bias's column loops: a row's cells lie within a few
   vector lanes of its columns, so permutes replace gathers, and in-register prefix sums the
   per-cell sums of the backward pass. Elsewhere (and for double) the plain loops below. */
#undef PERMUTE16
#if FLOAT32 && defined(__AVX512F__)
#include <immintrin.h>
#define PERMUTE16 1
/* inclusive prefix sums over the lanes */
static inline __m512 NAME(scan16)(__m512 x) {
    const __m512i z = _mm512_setzero_si512();
    x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), z, 15)));
    x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), z, 14)));
    x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), z, 12)));
    return _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), z, 8)));
}
/* lane l = x[l - 1], lane 0 = 0 */
static inline __m512 NAME(shift1)(__m512 x) {
    return _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), _mm512_setzero_si512(), 15));
}
#else
#define PERMUTE16 0
#endif

/* R[x] = table row y0 + fy * (row y0+1 - row y0) and D[x] = row y0+1 - row y0 (unless D is NULL),
   x over the key's band of columns xs ...; cells outside the table are zero. The bounds are
   checked per row and band, not per cell, so that the loops vectorize. */
static inline void NAME(rows)(const scalar_t *t, int Th, int Tw, int y0, scalar_t w, int xs, int bx,
                              scalar_t *R, scalar_t *D) {
    int x0 = xs < 0 ? -xs : 0, x1 = Tw - xs < bx ? Tw - xs : bx;
    x0 = x0 < bx ? x0 : bx;
    x1 = x1 > x0 ? x1 : x0;
    const scalar_t *r0 = y0 >= 0 && y0 < Th ? t + (int64_t)y0 * Tw + xs : NULL;
    const scalar_t *r1 = y0 + 1 >= 0 && y0 + 1 < Th ? t + (int64_t)(y0 + 1) * Tw + xs : NULL;
    for (int x = 0; x < x0; x++) R[x] = 0;
    for (int x = x1; x < bx; x++) R[x] = 0;
    if (r0 && r1) {
#pragma omp simd
        for (int x = x0; x < x1; x++) R[x] = r0[x] + w * (r1[x] - r0[x]);
    } else if (r0) {
#pragma omp simd
        for (int x = x0; x < x1; x++) R[x] = r0[x] + w * -r0[x];
    } else if (r1) {
#pragma omp simd
        for (int x = x0; x < x1; x++) R[x] = w * r1[x];
    } else {
        for (int x = x0; x < x1; x++) R[x] = 0;
    }
    if (!D) return;
    for (int x = 0; x < x0; x++) D[x] = 0;
    for (int x = x1; x < bx; x++) D[x] = 0;
#pragma omp simd
    for (int x = x0; x < x1; x++) D[x] = (r1 ? r1[x] : (scalar_t)0) - (r0 ? r0[x] : (scalar_t)0);
}

/* x[0 .. 16) = 0 (one vector): the padding that vector loads read past a band, and dR */
static inline void NAME(zero16)(scalar_t *x) {
#if PERMUTE16
    _mm512_storeu_ps(x, _mm512_setzero_ps());
#else
    for (int i = 0; i < 16; i++) x[i] = 0;
#endif
}

/* Scratch of add_row_bias and row_bias_grad for a band of bx cells and n columns */
static inline int64_t NAME(row_scratch)(int bx, int n) { return 6 * (int64_t)bx + n + 96; }

/* s[c] += the bias of one key at one query row and head (table t), over n columns whose first
   corners are table columns cell[c] (non-decreasing) with weights wx[c]; y0, w: the table row
   and its weight. R: row_scratch */
static inline void NAME(add_row_bias)(const scalar_t *t, int Th, int Tw, int y0, scalar_t w, const int32_t *cell,
                                      const scalar_t *wx, int n, scalar_t *s, scalar_t *R) {
    int xs = cell[0], bx = cell[n - 1] - xs + 2, c = 0;
    NAME(rows)(t, Th, Tw, y0, w, xs, bx, R, NULL);
    NAME(zero16)(R + bx);
#if PERMUTE16
    /* 16 columns at a time: their cells' corners are lanes of R from the first one's */
    for (; c < n; c += 16) {
        int m = n - c < 16 ? n - c : 16, base = cell[c] - xs;
        if (cell[c + m - 1] - cell[c] > 15) break;
        __mmask16 k = (__mmask16)((1u << m) - 1);
        __m512i idx = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, cell + c), _mm512_set1_epi32(cell[c]));
        __m512 r0 = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(R + base));
        __m512 r1 = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(R + base + 1));
        __m512 b = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, wx + c), _mm512_sub_ps(r1, r0), r0);
        _mm512_mask_storeu_ps(s + c, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, s + c), b));
    }
#endif
#pragma omp simd
    for (int i = c; i < n; i++) s[i] += R[cell[i] - xs] + wx[i] * (R[cell[i] - xs + 1] - R[cell[i] - xs]);
}

/* What row_bias_grad needs of a row segment's n columns (cells cell[c] - xs in [0, band)) into
   plan: generic: the columns of cell i are [plan[i], plan[i + 1]), and the most columns of one
   cell is returned; PERMUTE16: per 16 columns from c, plan[c + l] = the last of them whose cell
   is at most cell[c] + l, or plan[c] = -1 where their cells lie more than 14 apart (a vector of
   per-cell sums shifted by one cell must keep them all). plan: band + n + 16 */
static inline int NAME(column_plan)(const int32_t *cell, int n, int xs, int band, int *plan) {
#if PERMUTE16
    (void)xs, (void)band;
    for (int c = 0; c < n; c += 16) {
        int m = n - c < 16 ? n - c : 16, *L = plan + c;
        if (cell[c + m - 1] - cell[c] > 14) {
            L[0] = -1;
            continue;
        }
        for (int l = 0; l < 16; l++) L[l] = -1;
        for (int i = 0; i < m; i++) L[cell[c + i] - cell[c]] = i;
        for (int l = 1; l < 16; l++) L[l] = L[l] > L[l - 1] ? L[l] : L[l - 1];
    }
    return 0;
#else
    /* without branches, which runs of a few columns per cell mispredict */
    int *seg = plan, longest = 0;
    for (int i = 0; i <= band; i++) seg[i] = n;
    for (int c = n - 1; c >= 0; c--) seg[cell[c] - xs] = c;
    for (int i = band - 1; i >= 0; i--) {
        seg[i] = seg[i] < seg[i + 1] ? seg[i] : seg[i + 1];
        longest = seg[i + 1] - seg[i] > longest ? seg[i + 1] - seg[i] : longest;
    }
    return longest;
#endif
}

/* Gradients of add_row_bias (band cells xs .. xs + bx - 1; plan and longest from column_plan)
   given g, the logits' gradient at its n columns: into the head's table d and into *gy, *gx,
   those w.r.t. the key's table coordinates (y, x). bias[c] = R[i] + wx[c] (R[i + 1] - R[i]),
   i = cell[c] - xs, so with Eu[i], E1[i] the sums of g and g * wx over cell i's columns, the
   gradient w.r.t. R is dR[i] = Eu[i] - E1[i] + E1[i - 1]. buf: row_scratch */
static inline void NAME(row_bias_grad)(const scalar_t *t, int Th, int Tw, int y0, scalar_t w, const int32_t *cell,
                                       int xs, int bx, const int *plan, int longest, const scalar_t *g,
                                       const scalar_t *wx, int n, scalar_t *d, scalar_t *gy, scalar_t *gx,
                                       scalar_t *buf) {
    scalar_t *R = buf, *D = R + bx + 16;
    /* dR: whole 64-byte vectors (PERMUTE16 adds into them) */
    scalar_t *dR = (scalar_t *)(((uintptr_t)(D + bx + 16) + 63) & ~(uintptr_t)63);
    NAME(rows)(t, Th, Tw, y0, w, xs, bx, R, D);
    NAME(zero16)(R + bx);
    NAME(zero16)(D + bx);
    int padded = (bx + 31) & ~15;
    for (int i = 0; i < padded; i += 16) NAME(zero16)(dR + i);
    scalar_t sy = 0, sx = 0;
#if PERMUTE16
    (void)longest;
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 vy = _mm512_setzero_ps(), vx = _mm512_setzero_ps();
    for (int c = 0; c < n; c += 16) {
        int m = n - c < 16 ? n - c : 16, base = cell[c] - xs;
        if (plan[c] < 0) {  /* cells too far apart for one vector: per column */
            for (int i = c; i < c + m; i++) {
                int x = cell[i] - xs;
                scalar_t gu = g[i], g1 = g[i] * wx[i];
                dR[x] += gu - g1;
                dR[x + 1] += g1;
                sy += (gu - g1) * D[x] + g1 * D[x + 1];
                sx += gu * (R[x + 1] - R[x]);
            }
            continue;
        }
        __mmask16 k = (__mmask16)((1u << m) - 1);
        __m512 v = _mm512_maskz_loadu_ps(k, g + c), v1 = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, wx + c));
        __m512i L = _mm512_loadu_si512(plan + c);
        /* per cell base + l: the sums of g and g * wx (prefix sums at each cell's last column, differenced) */
        __m512 qu = _mm512_permutexvar_ps(L, NAME(scan16)(v)), q1 = _mm512_permutexvar_ps(L, NAME(scan16)(v1));
        __m512 eu = _mm512_sub_ps(qu, NAME(shift1)(qu)), e1 = _mm512_sub_ps(q1, NAME(shift1)(q1));
        __m512 dr = _mm512_add_ps(_mm512_sub_ps(eu, e1), NAME(shift1)(e1));  /* e1's lane 15 is 0 */
        vx = _mm512_fmadd_ps(eu, _mm512_sub_ps(_mm512_loadu_ps(R + base + 1), _mm512_loadu_ps(R + base)), vx);
        vy = _mm512_fmadd_ps(dr, _mm512_loadu_ps(D + base), vy);
        /* dR[base + l] += dr[l], as two aligned vectors: rotated by base % 16, split by lane */
        int off = base & 15;
        scalar_t *lo = dR + (base - off);
        __m512 rot = _mm512_permutexvar_ps(_mm512_sub_epi32(lanes, _mm512_set1_epi32(off)), dr);
        __mmask16 upper = (__mmask16)(0xffffu << off);
        _mm512_store_ps(lo, _mm512_mask_add_ps(_mm512_load_ps(lo), upper, _mm512_load_ps(lo), rot));
        _mm512_store_ps(lo + 16, _mm512_mask_add_ps(_mm512_load_ps(lo + 16), (__mmask16)~upper,
                                                    _mm512_load_ps(lo + 16), rot));
    }
    sy += _mm512_reduce_add_ps(vy);
    sx += _mm512_reduce_add_ps(vx);
#else
    /* Eu and E1 per cell, a column offset at a time over all cells */
    const int *seg = plan;
    scalar_t *Eu = dR + padded, *E1 = Eu + bx, *gw = E1 + bx;
#pragma omp simd
    for (int c = 0; c < n; c++) gw[c] = g[c] * wx[c];
    for (int i = 0; i < bx; i++) Eu[i] = E1[i] = 0;
    for (int k = 0; k < longest; k++)
#pragma omp simd
        for (int i = 0; i < bx; i++) {
            int c = seg[i] + k;
            if (c < seg[i + 1]) {
                Eu[i] += g[c];
                E1[i] += gw[c];
            }
        }
#pragma omp simd reduction(+:sy, sx)
    for (int i = 0; i < bx; i++) {
        dR[i] = Eu[i] - E1[i] + (i ? E1[i - 1] : 0);
        sy += dR[i] * D[i];
        sx += Eu[i] * (R[i + 1] - R[i]);
    }
#endif
    *gy += sy;
    *gx += sx;
    /* the table cells the band's two rows cover: x in [x0, x1) */
    int x0 = xs < 0 ? -xs : 0, x1 = Tw - xs < bx ? Tw - xs : bx;
    d += xs;
    if (y0 >= 0 && y0 < Th)
#pragma omp simd
        for (int x = x0; x < x1; x++) d[(int64_t)y0 * Tw + x] += dR[x] - dR[x] * w;
    if (y0 + 1 >= 0 && y0 + 1 < Th)
#pragma omp simd
        for (int x = x0; x < x1; x++) d[(int64_t)(y0 + 1) * Tw + x] += dR[x] * w;
}

/* One tile's logits S (n, Mg, Ns, A, W) hold q.k (minus the log-sum-exp in the backward pass).
   exp_mode 0 (forward): S += bias, and mx (n, Mg, A, W) = the max over the keys; then exp_shift.
   exp_mode 1 (backward): S = EXP(S + bias), the probabilities. */
void NAME(bias_forward)(const scalar_t *table, const int32_t *lo_y, const scalar_t *fy, const int32_t *lo_x,
                        const scalar_t *fx, scalar_t *S, scalar_t *mx, int G, int Mg, int Ns, int H, int W,
                        int Th, int Tw, int g0, int n, int a0, int A, int exp_mode, int nthreads) {
    int64_t queries = (int64_t)n * Mg * A * W;
    if (!exp_mode)
        for (int64_t i = 0; i < queries; i++) mx[i] = -INFINITY;
#pragma omp parallel num_threads(nthreads)
    {
        scalar_t *R = NULL, *local_max = NULL;
        int64_t capacity = 0;
        if (!exp_mode) {
            local_max = (scalar_t *)malloc(sizeof(scalar_t) * (size_t)queries);
            for (int64_t i = 0; i < queries; i++) local_max[i] = -INFINITY;
        }
#pragma omp for schedule(static) nowait
        for (int64_t gj = 0; gj < (int64_t)n * Ns; gj++) {
            int bgl = (int)(gj / Ns), j = (int)(gj % Ns), bg = g0 + bgl;
            const int32_t *lx = lo_x + ((int64_t)bg * Ns + j) * W;
            const scalar_t *wx = fx + ((int64_t)bg * Ns + j) * W;
            int bx = lx[W - 1] - lx[0] + 2;  /* lo_x is non-decreasing along W */
            if (NAME(row_scratch)(bx, W) > capacity) {
                capacity = NAME(row_scratch)(bx, W);
                R = (scalar_t *)realloc(R, sizeof(scalar_t) * (size_t)capacity);
            }
            for (int a = 0; a < A; a++) {
                int64_t yi = ((int64_t)bg * Ns + j) * H + a0 + a;
                for (int m = 0; m < Mg; m++) {
                    const scalar_t *t = table + (int64_t)((bg % G) * Mg + m) * Th * Tw;
                    scalar_t *o = S + ((((int64_t)bgl * Mg + m) * Ns + j) * A + a) * W;
                    NAME(add_row_bias)(t, Th, Tw, lo_y[yi], fy[yi], lx, wx, W, o, R);
                    /* separate loops: EXP and the max vectorize on their own */
                    if (exp_mode) {
#pragma omp simd
                        for (int b = 0; b < W; b++) o[b] = EXP(o[b]);
                    } else {
                        scalar_t *mq = local_max + (((int64_t)bgl * Mg + m) * A + a) * W;
#pragma omp simd
                        for (int b = 0; b < W; b++) mq[b] = o[b] > mq[b] ? o[b] : mq[b];
                    }
                }
            }
        }
        if (!exp_mode) {
#pragma omp critical
            for (int64_t i = 0; i < queries; i++) mx[i] = local_max[i] > mx[i] ? local_max[i] : mx[i];
            free(local_max);
        }
        free(R);
    }
}

/* S (blocks, Ns, cols) = EXP(S - mx (blocks, cols)) */
void NAME(exp_shift)(scalar_t *S, const scalar_t *mx, int blocks, int Ns, int cols, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t row = 0; row < (int64_t)blocks * Ns; row++) {
        scalar_t *s = S + row * cols;
        const scalar_t *m = mx + row / Ns * cols;
#pragma omp simd
        for (int c = 0; c < cols; c++) s[c] = EXP(s[c] - m[c]);
    }
}

/* dS holds dP - rowsum(dO * O) on entry and P (dP - rowsum(dO * O)) on exit. dtable (nthreads, M, Th,
   Tw): per-thread accumulators; dcoord (BG, Ns, 2) += gradients w.r.t. the keys' table coordinates
   (y, x); the caller scales them to positions. */
void NAME(bias_backward)(const scalar_t *table, const int32_t *lo_y, const scalar_t *fy, const int32_t *lo_x,
                         const scalar_t *fx, scalar_t *dS, const scalar_t *P, scalar_t *dtable, scalar_t *dcoord,
                         int G, int Mg, int Ns, int H, int W, int Th, int Tw, int g0, int n, int a0, int A,
                         int nthreads) {
    int64_t M = (int64_t)G * Mg;
#pragma omp parallel num_threads(nthreads)
    {
        scalar_t *buf = NULL;
        int *plan = NULL;
        int64_t capacity = 0;
        scalar_t *dt = dtable + (int64_t)omp_get_thread_num() * M * Th * Tw;
#pragma omp for schedule(static)
        for (int64_t gj = 0; gj < (int64_t)n * Ns; gj++) {
            int bgl = (int)(gj / Ns), j = (int)(gj % Ns), bg = g0 + bgl;
            const int32_t *lx = lo_x + ((int64_t)bg * Ns + j) * W;
            const scalar_t *wx = fx + ((int64_t)bg * Ns + j) * W;
            int xs = lx[0], bx = lx[W - 1] - xs + 2;
            if (bx > capacity) {
                capacity = bx;
                buf = (scalar_t *)realloc(buf, sizeof(scalar_t) * (size_t)NAME(row_scratch)(bx, W));
                plan = (int *)realloc(plan, sizeof(int) * (size_t)(bx + W + 16));
            }
            int longest = NAME(column_plan)(lx, W, xs, bx, plan);
            scalar_t gy = 0, gx = 0;
            for (int a = 0; a < A; a++) {
                int64_t yi = ((int64_t)bg * Ns + j) * H + a0 + a;
                int y0 = lo_y[yi];
                scalar_t w = fy[yi];
                for (int m = 0; m < Mg; m++) {
                    int64_t head = (int64_t)((bg % G) * Mg + m);
                    int64_t row = ((((int64_t)bgl * Mg + m) * Ns + j) * A + a) * W;
                    scalar_t *g = dS + row;
                    const scalar_t *p = P + row;
#pragma omp simd
                    for (int b = 0; b < W; b++) g[b] *= p[b];  /* dP - D -> dS, in place */
                    NAME(row_bias_grad)(table + head * Th * Tw, Th, Tw, y0, w, lx, xs, bx, plan, longest, g, wx, W,
                                        dt + head * Th * Tw, &gy, &gx, buf);
                }
            }
            dcoord[((int64_t)bg * Ns + j) * 2] += gy;
            dcoord[((int64_t)bg * Ns + j) * 2 + 1] += gx;
        }
        free(buf);
        free(plan);
    }
}

/* ---- the whole attention per (group, tile of T consecutive queries), GEMMs by the BLAS ---- */

/* Fortran BLAS ?gemm_ (column-major) */
typedef void (*NAME(blas_gemm))(const char *, const char *, const int *, const int *, const int *,
                                const scalar_t *, const scalar_t *, const int *, const scalar_t *, const int *,
                                const scalar_t *, scalar_t *, const int *);

/* row-major C (M x N, ldc) = op(A) op(B) + beta C; op(X) = X^T when tX (X is then stored K x M / N x K) */
static inline void NAME(mm)(NAME(blas_gemm) gemm, int ta, int tb, int M, int N, int K, const scalar_t *A,
                            int lda, const scalar_t *B, int ldb, scalar_t beta, scalar_t *C, int ldc) {
    const scalar_t one = 1;
    gemm(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

typedef struct {
    const scalar_t *table, *pos, *qy, *qx;  /* pos (BG, Ns, 2) normalised (y, x); qy (H), qx (W) */
    int G, Mg, Ns, H, W, Th, Tw;
} NAME(geometry);

/* A table coordinate as _axis_coords computes it (same operations, so the same corners):
   its floor, clamped as _native_coords does, and its fraction */
static inline int NAME(table_coord)(scalar_t qc, scalar_t pc, int size, scalar_t *frac) {
    scalar_t c = ((qc - pc) * (scalar_t)0.5 + 1) * ((scalar_t)(size - 1) / 2), lo = floor(c);
    *frac = c - lo;
    lo = lo < -2 * size - 2 ? -2 * size - 2 : (lo > 3 * size + 2 ? 3 * size + 2 : lo);
    return (int)lo;
}

/* A key at column position px against query columns [b0, b1): per column the table column of
   the first corner, cell (non-decreasing), and its weight wx */
static inline void NAME(key_columns)(const NAME(geometry) *geo, scalar_t px, int b0, int b1, int32_t *cell,
                                     scalar_t *wx) {
    for (int b = b0; b < b1; b++) cell[b - b0] = NAME(table_coord)(geo->qx[b], px, geo->Tw, wx + b - b0);
}

/* The columns of queries [p0, p0 + n) that need coordinates: [*lo, *hi), all W unless the
   queries lie in one row. The tile's row segments share them. */
static inline void NAME(tile_columns)(int W, int p0, int n, int *lo, int *hi) {
    int one_row = p0 / W == (p0 + n - 1) / W;
    *lo = one_row ? p0 % W : 0;
    *hi = one_row ? *lo + n : W;
}

/* The row segment of the tile's queries [p0, p0 + n) from tile column c0: query row *a,
   columns [*b0, *b1); the next segment starts at tile column c0 + *b1 - *b0 */
static inline void NAME(row_segment)(int W, int p0, int n, int c0, int *a, int *b0, int *b1) {
    *a = (p0 + c0) / W;
    *b0 = (p0 + c0) % W;
    *b1 = *b0 + (n - c0 < W - *b0 ? n - c0 : W - *b0);
}

/* g = p (g - delta): dP into the logits' gradient, over n queries of one key */
static inline void NAME(logit_grad)(scalar_t *g, const scalar_t *p, const scalar_t *delta, int n) {
#pragma omp simd
    for (int c = 0; c < n; c++) g[c] = p[c] * (g[c] - delta[c]);
}

/* Per-thread scratch of the bias (logits and bias_grad): the band is at most 5 * Tw + 8 */
static int64_t NAME(bias_scratch)(int W, int Tw) {
    int band = 5 * Tw + 8;
    return 2 * (int64_t)W + (band + W + 16) + NAME(row_scratch)(band, W);
}

/* Once a key's logits s[0 .. n) are complete (n queries, in a core's L1): the forward pass's
   maximum over the keys so far, mx (when given), or the backward pass's probabilities
   s = EXP(s - lse) */
static inline void NAME(logit_row)(scalar_t *s, int n, scalar_t *mx, const scalar_t *lse) {
    if (mx) {
#pragma omp simd
        for (int c = 0; c < n; c++) mx[c] = s[c] > mx[c] ? s[c] : mx[c];
    } else {
#pragma omp simd
        for (int c = 0; c < n; c++) s[c] = EXP(s[c] - lse[c]);
    }
}

/* S (Mg, Ns, n) = k^T q (+ bias when there is a table) for the Mg heads of group bg (heads
   bg * Mg ...), queries [p0, p0 + n), and then either mx (Mg, n) = its maximum over the keys
   (forward pass: mx given) or S = EXP(S - lse) (backward: lse, head m's at lse + m * HW).
   scratch: bias_scratch */
static void NAME(logits)(NAME(blas_gemm) gemm, const NAME(geometry) *geo, const scalar_t *q, const scalar_t *k,
                         int bg, int d, int p0, int n, scalar_t *S, scalar_t *mx, const scalar_t *lse,
                         scalar_t *scratch) {
    int Ns = geo->Ns, W = geo->W, HW = geo->H * W, Mg = geo->Mg, Th = geo->Th, Tw = geo->Tw;
    for (int m = 0; m < Mg; m++) {
        int64_t bm = (int64_t)bg * Mg + m;
        NAME(mm)(gemm, 1, 0, Ns, n, d, k + bm * d * Ns, Ns, q + bm * d * HW + p0, HW, 0, S + m * (int64_t)Ns * n, n);
    }
    if (mx)
        for (int64_t i = 0; i < (int64_t)Mg * n; i++) mx[i] = -INFINITY;
    if (!geo->table) {
        for (int m = 0; m < Mg; m++)
            for (int j = 0; j < Ns; j++)
                NAME(logit_row)(S + ((int64_t)m * Ns + j) * n, n, mx ? mx + (int64_t)m * n : NULL,
                                mx ? NULL : lse + (int64_t)m * HW);
        return;
    }
    int lo, hi;
    NAME(tile_columns)(W, p0, n, &lo, &hi);
    int32_t *cell = (int32_t *)scratch;
    scalar_t *wx = scratch + W, *R = wx + W;
    for (int j = 0; j < Ns; j++) {
        const scalar_t *p = geo->pos + ((int64_t)bg * Ns + j) * 2;
        NAME(key_columns)(geo, p[1], lo, hi, cell, wx);
        for (int c0 = 0, a, b0, b1; c0 < n; c0 += b1 - b0) {
            NAME(row_segment)(W, p0, n, c0, &a, &b0, &b1);
            scalar_t fy;
            int y0 = NAME(table_coord)(geo->qy[a], p[0], Th, &fy);
            for (int m = 0; m < Mg; m++) {
                const scalar_t *t = geo->table + (int64_t)((bg % geo->G) * Mg + m) * Th * Tw;
                scalar_t *s = S + ((int64_t)m * Ns + j) * n + c0;
                NAME(add_row_bias)(t, Th, Tw, y0, fy, cell + b0 - lo, wx + b0 - lo, b1 - b0, s, R);
                NAME(logit_row)(s, b1 - b0, mx ? mx + (int64_t)m * n + c0 : NULL, mx ? NULL : lse + (int64_t)m * HW + c0);
            }
        }
    }
}

/* dS (Mg, Ns, n) holds dP for the tile's queries [p0, p0 + n) on entry and the logits' gradient
   P (dP - delta) on exit (delta (Mg, n) = rowsum(dO * O)); from it the bias gradients: into the
   table (dt: this thread's copy) and the keys' table coordinates (dc: this thread's (BG, Ns, 2)).
   scratch: bias_scratch */
static void NAME(bias_grad)(const NAME(geometry) *geo, int bg, int p0, int n, scalar_t *dS, const scalar_t *P,
                            const scalar_t *delta, scalar_t *dt, scalar_t *dc, scalar_t *scratch) {
    int Ns = geo->Ns, W = geo->W, Mg = geo->Mg, Th = geo->Th, Tw = geo->Tw, lo, hi;
    NAME(tile_columns)(W, p0, n, &lo, &hi);
    int32_t *cell = (int32_t *)scratch;
    scalar_t *wx = scratch + W;
    int *plan = (int *)(wx + W);
    scalar_t *buf = wx + W + (5 * Tw + 8) + W + 16;
    for (int j = 0; j < Ns; j++) {
        const scalar_t *p = geo->pos + ((int64_t)bg * Ns + j) * 2;
        scalar_t *gyx = dc + ((int64_t)bg * Ns + j) * 2;
        NAME(key_columns)(geo, p[1], lo, hi, cell, wx);
        int planned_b0 = -1, planned_b1 = -1, longest = 0;
        for (int c0 = 0, a, b0, b1; c0 < n; c0 += b1 - b0) {
            NAME(row_segment)(W, p0, n, c0, &a, &b0, &b1);
            const int32_t *cs = cell + b0 - lo;
            int xs = cs[0], band = cs[b1 - b0 - 1] - xs + 2;
            if (b0 != planned_b0 || b1 != planned_b1) {  /* whole rows share one plan */
                longest = NAME(column_plan)(cs, b1 - b0, xs, band, plan);
                planned_b0 = b0, planned_b1 = b1;
            }
            scalar_t fy;
            int y0 = NAME(table_coord)(geo->qy[a], p[0], Th, &fy);
            for (int m = 0; m < Mg; m++) {
                int64_t head = (int64_t)((bg % geo->G) * Mg + m), row = ((int64_t)m * Ns + j) * n + c0;
                NAME(logit_grad)(dS + row, P + row, delta + (int64_t)m * n + c0, b1 - b0);
                NAME(row_bias_grad)(geo->table + head * Th * Tw, Th, Tw, y0, fy, cs, xs, band, plan, longest,
                                    dS + row, wx + b0 - lo, b1 - b0, dt + head * Th * Tw, gyx, gyx + 1, buf);
            }
        }
    }
}

/* Per-thread workspace of attention_backward before its gradient sums (attention_forward's is smaller) */
int64_t NAME(attention_tile_size)(int Mg, int Ns, int T, int W, int Tw) {
    return (int64_t)Mg * (2 * Ns + 1) * T + NAME(bias_scratch)(W, Tw);
}

/* out (BM, d, HW) = attention output, lse (BM, HW) its log-sum-exp. q (BM, d, HW); k, v (BM, d, Ns);
   pos, table, qy, qx as deformable_attention's (table may be NULL: no bias).
   work: nthreads * (Mg * (Ns + 1) * T + T + bias_scratch) */
void NAME(attention_forward)(void *gemm_fn, void *blas_threads_fn, const scalar_t *q, const scalar_t *k,
                             const scalar_t *v, const scalar_t *table, const scalar_t *pos, const scalar_t *qy,
                             const scalar_t *qx, scalar_t *out, scalar_t *lse, scalar_t *work,
                             int BM, int d, int G, int Mg, int Ns, int H, int W, int Th, int Tw, int T,
                             int nthreads) {
    NAME(blas_gemm) gemm = (NAME(blas_gemm))gemm_fn;
    NAME(geometry) geo = {table, pos, qy, qx, G, Mg, Ns, H, W, Th, Tw};
    int HW = H * W, tiles = (HW + T - 1) / T, BG = BM / Mg;
    int64_t per_thread = (int64_t)Mg * (Ns + 1) * T + T + NAME(bias_scratch)(W, Tw);
#pragma omp parallel num_threads(nthreads)
    {
        int previous = blas_threads_fn ? ((int (*)(int))blas_threads_fn)(1) : 0;
        scalar_t *S = work + (int64_t)omp_get_thread_num() * per_thread;
        scalar_t *mx_all = S + (int64_t)Mg * Ns * T, *l = mx_all + (int64_t)Mg * T, *scratch = l + T;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < (int64_t)BG * tiles; item++) {
            int bg = (int)(item / tiles), p0 = (int)(item % tiles) * T, n = HW - p0 < T ? HW - p0 : T;
            NAME(logits)(gemm, &geo, q, k, bg, d, p0, n, S, mx_all, NULL, scratch);
            for (int m = 0; m < Mg; m++) {
                int64_t bm = (int64_t)bg * Mg + m;
                scalar_t *Sm = S + (int64_t)m * Ns * n, *mx = mx_all + (int64_t)m * n;
                for (int c = 0; c < n; c++) l[c] = 0;
                for (int j = 0; j < Ns; j++) {
                    scalar_t *s = Sm + (int64_t)j * n;
#pragma omp simd
                    for (int c = 0; c < n; c++) {
                        s[c] = EXP(s[c] - mx[c]);
                        l[c] += s[c];
                    }
                }
                scalar_t *o = out + bm * d * HW + p0;
                NAME(mm)(gemm, 0, 0, d, n, Ns, v + bm * d * Ns, Ns, Sm, n, 0, o, HW);
                for (int c = 0; c < n; c++) {
                    lse[bm * HW + p0 + c] = LOG(l[c]) + mx[c];
                    l[c] = 1 / l[c];
                }
                for (int ch = 0; ch < d; ch++) {
                    scalar_t *oc = o + (int64_t)ch * HW;
#pragma omp simd
                    for (int c = 0; c < n; c++) oc[c] *= l[c];
                }
            }
        }
        if (blas_threads_fn) ((int (*)(int))blas_threads_fn)(previous);
    }
}

/* Gradients of attention_forward given dout (BM, d, HW), or (HW, BM, d) when dout_cl (a batch of one's
   channels-last gradient), out and lse: dq (BM, d, HW); dk, dv (BM, d, Ns);
   dtable (M, Th, Tw) and dcoord (BG, Ns, 2) (w.r.t. the keys' table coordinates) when table is given.
   work: nthreads * (attention_tile_size + 2 * BM * d * Ns + M * Th * Tw + 2 * BG * Ns) */
void NAME(attention_backward)(void *gemm_fn, void *blas_threads_fn, const scalar_t *q, const scalar_t *k,
                              const scalar_t *v, const scalar_t *table, const scalar_t *pos, const scalar_t *qy,
                              const scalar_t *qx, const scalar_t *out, const scalar_t *lse, const scalar_t *dout,
                              scalar_t *dq, scalar_t *dk, scalar_t *dv, scalar_t *dtable, scalar_t *dcoord,
                              scalar_t *work, int BM, int d, int G, int Mg, int Ns, int H, int W, int Th, int Tw,
                              int T, int dout_cl, int nthreads) {
    NAME(blas_gemm) gemm = (NAME(blas_gemm))gemm_fn;
    NAME(geometry) geo = {table, pos, qy, qx, G, Mg, Ns, H, W, Th, Tw};
    int HW = H * W, tiles = (HW + T - 1) / T, BG = BM / Mg, ldg = dout_cl ? BM * d : HW;
    int64_t kv_size = (int64_t)BM * d * Ns, table_size = table ? (int64_t)G * Mg * Th * Tw : 0;
    int64_t coord_size = table ? 2 * (int64_t)BG * Ns : 0;
    int64_t acc_size = 2 * kv_size + table_size + coord_size;
    int64_t tile_size = NAME(attention_tile_size)(Mg, Ns, T, W, Tw);
    int64_t per_thread = tile_size + acc_size;
    int team = 1;
#pragma omp parallel num_threads(nthreads)
    {
        int previous = blas_threads_fn ? ((int (*)(int))blas_threads_fn)(1) : 0;
#pragma omp single
        team = omp_get_num_threads();
        scalar_t *P = work + (int64_t)omp_get_thread_num() * per_thread;
        scalar_t *dS = P + (int64_t)Mg * Ns * T, *delta = dS + (int64_t)Mg * Ns * T, *scratch = delta + (int64_t)Mg * T;
        scalar_t *acc = P + tile_size;
        scalar_t *dk_acc = acc, *dv_acc = acc + kv_size, *dt = dv_acc + kv_size, *dc = dt + table_size;
        memset(acc, 0, sizeof(scalar_t) * (size_t)acc_size);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < (int64_t)BG * tiles; item++) {
            int bg = (int)(item / tiles), p0 = (int)(item % tiles) * T, n = HW - p0 < T ? HW - p0 : T;
            NAME(logits)(gemm, &geo, q, k, bg, d, p0, n, P, NULL, lse + (int64_t)bg * Mg * HW + p0, scratch);
            /* per head: dv += dO^T P and dP = dO v^T (into dS), then dS = P (dP - delta) */
            for (int m = 0; m < Mg; m++) {
                int64_t bm = (int64_t)bg * Mg + m;
                const scalar_t *ot = out + bm * d * HW + p0;
                const scalar_t *gt = dout + (dout_cl ? bm * d + (int64_t)p0 * ldg : bm * d * HW + p0);
                scalar_t *Pm = P + (int64_t)m * Ns * n, *dSm = dS + (int64_t)m * Ns * n, *dl = delta + (int64_t)m * n;
                /* delta = rowsum(dO * O) per query */
                for (int c = 0; c < n; c++) dl[c] = 0;
                if (dout_cl) {
                    for (int c = 0; c < n; c++)
                        for (int ch = 0; ch < d; ch++) dl[c] += gt[(int64_t)c * ldg + ch] * ot[(int64_t)ch * HW + c];
                } else {
                    for (int ch = 0; ch < d; ch++)
#pragma omp simd
                        for (int c = 0; c < n; c++) dl[c] += gt[(int64_t)ch * HW + c] * ot[(int64_t)ch * HW + c];
                }
                /* dO's tile (d x n) is stored transposed when dout_cl */
                NAME(mm)(gemm, dout_cl, 1, d, Ns, n, gt, ldg, Pm, n, 1, dv_acc + bm * d * Ns, Ns);
                NAME(mm)(gemm, 1, dout_cl, Ns, n, d, v + bm * d * Ns, Ns, gt, ldg, 0, dSm, n);
                if (!table)
                    for (int j = 0; j < Ns; j++) NAME(logit_grad)(dSm + (int64_t)j * n, Pm + (int64_t)j * n, dl, n);
            }
            /* with a table, dS per key and row while its bias gradient is taken */
            if (table) NAME(bias_grad)(&geo, bg, p0, n, dS, P, delta, dt, dc, scratch);
            for (int m = 0; m < Mg; m++) {
                int64_t bm = (int64_t)bg * Mg + m;
                scalar_t *dSm = dS + (int64_t)m * Ns * n;
                NAME(mm)(gemm, 0, 0, d, n, Ns, k + bm * d * Ns, Ns, dSm, n, 0, dq + bm * d * HW + p0, HW);
                NAME(mm)(gemm, 0, 1, d, Ns, n, q + bm * d * HW + p0, HW, dSm, n, 1, dk_acc + bm * d * Ns, Ns);
            }
        }
        if (blas_threads_fn) ((int (*)(int))blas_threads_fn)(previous);
        /* after the loop's barrier: every thread's sums are complete */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < acc_size; i++) {
            scalar_t s = 0;
            for (int t = 0; t < team; t++) s += work[(int64_t)t * per_thread + tile_size + i];
            if (i < kv_size) dk[i] = s;
            else if (i < 2 * kv_size) dv[i - kv_size] = s;
            else if (i < 2 * kv_size + table_size) dtable[i - 2 * kv_size] = s;
            else dcoord[i - 2 * kv_size - table_size] = s;
        }
    }
}
"""

@functools.lru_cache(maxsize=1)
def native_library() -> Optional[ctypes.CDLL]:
    """The compiled bias kernels, or ``None`` (see :mod:`.native`)."""
    return native.load('deformable_attention_bias', _C_KERNELS,
                       {'bias_forward': (7, 13), 'bias_backward': (9, 12),
                        'exp_shift': (2, 4), 'attention_forward': (12, 11),
                        'attention_backward': (18, 12), 'attention_tile_size': (0, 5, ctypes.c_int64)}, wide_vectors=True)


def _native_coords(pos, table, qy, qx):
    """The C kernels' table coordinates: ``lo_y``, ``fy`` ``(BG, Ns, H)`` and ``lo_x``, ``fx``
    ``(BG, Ns, W)`` (see :func:`_axis_coords`), the integer parts as int32."""
    Th, Tw = table.shape[-2:]
    lo_y, fy = _axis_coords(qy, pos[..., 0], Th)
    lo_x, fx = _axis_coords(qx, pos[..., 1], Tw)
    # far outside the table all corners are zero anyway; the clamp keeps int32 and the
    # kernels' bands small (monotone, so lo_x stays non-decreasing along W)
    return lo_y.clamp_(-2 * Th - 2, 3 * Th + 2).int(), fy, lo_x.clamp_(-2 * Tw - 2, 3 * Tw + 2).int(), fx


class _NativeBias:
    """The bias by the C kernels (CPU, float32 / float64): per call only the per-axis table
    coordinates are built (``(BG, Ns, H)`` and ``(BG, Ns, W)``), the rest is per tile in C."""

    def __init__(self, lib, pos: torch.Tensor, table: torch.Tensor, qy: torch.Tensor, qx: torch.Tensor,
                 groups: int):
        BG, Ns, _ = pos.shape
        M, Th, Tw = table.shape
        self.table = table.contiguous()
        self.forward_kernel = native.function(lib, 'bias_forward', table.dtype)
        self.backward_kernel = native.function(lib, 'bias_backward', table.dtype)
        self.exp_shift = native.function(lib, 'exp_shift', table.dtype)
        self.threads = torch.get_num_threads()
        self.lo_y, self.fy, self.lo_x, self.fx = _native_coords(pos, table, qy, qx)
        self.dims = [groups, M // groups, Ns, qy.numel(), qx.numel(), Th, Tw]
        self.dtable = self.dcoord = None

    def _args(self, g: slice, a: slice, *mode: int):
        return self.dims + [g.start, g.stop - g.start, a.start, a.stop - a.start, *mode, self.threads]

    def _ptrs(self, *tensors):
        return native.pointers(self.table, self.lo_y, self.fy, self.lo_x, self.fx, *tensors)

    def forward_tile(self, g, a, S, kt, qt, scratch):
        S3 = _flat(S)
        torch.bmm(kt.transpose(1, 2), qt, out=S3)
        m = S.new_empty(S3.shape[0], 1, S3.shape[2])
        self.forward_kernel(*self._ptrs(S, m), *self._args(g, a, 0))
        self.exp_shift(*native.pointers(S3, m), *S3.shape, self.threads)
        return m

    def probabilities(self, g, a, S, kt, qt, scratch):
        torch.bmm(kt.transpose(1, 2), qt, out=_flat(S))
        self.forward_kernel(*self._ptrs(S, S), *self._args(g, a, 1))  # no max: S stands in

    def backward(self, g, a, dS, P, saved):
        if self.dtable is None:
            self.dtable = dS.new_zeros(self.threads, *self.table.shape)  # one per thread
            self.dcoord = dS.new_zeros(self.fx.shape[0], self.dims[2], 2)
        self.backward_kernel(*self._ptrs(dS, P, self.dtable, self.dcoord), *self._args(g, a))

    def grads(self) -> Tuple[torch.Tensor, torch.Tensor]:
        Th, Tw = self.dims[5:7]
        return self.dcoord * self.dcoord.new_tensor([-(Th - 1) / 4, -(Tw - 1) / 4]), self.dtable.sum(0)


#: Use the C kernels on CPU when they build (tests switch this off to check the fallback).
USE_NATIVE = True
#: Of those, the whole attention in one kernel call per pass where PyTorch's BLAS is MKL.
USE_FUSED = True
#: Logits per tile of the fused kernels (all heads of a group): the tile's probabilities and
#: their gradient stay in a core's cache between the GEMMs and the softmax ...
FUSED_TILE_ELEMENTS = 1 << 19
#: ... but a tile has at least this many queries (the GEMMs' width): with many keys (DAT-T's
#: stage 3 attends to all 4200 positions at 800x1344) narrower tiles made the GEMMs slow.
FUSED_MIN_TILE_QUERIES = 96
#: The fused kernels' threads each keep tile buffers and gradient sums (8-10 MB per thread for
#: the DAT-T++ and DAT-T blocks at 800x1344); on many-core CPUs fewer threads run them rather
#: than the workspace growing past this.
FUSED_WORKSPACE_BYTES = 256 << 20


class _FusedAttention:
    """Both passes in one C call each (CPU, float32 / float64). The threads take (group, tile
    of consecutive queries) items; per item and head, the logits (keys x tile) by one GEMM, the
    bias, the softmax (backward: its gradient) in place, and the products with ``v`` (``dO``,
    ``dS``) by GEMMs, all while the tile is in a core's cache. The table coordinates are
    computed per key and tile, shared by its rows and the group's heads, rather than read from
    per-call ``(BG, Ns, W)`` tensors, which per tile would be as many bytes as its logits.
    With AVX-512, the bias's column loops take 16 columns at a time (see ``PERMUTE16``).
    One parallel region per pass."""

    def __init__(self, lib, blas: native.Blas, q, pos, table, qy, qx, groups: int, tile_elements: Optional[int]):
        self.lib, self.dtype = lib, q.dtype
        self.blas = [blas.gemm(q.dtype), blas.set_threads_local]
        Ns = pos.shape[1]
        self.BG, self.Mg = pos.shape[0], q.shape[0] // pos.shape[0]
        H, W = qy.numel(), qx.numel()
        if tile_elements is None:
            self.T = max(FUSED_TILE_ELEMENTS // (self.Mg * Ns), FUSED_MIN_TILE_QUERIES)
        else:
            self.T = max(tile_elements // (self.Mg * Ns), 1)
        # whole query rows where they come close (fewer row segments, and measured faster even
        # beyond the L2 budget), else whole vectors
        if W <= 2 * self.T:
            self.T = max(self.T - self.T % W, W)
        elif self.T > 16:
            self.T -= self.T % 16
        self.T = min(self.T, H * W)
        self.table = None if table is None else table.contiguous()
        self.geometry = [self.table, pos, qy.contiguous(), qx.contiguous()]
        Th, Tw = (0, 0) if table is None else table.shape[-2:]
        # per thread: the backward pass's tile buffers and bias scratch (see the C kernels'
        # ``work``; the forward pass needs less), then its gradient sums of k, v, table, positions
        self.tile_size = native.function(lib, 'attention_tile_size', q.dtype)(self.Mg, Ns, self.T, W, Tw)
        sums = 2 * q.shape[0] * q.shape[1] * Ns + (0 if table is None else table.numel() + 2 * self.BG * Ns)
        self.per_thread = self.tile_size + sums
        items = self.BG * -(-H * W // self.T)
        self.threads = max(1, min(torch.get_num_threads(), items,
                                  FUSED_WORKSPACE_BYTES // (self.per_thread * q.element_size())))
        self.dims = [groups, self.Mg, Ns, H, W, Th, Tw, self.T, self.threads]

    def forward(self, q, k, v):
        BM, d = q.shape[:2]
        out, lse = q.new_empty(q.shape), q.new_empty(BM, *q.shape[2:])
        work = native.workspace('deformable_attention', self.threads * self.tile_size, q.dtype)
        native.function(self.lib, 'attention_forward', self.dtype)(
            *self.blas, *native.pointers(q, k, v, *self.geometry, out, lse, work), BM, d, *self.dims)
        return out, lse

    def backward(self, q, k, v, out, lse, dout):
        BM, d = q.shape[:2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dtable = dcoord = None
        if self.table is not None:
            dtable, dcoord = torch.empty_like(self.table), q.new_empty(self.BG, self.dims[2], 2)
        work = native.workspace('deformable_attention', self.threads * self.per_thread, q.dtype)
        # the output projection's backward gives a batch of one's gradient channels-last: read as is
        H, W = q.shape[2:]
        channels_last = dout.stride() == (d, 1, W * BM * d, BM * d)
        if not channels_last:
            dout = dout.contiguous()
        native.function(self.lib, 'attention_backward', self.dtype)(
            *self.blas, *native.pointers(q, k, v, *self.geometry, out, lse, dout, dq, dk, dv, dtable, dcoord, work),
            BM, d, *self.dims[:-1], int(channels_last), self.dims[-1])
        if dcoord is not None:
            Th, Tw = self.dims[5:7]
            dcoord = dcoord * dcoord.new_tensor([-(Th - 1) / 4, -(Tw - 1) / 4])
        return dq, dk, dv, dcoord, dtable


def _fused(q, pos, table, qy, qx, groups, tile_elements) -> Optional[_FusedAttention]:
    """The fused kernels where they run: see :data:`USE_FUSED`."""
    if not (USE_NATIVE and USE_FUSED and q.device.type == 'cpu' and q.dtype in (torch.float32, torch.float64)
            and pos.dtype == qy.dtype == qx.dtype == q.dtype and (table is None or table.dtype == q.dtype)
            and torch.isfinite(pos).all()):
        return None
    lib, blas = native_library(), native.blas()
    if lib is None or blas is None:
        return None
    return _FusedAttention(lib, blas, q, pos, table, qy, qx, groups, tile_elements)


class _NoBias:
    """Tiles without a position bias."""

    def forward_tile(self, g, a, S, kt, qt, scratch):
        return _shifted_exp(torch.bmm(kt.transpose(1, 2), qt, out=_flat(S)))

    def probabilities(self, g, a, S, kt, qt, scratch):
        torch.bmm(kt.transpose(1, 2), qt, out=_flat(S)).exp_()

    def backward(self, g, a, dS, P, saved):
        dS.mul_(P)

    def grads(self):
        return None, None


def _flat(S: torch.Tensor) -> torch.Tensor:
    """A tile ``(n, Mg, Ns, A, W)`` as the batch of matrices ``(n*Mg, Ns, A*W)``."""
    n, Mg, Ns, A, W = S.shape
    return S.view(n * Mg, Ns, A * W)


def _shifted_exp(S3: torch.Tensor) -> torch.Tensor:
    """``S3 = exp(S3 - m)`` with ``m`` the max over the keys (dim 1); returns ``m``."""
    m = S3.amax(1, keepdim=True)
    S3.sub_(m).exp_()
    return m


def _make_bias(pos, table, qy, qx, groups):
    """The strategy for a call's tiles. Each has ``forward_tile`` (logits of ``kt^T qt`` plus
    bias into ``S``, then ``exp(S - max)``; returns the max), ``probabilities`` (``S =
    exp(kt^T qt + bias)``, the log-sum-exp riding on the operands; returns what ``backward``
    needs), ``backward`` (``dS *= P``, then the bias gradients) and ``grads``."""
    if table is None:
        return _NoBias()
    if USE_NATIVE and table.device.type == 'cpu' and table.dtype in (torch.float32, torch.float64) \
            and pos.dtype == qy.dtype == qx.dtype == table.dtype and torch.isfinite(pos).all():
        lib = native_library()
        if lib is not None:
            return _NativeBias(lib, pos, table, qy, qx, groups)
    return _TorchBias(pos, table, qy, qx, groups)


# ----------------------------------------------------------------------------- attention

def _default_tile(q: torch.Tensor, Ns: int) -> int:
    """Logits per tile of the tiled path: see :func:`deformable_attention`."""
    bound = DEFAULT_TILE_ELEMENTS.get(q.device.type, DEFAULT_TILE_ELEMENTS['cuda'])
    return min(bound, max(q.shape[0] * q.shape[2] * q.shape[3] * Ns // TILES_PER_CALL, MIN_TILE_ELEMENTS))


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


def _buffers(q: torch.Tensor, tiles, per_group_row: int, bias):
    """Two tile-sized scratch buffers, reused by all tiles (the second one twice the size
    for the PyTorch bias, whose gather writes complex numbers).

    On CPU they are views of a kept :func:`.native.workspace`: a DAT-T++ stage-1 block touched
    148 MB of fresh pages per training step with fresh buffers, 99 MB with the workspace. A
    call never runs inside another one on the same thread, and nothing is saved from these
    buffers for backward.
    """
    numel = max((g.stop - g.start) * (a.stop - a.start) for g, a in tiles) * per_group_row
    sizes = (numel, (2 if isinstance(bias, _TorchBias) else 1) * numel)
    if q.device.type != 'cpu':
        return q.new_empty(sizes[0]), q.new_empty(sizes[1])
    work = native.workspace('deformable_attention', sum(sizes), q.dtype)
    return work[:sizes[0]], work[sizes[0]:sum(sizes)]


class _DeformableAttentionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, pos, table, qy, qx, groups, tile_elements):
        # q (BM, d, H, W), k, v (BM, d, Ns), logits q . k; pos (BG, Ns, 2); table (M, Th, Tw) or None
        BM, d, H, W = q.shape
        Ns, BG = k.shape[-1], pos.shape[0]
        Mg = BM // BG
        ctx.groups, ctx.tile_elements = groups, tile_elements
        fused = ctx.fused = _fused(q, pos, table, qy, qx, groups, tile_elements)
        if fused is not None:
            out, lse = fused.forward(q, k, v)
            ctx.save_for_backward(q, k, v, pos, table, qy, qx, out, lse)
            return out
        bias = _make_bias(pos, table, qy, qx, groups)
        out = q.new_empty(BM, d, H, W)
        # the denominators and maxima per tile, the log-sum-exp from them at the end: a log
        # per tile, of a strided slice, was 9 parallel regions (each a wake-up of the workers)
        lse, mx = q.new_empty(BM, H, W), q.new_empty(BM, H, W)
        tiles = list(_tiles(BG, Mg * Ns * W, H, tile_elements or _default_tile(q, Ns)))
        buf, buf2 = _buffers(q, tiles, Mg * Ns * W, bias)
        qv, kv = q.view(BG, Mg, d, H, W), k.view(BG, Mg, d, Ns)
        # a row of ones under v: the AV product's last row is the softmax denominator
        vv = torch.cat([v, v.new_ones(BM, 1, Ns)], 1).view(BG, Mg, d + 1, Ns)
        for g, a in tiles:
            n, A = g.stop - g.start, a.stop - a.start
            S = buf[:n * Mg * Ns * A * W].view(n, Mg, Ns, A, W)
            qt = qv[g, :, :, a].reshape(n * Mg, d, A * W)
            kt = kv[g].reshape(n * Mg, d, Ns)
            m = bias.forward_tile(g, a, S, kt, qt, buf2)
            o = torch.bmm(vv[g].reshape(n * Mg, d + 1, Ns), _flat(S))
            l = o[:, d:]
            torch.div(o[:, :d].view(n, Mg, d, A, W), l.view(n, Mg, 1, A, W), out=out.view(BG, Mg, d, H, W)[g, :, :, a])
            lse.view(BG, Mg, H, W)[g, :, a] = l.view(n, Mg, A, W)
            mx.view(BG, Mg, H, W)[g, :, a] = m.view(n, Mg, A, W)
        lse.log_().add_(mx)
        ctx.save_for_backward(q, k, v, pos, table, qy, qx, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, pos, table, qy, qx, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grads = _backward(q, k, v, pos, table, qy, qx, out, lse, grad_out.to(q.dtype),
                              ctx.groups, ctx.tile_elements, ctx.fused)
        return grads + (None,) * 4


def _backward(q, k, v, pos, table, qy, qx, out, lse, dout, groups, tile_elements, fused):
    """``fused``: the forward pass's :class:`_FusedAttention`, or ``None`` (it was tiled)."""
    BM, d, H, W = q.shape
    Ns, BG = k.shape[-1], pos.shape[0]
    Mg = BM // BG
    if fused is not None:
        return fused.backward(q, k, v, out, lse, dout)
    bias = _make_bias(pos, table, qy, qx, groups)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # Augmented operands fold the two per-query subtractions into the matmuls:
    # [k; 1]^T [q; -lse] = S_qk - lse and [v; 1]^T [dO; -D] = dP - D with D = rowsum(dO * O).
    ones = k.new_ones(BM, 1, Ns)
    ka = torch.cat([k, ones], 1).view(BG, Mg, d + 1, Ns)
    va = torch.cat([v, ones], 1).view(BG, Mg, d + 1, Ns)
    qa = torch.cat([q.view(BM, d, H * W), -lse.view(BM, 1, H * W)], 1).view(BG, Mg, d + 1, H, W)
    # dout may come in any layout (the output projection's backward gives it channels-last):
    # the one copy is into doa
    doa = q.new_empty(BM, d + 1, H, W)
    doa[:, :d].copy_(dout)
    torch.sum(doa[:, :d] * out, 1, out=doa[:, d]).neg_()
    doa = doa.view(BG, Mg, d + 1, H, W)
    tiles = list(_tiles(BG, Mg * Ns * W, H, tile_elements or _default_tile(q, Ns)))
    buf, buf2 = _buffers(q, tiles, Mg * Ns * W, bias)
    dkv, dvv = dk.view(BG, Mg, d, Ns), dv.view(BG, Mg, d, Ns)
    for g, a in tiles:
        n, A = g.stop - g.start, a.stop - a.start
        size = n * Mg * Ns * A * W
        S = buf[:size].view(n, Mg, Ns, A, W)
        qt = qa[g, :, :, a].reshape(n * Mg, d + 1, A * W)
        kt = ka[g].reshape(n * Mg, d + 1, Ns)
        dot = doa[g, :, :, a].reshape(n * Mg, d + 1, A * W)
        saved = bias.probabilities(g, a, S, kt, qt, buf2)
        dvv[g].view(n * Mg, d, Ns).baddbmm_(dot[:, :d], _flat(S).transpose(1, 2))
        dS = buf2[:size].view(n * Mg, Ns, A * W)
        torch.bmm(va[g].reshape(n * Mg, d + 1, Ns).transpose(1, 2), dot, out=dS)
        bias.backward(g, a, dS.view(n, Mg, Ns, A, W), S, saved)
        dq.view(BG, Mg, d, H, W)[g, :, :, a] = torch.bmm(kt[:, :d], dS).view(n, Mg, d, A, W)
        dkv[g].view(n * Mg, d, Ns).baddbmm_(qt[:, :d], dS.transpose(1, 2))
    dpos, dtable = bias.grads()
    return dq, dk, dv, dpos, dtable


def deformable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                         table: Optional[torch.Tensor], qy: torch.Tensor, qx: torch.Tensor, groups: int,
                         tile_elements: Optional[int] = None) -> torch.Tensor:
    """Tiled deformable attention with bilinear relative-position bias, fwd and bwd.

    Args:
        q: ``(B*M, d, H, W)`` queries.
        k, v: ``(B*M, d, Ns)`` keys and values. The logits are ``q . k``: the caller folds
            the attention scale into either (``k``, ``Ns`` long, is the cheaper one).
        pos: ``(B*G, Ns, 2)`` normalised ``(y, x)`` key positions.
        table: ``(M, Th, Tw)`` relative position table, or ``None`` for no bias.
        qy, qx: ``H`` and ``W`` normalised query grid coordinates.
        groups: ``G``; heads ``[g*M/G, (g+1)*M/G)`` use group ``g``'s positions.
        tile_elements: Logits per tile; default: ``FUSED_TILE_ELEMENTS`` for the fused CPU
            kernels, otherwise about 1 / ``TILES_PER_CALL`` of all, at least
            ``MIN_TILE_ELEMENTS``, at most ``DEFAULT_TILE_ELEMENTS[device]``.
    Returns:
        ``(B*M, d, H, W)`` attention output (before the output projection) in ``q``'s dtype;
        float32 under autocast. Half-precision inputs are computed in float32.
    """
    BM, d = q.shape[:2]
    BG, Ns = pos.shape[:2]
    if (k.shape != (BM, d, Ns) or v.shape != k.shape or pos.shape[2:] != (2,) or BG % groups or BM % BG
            or (table is not None and table.shape[0] != BM // (BG // groups))):
        raise ValueError(f'inconsistent shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, '
                         f'pos {tuple(pos.shape)}, table {None if table is None else tuple(table.shape)}, '
                         f'groups {groups}')
    return in_full_precision(_apply, (q, k, v, pos, table, qy, qx), groups, tile_elements)


def _apply(q, k, v, pos, table, qy, qx, groups, tile_elements):
    return _DeformableAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), pos.contiguous(),
                                              table, qy, qx, groups, tile_elements)
