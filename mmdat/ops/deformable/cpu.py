"""Deformable attention on CPU: the ops ``mmdat::deformable_attention_forward`` and
``mmdat::deformable_attention_backward``.

Both compute, tile by tile, the function of :func:`.reference.deformable_attention` without
materialising the ``(B*M) x HW x Ns`` logits, the bias or the displacement grid (see
docs/kernels.md). Three implementations inside the ops, same numbers:

* with PyTorch's MKL, the fused C kernels of ``csrc/deformable_attention.c``
  (:class:`_FusedAttention`): one parallel region per pass;
* otherwise tiles with PyTorch matmuls and the bias in C (:class:`_NativeBias`);
* without a C compiler (or with ``MMDAT_NATIVE_OPS=0``), for non-finite positions, or on
  other devices, the same tiles with the bias by PyTorch gathers and scatters
  (:class:`_TorchBias`).

:func:`mmdat.ops.config.deformable_cpu_strategy` caps which of them may run (``'fused'``,
``'native-bias'``, ``'torch-bias'``), to check them against each other.

Semantics are those of ``F.grid_sample(table, (q - p) / 2, mode='bilinear',
padding_mode='zeros', align_corners=True)``: table cells outside the table are zero at any
distance, and gradients w.r.t. the positions are corner differences, as grid_sample's.
The ops take float32 or float64; :func:`deformable_attention` casts other inputs.
"""
import ctypes
import math
from typing import List, Optional, Tuple

import torch

from .. import build
from ..config import deformable_cpu_allows, in_full_precision

#: The C kernels (built on first use, see :mod:`mmdat.ops.build`).
native_library = build.Library(
    'deformable_attention', ['deformable_attention.c'],
    {'bias_forward': (7, 13), 'bias_backward': (9, 12), 'exp_shift': (2, 4), 'attention_forward': (12, 11),
     'attention_backward': (18, 12), 'attention_tile_size': (0, 5, ctypes.c_int64)}, wide_vectors=True)
