"""CPU kernels in C, compiled on first use and loaded with ctypes.

Each kernel source is written once over ``scalar_t`` and compiled for ``float`` (suffix
``_f32``) and ``double`` (``_f64``); ``EXP``, ``LOG`` and ``ERF`` are the matching exponential
(``exp_f32`` below for float), libm logarithm and error function (``erf_f32`` for float);
``ERF_GIVEN_EXP(x, e)`` is ``erf(x)`` given ``e = exp(-x * x)`` (float reuses ``e``);
``FLOAT32`` is 1 for the float build (for code written with float vector intrinsics);
``NAME(gemm)`` is a small register-blocked matrix product (see ``_GEMM``). A
library is built once per source, compiler and CPU with the system's C compiler (OpenMP when
available, about a second) into ``$MMDAT_CACHE_DIR`` (default ``~/.cache/mmdat``).
``MMDAT_NATIVE_OPS=0`` disables every kernel; callers then use their PyTorch paths.
"""
import ctypes
import functools
import hashlib
import math
import os
import os.path as osp
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

_HEADER = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif
#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define NAME(f) CAT(f, SUFFIX)
static inline int clamp_int(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }
/* exp in float32 that compilers vectorize (libm's expf is a call per element): Cephes'
   range reduction and polynomial, about 1 ulp; inputs are clamped to [-87.3, 88.3], so
   the far tail of a softmax is 1e-38 instead of a denormal. */
