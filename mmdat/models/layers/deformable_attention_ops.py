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

Two implementations of the bias, same numbers: on CPU a small C kernel (see :mod:`.native`:
compiled on first use; ``MMDAT_NATIVE_OPS=0`` disables it), otherwise (CUDA, no compiler)
PyTorch gathers and scatters.

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
static inline scalar_t NAME(cell)(const scalar_t *t, int Th, int Tw, int y, int x) {
    return (y >= 0 && y < Th && x >= 0 && x < Tw) ? t[(int64_t)y * Tw + x] : (scalar_t)0;
}

/* R[x] = table row y0 + fy * (row y0+1 - row y0), x over the key's band of columns */
static inline void NAME(rows)(const scalar_t *t, int Th, int Tw, int y0, scalar_t w, int xs, int bx,
                              scalar_t *R, scalar_t *D) {
    for (int x = 0; x < bx; x++) {
        scalar_t t0 = NAME(cell)(t, Th, Tw, y0, xs + x), t1 = NAME(cell)(t, Th, Tw, y0 + 1, xs + x);
        R[x] = t0 + w * (t1 - t0);
        if (D) D[x] = t1 - t0;
    }
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
            int xs = lx[0], bx = lx[W - 1] - xs + 2;  /* lo_x is non-decreasing along W */
            if (2 * (int64_t)bx > capacity) {
                capacity = 2 * (int64_t)bx;
                R = (scalar_t *)realloc(R, sizeof(scalar_t) * (size_t)capacity);
            }
            scalar_t *Rd = R + bx;
            for (int a = 0; a < A; a++) {
                int64_t yi = ((int64_t)bg * Ns + j) * H + a0 + a;
                for (int m = 0; m < Mg; m++) {
                    const scalar_t *t = table + (int64_t)((bg % G) * Mg + m) * Th * Tw;
                    NAME(rows)(t, Th, Tw, lo_y[yi], fy[yi], xs, bx, R, NULL);
                    for (int x = 0; x + 1 < bx; x++) Rd[x] = R[x + 1] - R[x];
                    scalar_t *o = S + ((((int64_t)bgl * Mg + m) * Ns + j) * A + a) * W;
                    for (int b = 0; b < W; b++) {
                        int i = lx[b] - xs;
                        o[b] += R[i] + wx[b] * Rd[i];
                    }
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
        int *seg = NULL;
        int64_t capacity = 0;
        scalar_t *dt = dtable + (int64_t)omp_get_thread_num() * M * Th * Tw;
#pragma omp for schedule(static)
        for (int64_t gj = 0; gj < (int64_t)n * Ns; gj++) {
            int bgl = (int)(gj / Ns), j = (int)(gj % Ns), bg = g0 + bgl;
            const int32_t *lx = lo_x + ((int64_t)bg * Ns + j) * W;
            const scalar_t *wx = fx + ((int64_t)bg * Ns + j) * W;
            int xs = lx[0], bx = lx[W - 1] - xs + 2;
            if (4 * (int64_t)bx > capacity) {
                capacity = 4 * (int64_t)bx;
                buf = (scalar_t *)realloc(buf, sizeof(scalar_t) * (size_t)capacity);
                seg = (int *)realloc(seg, sizeof(int) * (size_t)(capacity + 1));
            }
            scalar_t *Eu = buf, *E1 = buf + bx, *R = buf + 2 * bx, *D = buf + 3 * bx;
            /* the query columns whose first corner is band cell i are [seg[i], seg[i + 1]):
               lo_x is non-decreasing, so the sums below run in registers, not through memory */
            for (int i = 0, b = 0; i <= bx; i++) {
                while (b < W && lx[b] - xs < i) b++;
                seg[i] = b;
            }
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
                    /* bias[b] = (1 - fx) R[i] + fx R[i + 1], i = lo_x[b] - xs */
                    for (int i = 0; i < bx; i++) {
                        scalar_t su = 0, s1 = 0;
                        for (int b = seg[i]; b < seg[i + 1]; b++) {
                            su += g[b];
                            s1 += g[b] * wx[b];
                        }
                        Eu[i] = su;
                        E1[i] = s1;
                    }
                    NAME(rows)(table + head * Th * Tw, Th, Tw, y0, w, xs, bx, R, D);
                    scalar_t *d = dt + head * Th * Tw;
                    for (int x = 0; x < bx; x++) {
                        if (x + 1 < bx) gx += Eu[x] * (R[x + 1] - R[x]);
                        scalar_t dr = Eu[x] - E1[x] + (x > 0 ? E1[x - 1] : (scalar_t)0);
                        gy += dr * D[x];
                        int xx = xs + x;
                        if (xx < 0 || xx >= Tw) continue;
                        if (y0 >= 0 && y0 < Th) d[(int64_t)y0 * Tw + xx] += dr - dr * w;
                        if (y0 + 1 >= 0 && y0 + 1 < Th) d[(int64_t)(y0 + 1) * Tw + xx] += dr * w;
                    }
                }
            }
            dcoord[((int64_t)bg * Ns + j) * 2] += gy;
            dcoord[((int64_t)bg * Ns + j) * 2 + 1] += gx;
        }
        free(buf);
        free(seg);
    }
}
"""

@functools.lru_cache(maxsize=1)
def native_library() -> Optional[ctypes.CDLL]:
    """The compiled bias kernels, or ``None`` (see :mod:`.native`)."""
    return native.load('deformable_attention_bias', _C_KERNELS,
                       {'bias_forward': (7, 13), 'bias_backward': (9, 12),
                        'exp_shift': (2, 4)})


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
        lo_y, self.fy = _axis_coords(qy, pos[..., 0], Th)
        lo_x, self.fx = _axis_coords(qx, pos[..., 1], Tw)
        # far outside the table all corners are zero anyway; the clamp keeps int32 and the
        # kernels' bands small (monotone, so lo_x stays non-decreasing along W)
        self.lo_y = lo_y.clamp_(-2 * Th - 2, 3 * Th + 2).int()
        self.lo_x = lo_x.clamp_(-2 * Tw - 2, 3 * Tw + 2).int()
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
        bias = _make_bias(pos, table, qy, qx, groups)
        out = q.new_empty(BM, d, H, W)
        # the denominators and maxima per tile, the log-sum-exp from them at the end: a log
        # per tile, of a strided slice, was 9 parallel regions (each a wake-up of the workers)
        lse, mx = q.new_empty(BM, H, W), q.new_empty(BM, H, W)
        tiles = list(_tiles(BG, Mg * Ns * W, H, tile_elements))
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
        ctx.groups, ctx.tile_elements = groups, tile_elements
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, pos, table, qy, qx, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grads = _backward(q, k, v, pos, table, qy, qx, out, lse, grad_out.to(q.dtype),
                              ctx.groups, ctx.tile_elements)
        return grads + (None,) * 4


def _backward(q, k, v, pos, table, qy, qx, out, lse, dout, groups, tile_elements):
    BM, d, H, W = q.shape
    Ns, BG = k.shape[-1], pos.shape[0]
    Mg = BM // BG
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
    tiles = list(_tiles(BG, Mg * Ns * W, H, tile_elements))
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
        tile_elements: Logits per tile; default: about 1 / ``TILES_PER_CALL`` of all, at
            least ``MIN_TILE_ELEMENTS``, at most ``DEFAULT_TILE_ELEMENTS[device]``.
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
    if tile_elements is None:
        bound = DEFAULT_TILE_ELEMENTS.get(q.device.type, DEFAULT_TILE_ELEMENTS['cuda'])
        tile_elements = min(bound, max(BM * q.shape[2] * q.shape[3] * Ns // TILES_PER_CALL, MIN_TILE_ELEMENTS))
    return in_full_precision(_apply, (q, k, v, pos, table, qy, qx), groups, tile_elements)


def _apply(q, k, v, pos, table, qy, qx, groups, tile_elements):
    return _DeformableAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), pos.contiguous(),
                                              table, qy, qx, groups, tile_elements)