LIBRARIES = (native_library, )

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

    The coordinate span over the ``n`` queries of an axis (increasing) is the same for every
    key; one cell of slack covers rounding. Off the CPU, where reading ``qc`` would be a host
    sync, the span is its bound for coordinates in [-1, 1] (a band at most one cell wider).
    """
    if qc.numel() < 2:
        span = 0.
    elif qc.device.type == 'cpu':
        span = (float(qc[-1]) - float(qc[0])) * 0.5 * (size - 1) / 2
    else:
        span = (size - 1) / 2
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
        return dpos, dtab.reshape(self.G * self.Mg, self.Th + 2, self.Wp)[:, 1:-1, P:P + self.Tw].contiguous()


# ----------------------------------------------------------------------------- C kernels

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
        self.forward_kernel = build.function(lib, 'bias_forward', table.dtype)
        self.backward_kernel = build.function(lib, 'bias_backward', table.dtype)
        self.exp_shift = build.function(lib, 'exp_shift', table.dtype)
        self.threads = torch.get_num_threads()
        self.lo_y, self.fy, self.lo_x, self.fx = _native_coords(pos, table, qy, qx)
        self.dims = [groups, M // groups, Ns, qy.numel(), qx.numel(), Th, Tw]
        self.dtable = self.dcoord = None

    def _args(self, g: slice, a: slice, *mode: int):
        return self.dims + [g.start, g.stop - g.start, a.start, a.stop - a.start, *mode, self.threads]

    def _ptrs(self, *tensors):
        return build.pointers(self.table, self.lo_y, self.fy, self.lo_x, self.fx, *tensors)

    def forward_tile(self, g, a, S, kt, qt, scratch):
        S3 = _flat(S)
        torch.bmm(kt.transpose(1, 2), qt, out=S3)
        m = S.new_empty(S3.shape[0], 1, S3.shape[2])
        self.forward_kernel(*self._ptrs(S, m), *self._args(g, a, 0))
        self.exp_shift(*build.pointers(S3, m), *S3.shape, self.threads)
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

    def __init__(self, lib, blas: build.Blas, q, pos, table, qy, qx, groups: int, tile_elements: Optional[int]):
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
        self.tile_size = build.function(lib, 'attention_tile_size', q.dtype)(self.Mg, Ns, self.T, W, Tw)
        sums = 2 * q.shape[0] * q.shape[1] * Ns + (0 if table is None else table.numel() + 2 * self.BG * Ns)
        self.per_thread = self.tile_size + sums
        items = self.BG * -(-H * W // self.T)
        self.threads = max(1, min(torch.get_num_threads(), items,
                                  FUSED_WORKSPACE_BYTES // (self.per_thread * q.element_size())))
        self.dims = [groups, self.Mg, Ns, H, W, Th, Tw, self.T, self.threads]

    def forward(self, q, k, v):
        BM, d = q.shape[:2]
        out, lse = q.new_empty(q.shape), q.new_empty(BM, *q.shape[2:])
        work = build.workspace('deformable_attention', self.threads * self.tile_size, q.dtype)
        build.function(self.lib, 'attention_forward', self.dtype)(
            *self.blas, *build.pointers(q, k, v, *self.geometry, out, lse, work), BM, d, *self.dims)
        return out, lse

    def backward(self, q, k, v, out, lse, dout):
        BM, d = q.shape[:2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dtable = dcoord = None
        if self.table is not None:
            dtable, dcoord = torch.empty_like(self.table), q.new_empty(self.BG, self.dims[2], 2)
        work = build.workspace('deformable_attention', self.threads * self.per_thread, q.dtype)
        # the output projection's backward gives a batch of one's gradient channels-last: read as is
        H, W = q.shape[2:]
        channels_last = dout.stride() == (d, 1, W * BM * d, BM * d)
        if not channels_last:
            dout = dout.contiguous()
        build.function(self.lib, 'attention_backward', self.dtype)(
            *self.blas, *build.pointers(q, k, v, *self.geometry, out, lse, dout, dq, dk, dv, dtable, dcoord, work),
            BM, d, *self.dims[:-1], int(channels_last), self.dims[-1])
        if dcoord is not None:
            Th, Tw = self.dims[5:7]
            dcoord = dcoord * dcoord.new_tensor([-(Th - 1) / 4, -(Tw - 1) / 4])
        return dq, dk, dv, dcoord, dtable


def _fused(q, pos, table, qy, qx, groups, tile_elements) -> Optional[_FusedAttention]:
    """The fused kernels where they run (and :func:`.config.deformable_cpu_allows` them)."""
    if not (deformable_cpu_allows('fused') and q.device.type == 'cpu' and q.dtype in (torch.float32, torch.float64)
            and pos.dtype == qy.dtype == qx.dtype == q.dtype and (table is None or table.dtype == q.dtype)
            and torch.isfinite(pos).all()):
        return None
    lib, blas = native_library(), build.blas()
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
    if (deformable_cpu_allows('native-bias') and table.device.type == 'cpu'
            and table.dtype in (torch.float32, torch.float64) and pos.dtype == qy.dtype == qx.dtype == table.dtype
            and torch.isfinite(pos).all()):
        lib = native_library()
        if lib is not None:
            return _NativeBias(lib, pos, table, qy, qx, groups)
    return _TorchBias(pos, table, qy, qx, groups)


# ----------------------------------------------------------------------------- tiles

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

    On CPU they are views of a kept :func:`..build.workspace`: a DAT-T++ stage-1 block touched
    148 MB of fresh pages per training step with fresh buffers, 99 MB with the workspace. A
    call never runs inside another one on the same thread, and nothing is saved from these
    buffers for backward.
    """
    numel = max((g.stop - g.start) * (a.stop - a.start) for g, a in tiles) * per_group_row
    sizes = (numel, (2 if isinstance(bias, _TorchBias) else 1) * numel)
    if q.device.type != 'cpu':
        return q.new_empty(sizes[0]), q.new_empty(sizes[1])
    work = build.workspace('deformable_attention', sum(sizes), q.dtype)
    return work[:sizes[0]], work[sizes[0]:sum(sizes)]


def _forward(q, k, v, pos, table, qy, qx, groups: int, tile_elements: Optional[int]):
    """Output and log-sum-exp; operands as :func:`deformable_attention_forward`'s, contiguous."""
    BM, d, H, W = q.shape
    Ns, BG = k.shape[-1], pos.shape[0]
    Mg = BM // BG
    fused = _fused(q, pos, table, qy, qx, groups, tile_elements)
    if fused is not None:
        return fused.forward(q, k, v)
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
        denom = o[:, d:]
        torch.div(o[:, :d].view(n, Mg, d, A, W), denom.view(n, Mg, 1, A, W), out=out.view(BG, Mg, d, H, W)[g, :, :, a])
        lse.view(BG, Mg, H, W)[g, :, a] = denom.view(n, Mg, A, W)
        mx.view(BG, Mg, H, W)[g, :, a] = m.view(n, Mg, A, W)
    lse.log_().add_(mx)
    return out, lse


def _backward(q, k, v, pos, table, qy, qx, out, lse, dout, groups: int, tile_elements: Optional[int]):
    """``dq, dk, dv, dpos, dtable`` (the last two ``None`` without a table); operands
    contiguous but ``dout`` (in any layout: the fused kernels read a batch of one's
    channels-last gradient in place, the tiles copy it once)."""
    BM, d, H, W = q.shape
    Ns, BG = k.shape[-1], pos.shape[0]
    Mg = BM // BG
    fused = _fused(q, pos, table, qy, qx, groups, tile_elements)
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


# ----------------------------------------------------------------------------- the ops