static inline float exp_f32(float x) {
    x = x > 88.37626f ? 88.37626f : (x < -87.33654f ? -87.33654f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}
/* erf in float32 that compilers vectorize: Abramowitz & Stegun 7.1.26 (absolute error below
   1.5e-7), the formula of PyTorch's own vectorized erf. The _given_exp forms take
   e = exp(-x * x), which GELU's gradient needs as well. */
static inline float erf_given_exp_f32(float x, float e) {
    float ax = fabsf(x), t = 1.0f / (1.0f + 0.3275911f * ax);
    float p = 1.061405429f;
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    float r = 1.0f - p * t * e;
    return x < 0 ? -r : r;
}
static inline float erf_f32(float x) { return erf_given_exp_f32(x, exp_f32(-x * x)); }
static inline double erf_given_exp_f64(double x, double e) { (void)e; return erf(x); }
"""

#: C (+)= A B for the small products inside attention windows (tens of rows and columns),
#: where calling a BLAS per window costs more than the arithmetic. Blocks of 4 rows x one
#: 64-byte vector of columns stay in registers over the whole inner dimension; GCC's vector
#: type makes that one zmm register with AVX-512 (its auto-vectorizer would pick ymm) and
#: two or four narrower ones elsewhere. A is read through strides, so A^T costs nothing.
_GEMM = r"""
typedef scalar_t NAME(vec) __attribute__((vector_size(64)));
typedef scalar_t NAME(uvec) __attribute__((vector_size(64), aligned(sizeof(scalar_t))));

/* C (M x N, row stride ldc) = A B, or += with accumulate; A's element (r, k) is
   A[r * ars + k * aks]; B is K x N with row stride ldb. */
static void NAME(gemm)(int M, int N, int K, const scalar_t *A, int64_t ars, int64_t aks, const scalar_t *B,
                       int64_t ldb, scalar_t *C, int64_t ldc, int accumulate) {
    enum { VB = 64 / (int)sizeof(scalar_t), RB = 4 };
    int i = 0;
    for (; i + RB <= M; i += RB) {
        int j = 0;
        for (; j + VB <= N; j += VB) {
            NAME(vec) acc[RB];
            for (int r = 0; r < RB; r++)
                acc[r] = accumulate ? (NAME(vec))*(const NAME(uvec) *)(C + (i + r) * ldc + j) : (NAME(vec)){0};
            const scalar_t *a = A + i * ars;
            for (int k = 0; k < K; k++, a += aks) {
                NAME(vec) b = *(const NAME(uvec) *)(B + k * ldb + j);
#pragma GCC unroll 4
                for (int r = 0; r < RB; r++) acc[r] += a[r * ars] * b;
            }
            for (int r = 0; r < RB; r++) *(NAME(uvec) *)(C + (i + r) * ldc + j) = acc[r];
        }
        for (; j < N; j++)
            for (int r = i; r < i + RB; r++) {
                scalar_t s = accumulate ? C[r * ldc + j] : 0;
                for (int k = 0; k < K; k++) s += A[r * ars + k * aks] * B[k * ldb + j];
                C[r * ldc + j] = s;
            }
    }
    for (; i < M; i++)
        for (int j = 0; j < N; j++) {
            scalar_t s = accumulate ? C[i * ldc + j] : 0;
            for (int k = 0; k < K; k++) s += A[i * ars + k * aks] * B[k * ldb + j];
            C[i * ldc + j] = s;
        }
}
"""

_TYPES = (('float', 'f32', 'exp_f32', 'logf', 'erf_f32', 'erf_given_exp_f32'),
          ('double', 'f64', 'exp', 'log', 'erf', 'erf_given_exp_f64'))

#: Compiler flags to try, best first. PyTorch's own: without -fno-trapping-math GCC does not
#: vectorize floorf, hence exp_f32 and every softmax loop.
_MATH = ('-fno-trapping-math', '-fno-math-errno')
_FLAGS = (('-O3', '-march=native', '-fopenmp', *_MATH), ('-O3', '-fopenmp', *_MATH), ('-O3', *_MATH))
#: Tried first by ``load(..., wide_vectors=True)``: GCC's auto-vectorizer uses 256-bit vectors on
#: AVX-512 CPUs unless told otherwise; fails on other architectures (then ``_FLAGS``).
_WIDE_FLAGS = ('-O3', '-march=native', '-mprefer-vector-width=512', '-fopenmp', *_MATH)


def enabled() -> bool:
    return os.environ.get('MMDAT_NATIVE_OPS', '1') != '0'


def usable(x: torch.Tensor, library: Callable[[], Optional[ctypes.CDLL]]) -> bool:
    """Whether a kernel of ``library()`` (a module's cached loader) can run on ``x``: on CPU,
    outside jit tracing and scripting (FLOP counters trace the PyTorch ops), once built."""
    return (x.device.type == 'cpu' and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and library() is not None)


def function(lib: ctypes.CDLL, name: str, dtype: torch.dtype):
    """Kernel ``name`` compiled for ``dtype`` (``torch.float32`` or ``torch.float64``)."""
    return getattr(lib, f'{name}_{"f32" if dtype == torch.float32 else "f64"}')


def pointers(*tensors: Optional[torch.Tensor]) -> List[Optional[int]]:
    """The tensors' data pointers for a kernel call; ``None`` (a NULL pointer) for ``None``."""
    return [None if t is None else t.data_ptr() for t in tensors]


_workspaces = threading.local()


def workspace(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU scratch tensor of at least ``numel`` elements, kept between calls per thread,
    ``name`` and dtype, and grown when needed.

    Fresh buffers of tens of MB come from the OS on every call, page by page (glibc maps
    blocks above 32 MB anew each time), which on a busy CPU costs as much as the arithmetic
    around them. Callers use the buffer within one call and return nothing that views it.
    """
    cache = _workspaces.__dict__.setdefault('tensors', {})
    work = cache.get((name, dtype))
    if work is None or work.numel() < numel:
        cache[(name, dtype)] = None  # free the old one before allocating the larger one
        with torch.inference_mode(False):  # usable in and out of inference mode
            work = cache[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return work


def workspace_views(name: str, shape: Tuple[int, ...], dtype: torch.dtype, count: int,
                    spare: int = 0) -> List[torch.Tensor]:
    """``count`` contiguous tensors of ``shape`` laid end to end in :func:`workspace` ``name``,
    followed by ``spare`` more elements (for kernels whose vector loads may run past the end)."""
    numel = math.prod(shape)
    work = workspace(name, count * numel + spare, dtype)
    return [work[i * numel:(i + 1) * numel].view(shape) for i in range(count)]


class Blas(NamedTuple):
    """Addresses of the BLAS PyTorch links, for kernels that run whole GEMMs inside their own
    parallel regions: Fortran ``sgemm_`` and ``dgemm_``, and MKL's thread-local thread count
    (set to 1 in each thread of the region, as MKL's own nesting rule would not for a team of 1)."""
    sgemm: int
    dgemm: int
    set_threads_local: int

    def gemm(self, dtype: torch.dtype) -> int:
        return self.sgemm if dtype == torch.float32 else self.dgemm


@functools.lru_cache(maxsize=1)
def blas() -> Optional[Blas]:
    """PyTorch's MKL, or ``None`` (another BLAS, whose thread count cannot be set per thread,
    or a platform without ``libtorch_cpu.so``). Callers also need their kernels built, which
    ``MMDAT_NATIVE_OPS=0`` prevents."""
    try:
        lib = ctypes.CDLL(osp.join(osp.dirname(torch.__file__), 'lib', 'libtorch_cpu.so'))
        return Blas(*(ctypes.cast(getattr(lib, f), ctypes.c_void_p).value
                      for f in ('sgemm_', 'dgemm_', 'MKL_Set_Num_Threads_Local')))
    except (OSError, AttributeError):
        return None


def _source(kernels: str) -> str:
    parts = [_HEADER]
    for scalar, suffix, exp, log, erf, erf_given_exp in _TYPES:
        parts += [f'#define scalar_t {scalar}\n#define FLOAT32 {int(scalar == "float")}\n#define SUFFIX {suffix}\n'
                  f'#define EXP {exp}\n#define LOG {log}\n#define ERF {erf}\n#define ERF_GIVEN_EXP {erf_given_exp}\n',
                  _GEMM, kernels, '#undef scalar_t\n#undef FLOAT32\n#undef SUFFIX\n#undef EXP\n#undef LOG\n#undef ERF\n'
                  '#undef ERF_GIVEN_EXP\n']
    return '\n'.join(parts)


def _cpu_fingerprint() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next((line for line in f if line.startswith(('flags', 'Features'))), '')
    except OSError:
        return ''


def load(name: str, kernels: str, signatures: Dict[str, Tuple[int, int]],
         wide_vectors: bool = False) -> Optional[ctypes.CDLL]:
    """The compiled ``kernels``, or ``None`` (disabled, no C compiler, build failed: warns).

    Args:
        name: Stem of the library's file name.
        kernels: C source over ``scalar_t`` (see the module docstring).
        signatures: ``function -> (pointer arguments, int arguments[, ctypes result type])``,
            pointers first, no result by default; each function exists with the suffixes
            ``_f32`` and ``_f64``.
        wide_vectors: Ask for 512-bit vectors where the CPU has them (a gain measured per
            library: it is for the compute-bound ones, not for those bound by gathers).
    """
    if not enabled():
        return None
    try:
        lib = ctypes.CDLL(_build(name, _source(kernels), (_WIDE_FLAGS,) * wide_vectors + _FLAGS))
    except Exception as e:  # no compiler, no OpenMP, read-only cache, ...
        warnings.warn(f'mmdat: native {name} kernels unavailable ({e}); using the PyTorch implementation')
        return None
    for kernel, (n_pointers, n_ints, *restype) in signatures.items():
        for _, suffix, *_ in _TYPES:
            f = getattr(lib, f'{kernel}_{suffix}')
            f.argtypes = [ctypes.c_void_p] * n_pointers + [ctypes.c_int] * n_ints
            f.restype = restype[0] if restype else None
    return lib


def _build(name: str, source: str, flag_sets: Tuple[Tuple[str, ...], ...]) -> str:
    cc = os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc') or shutil.which('clang')
    if cc is None:
        raise RuntimeError('no C compiler found')
    key = hashlib.sha256('\0'.join([source, cc, repr(flag_sets), platform.machine(), _cpu_fingerprint()]).encode())
    key = key.hexdigest()[:16]
    cache = os.environ.get('MMDAT_CACHE_DIR') or osp.join(
        os.environ.get('XDG_CACHE_HOME') or osp.join(osp.expanduser('~'), '.cache'), 'mmdat')
    path = osp.join(cache, f'{name}_{key}.so')
    if osp.isfile(path):
        return path
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = osp.join(tmp, f'{name}.c')
        with open(src, 'w') as f:
            f.write(source)
        errors = []
        for flags in flag_sets:
            out = osp.join(tmp, f'{name}.so')
            proc = subprocess.run([cc, *flags, '-fPIC', '-shared', src, '-o', out, '-lm'], capture_output=True,
                                  text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(out, path)  # atomic: concurrent builds are harmless
                return path
            errors.append(proc.stderr.strip().splitlines()[-1:] or [f'exit {proc.returncode}'])
    raise RuntimeError(f'{cc} failed: {errors}')