def _check_operands(name: str, tensors: List[Optional[torch.Tensor]]):
    dtypes = {t.dtype for t in tensors if t is not None}
    if not (dtypes == {torch.float32} or dtypes == {torch.float64}):
        raise TypeError(f'mmdat::{name} takes float32 or float64 operands of one dtype (deformable_attention() '
                        f'casts others), got {sorted(str(d) for d in dtypes)}')


@torch.library.custom_op('mmdat::deformable_attention_forward', mutates_args=())
def deformable_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                                 table: Optional[torch.Tensor], qy: torch.Tensor, qx: torch.Tensor, groups: int,
                                 tile_elements: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``(B*M, d, H, W)`` and its log-sum-exp ``(B*M, H, W)``; operands as
    :func:`deformable_attention`'s (float32 or float64, one dtype)."""
    _check_operands('deformable_attention_forward', [q, k, v, pos, table, qy, qx])
    return _forward(q.contiguous(), k.contiguous(), v.contiguous(), pos.contiguous(),
                    None if table is None else table.contiguous(), qy.contiguous(), qx.contiguous(),
                    groups, tile_elements)


@deformable_attention_forward.register_fake
def _(q, k, v, pos, table, qy, qx, groups, tile_elements=None):
    BM, d, H, W = q.shape
    return q.new_empty(BM, d, H, W), q.new_empty(BM, H, W)


@torch.library.custom_op('mmdat::deformable_attention_backward', mutates_args=())
def deformable_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  pos: torch.Tensor, table: Optional[torch.Tensor], qy: torch.Tensor,
                                  qx: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, groups: int,
                                  tile_elements: Optional[int] = None
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``q, k, v, pos, table`` of :func:`deformable_attention_forward`'s output
    given ``grad_out``, from its ``out`` and ``lse``. Without a table the position gradient is
    zero and the table's is an empty tensor."""
    _check_operands('deformable_attention_backward', [grad_out, q, k, v, pos, table, qy, qx, out, lse])
    dq, dk, dv, dpos, dtable = _backward(
        q.contiguous(), k.contiguous(), v.contiguous(), pos.contiguous(),
        None if table is None else table.contiguous(), qy.contiguous(), qx.contiguous(), out.contiguous(),
        lse.contiguous(), grad_out, groups, tile_elements)
    if table is None:
        dpos, dtable = pos.new_zeros(pos.shape), q.new_empty(0)
    return dq, dk, dv, dpos, dtable


@deformable_attention_backward.register_fake
def _(grad_out, q, k, v, pos, table, qy, qx, out, lse, groups, tile_elements=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), pos.new_empty(pos.shape),
            q.new_empty(0) if table is None else table.new_empty(table.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, pos, table, qy, qx, groups, tile_elements = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, pos, table, qy, qx, out, lse)
    ctx.groups, ctx.tile_elements = groups, tile_elements


def _autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, pos, table, qy, qx, out, lse = ctx.saved_tensors
    dq, dk, dv, dpos, dtable = deformable_attention_backward(
        grad_out.to(q.dtype), q, k, v, pos, table, qy, qx, out, lse, ctx.groups, ctx.tile_elements)
    if table is None:  # no bias: the positions get no gradient here
        return dq, dk, dv, None, None, None, None, None, None
    return dq, dk, dv, dpos, dtable, None, None, None, None


deformable_attention_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def deformable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                         table: Optional[torch.Tensor], qy: torch.Tensor, qx: torch.Tensor, groups: int,
                         tile_elements: Optional[int] = None) -> torch.Tensor:
    """Deformable attention with the bilinear relative-position bias, by the op
    ``mmdat::deformable_attention_forward`` (and its registered backward).

    Args:
        q: ``(B*M, d, H, W)`` queries.
        k, v: ``(B*M, d, Ns)`` keys and values. The logits are ``q . k``: the caller folds
            the attention scale into either (``k``, ``Ns`` long, is the cheaper one).
        pos: ``(B*G, Ns, 2)`` normalised ``(y, x)`` key positions.
        table: ``(M, Th, Tw)`` relative position table, or ``None`` for no bias.
        qy, qx: ``H`` and ``W`` normalised query grid coordinates, increasing, in [-1, 1].
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
    if (q.dim() != 4 or k.shape != (BM, d, Ns) or v.shape != k.shape or pos.shape[2:] != (2, ) or BG % groups
            or BM % BG or (table is not None and (table.dim() != 3 or table.shape[0] != BM // (BG // groups)))
            or qy.shape != (q.shape[2], ) or qx.shape != (q.shape[3], )):
        raise ValueError(f'inconsistent shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, '
                         f'pos {tuple(pos.shape)}, table {None if table is None else tuple(table.shape)}, '
                         f'qy {tuple(qy.shape)}, qx {tuple(qx.shape)}, groups {groups}')
    return in_full_precision(_apply, (q, k, v, pos, table, qy, qx), groups, tile_elements)


def _apply(q, k, v, pos, table, qy, qx, groups, tile_elements):
    return deformable_attention_forward(q, k, v, pos, table, qy, qx, groups, tile_elements)[0]
