"""Builds the C kernels of :mod:`mmdat.ops` on first use and loads them with ctypes.

Each kernel source in ``mmdat/ops/csrc/`` is C over ``scalar_t`` (see ``csrc/common.h``),
compiled twice, for ``float`` (kernels named ``*_f32``) and ``double`` (``*_f64``), with the
system's C compiler (OpenMP when available, a second or two) into one library per source set,
compiler and CPU, cached in :func:`.config.cache_dir`. When no compiler works the loader warns
once and returns ``None``; callers then run their PyTorch paths. ``MMDAT_NATIVE_OPS=0``
disables every kernel (:func:`.config.native_ops_enabled`). ``python -m mmdat.ops.build``
builds them all ahead of use (``python -m mmdat.ops``).

Only the op implementations of :mod:`mmdat.ops` call a :class:`Library` (and ``torch.compile``
never traces into those); module code asks :func:`Library.available`, which dynamo treats as
a constant.
"""
import ctypes
import functools
import glob
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
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .config import cache_dir, native_ops_enabled as enabled

CSRC_DIR = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')

#: Compiler flags to try, best first. PyTorch's own: without -fno-trapping-math GCC does not
#: vectorize floorf, hence exp_f32 and every softmax loop.
MATH_FLAGS = ('-fno-trapping-math', '-fno-math-errno')
FLAG_SETS = (('-O3', '-march=native', '-fopenmp', *MATH_FLAGS), ('-O3', '-fopenmp', *MATH_FLAGS),
             ('-O3', *MATH_FLAGS))
#: Tried first for ``wide_vectors`` libraries: GCC's auto-vectorizer uses 256-bit vectors on
#: AVX-512 CPUs unless told otherwise; fails on other architectures (then ``FLAG_SETS``).
WIDE_FLAGS = ('-O3', '-march=native', '-mprefer-vector-width=512', '-fopenmp', *MATH_FLAGS)

#: (``-DFLOAT32=`` value, kernel suffix, dtype) of the two builds of every source
SCALAR_TYPES = ((1, 'f32', torch.float32), (0, 'f64', torch.float64))

#: ``function -> (pointer arguments, int arguments[, ctypes result type])``, pointers first
Signatures = Dict[str, Tuple]


def cpu_fingerprint() -> str:
    """The CPU's feature flags line (part of a library's cache key: ``-march=native``)."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line for line in f if line.startswith(('flags', 'Features'))), '')
    except OSError:
        return ''


def read_sources(source_files: Sequence[str]) -> List[Tuple[str, str]]:
    """``(file name, text)`` of kernel sources, by name in :data:`CSRC_DIR` or by path."""
    sources = []
    for name in source_files:
        path = name if osp.isabs(name) else osp.join(CSRC_DIR, name)
        with open(path) as f:
            sources.append((osp.basename(path), f.read()))
    return sources


def load(name: str, source_files: Sequence[str], signatures: Signatures, wide_vectors: bool = False,
         flag_sets: Optional[Sequence[Tuple[str, ...]]] = None) -> Optional[ctypes.CDLL]:
    """Builds (or finds in the cache) and loads a library; ``None`` (with a warning) when the
    build fails, ``None`` silently when ``MMDAT_NATIVE_OPS=0``. Not cached: see :class:`Library`.

    Args:
        name: Stem of the library's file name.
        source_files: Kernel sources (``.c``) in :data:`CSRC_DIR` (or paths); each includes
            ``common.h`` and exports ``NAME()``d functions.
        signatures: ``function -> (pointer arguments, int arguments[, ctypes result type])``,
            pointers first, no result by default; each function exists as ``*_f32`` and ``*_f64``.
        wide_vectors: Ask for 512-bit vectors where the CPU has them (for compute-bound kernels).
        flag_sets: Compiler flag sets to try in order (default: :data:`FLAG_SETS`, after
            :data:`WIDE_FLAGS` with ``wide_vectors``).
    """
    if not enabled():
        return None
    if flag_sets is None:
        flag_sets = (WIDE_FLAGS, ) * wide_vectors + FLAG_SETS
    try:
        lib = ctypes.CDLL(build(name, read_sources(source_files), tuple(flag_sets)))
        for kernel, (n_pointers, n_ints, *restype) in signatures.items():
            for _, suffix, _ in SCALAR_TYPES:
                f = getattr(lib, f'{kernel}_{suffix}')
                f.argtypes = [ctypes.c_void_p] * n_pointers + [ctypes.c_int] * n_ints
                f.restype = restype[0] if restype else None
    except Exception as e:  # no compiler, no OpenMP, read-only cache, missing symbol, ...
        warnings.warn(f'mmdat: native {name} kernels unavailable ({e}); using the PyTorch implementation')
        return None
    return lib


class Library:
    """A kernel library built and loaded on its first call, then kept (``None``: unavailable).

    Args as :func:`load`. Calls are thread-safe; :meth:`cache_clear` forgets the result (e.g.
    after changing ``MMDAT_NATIVE_OPS`` or ``MMDAT_CACHE_DIR``).
    """

    def __init__(self, name: str, source_files: Sequence[str], signatures: Signatures, wide_vectors: bool = False):
        self.name, self.source_files, self.signatures = name, tuple(source_files), signatures
        self.wide_vectors = wide_vectors
        self._lock = threading.Lock()
        self._lib: Optional[ctypes.CDLL] = None
        self._loaded = False
        self.available = _constant_availability(self)

    def __call__(self) -> Optional[ctypes.CDLL]:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._lib = load(self.name, self.source_files, self.signatures, self.wide_vectors)
                    self._loaded = True
        return self._lib if enabled() else None

    def cache_clear(self):
        with self._lock:
            self._lib, self._loaded = None, False

    def function(self, kernel: str, dtype: torch.dtype):
        """Kernel ``kernel`` for ``dtype`` (float32 or float64); the library must be available."""
        lib = self()
        if lib is None:
            raise RuntimeError(f'mmdat: the native {self.name} kernels are not available '
                               '(MMDAT_NATIVE_OPS=0 or no working C compiler)')
        return function(lib, kernel, dtype)


def _constant_availability(library: Library) -> Callable[[], bool]:
    """``library.available()``: whether it builds and loads, a constant to ``torch.compile``
    (which calls it instead of tracing the loader)."""
    @torch.compiler.assume_constant_result
    def available() -> bool:
        return library() is not None
    return available


def function(lib: ctypes.CDLL, name: str, dtype: torch.dtype):
    """Kernel ``name`` of ``lib`` compiled for ``dtype`` (``torch.float32`` or ``torch.float64``)."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f'mmdat C kernels take float32 or float64 tensors, got {dtype}')
    return getattr(lib, f'{name}_{"f32" if dtype == torch.float32 else "f64"}')


def unsupported(op: str, *tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Why the C kernels of ``op`` cannot take ``tensors`` (``None`` entries skipped), or
    ``None``: they take strided CPU tensors (float32 / float64; other floating dtypes through a
    float32 copy, see :func:`.config.in_full_precision`). Raises ``TypeError`` for a tensor that
    is not floating-point (no implementation takes it)."""
    for t in tensors:
        if t is not None and not t.is_floating_point():
            raise TypeError(f'{op} takes floating-point tensors, got {t.dtype}')
    for t in tensors:
        if t is None:
            continue
        if t.device.type != 'cpu':
            return f'got a {t.device.type} tensor'
        if t.layout != torch.strided:
            return f'got a {t.layout} tensor'
    return None


def pointers(*tensors: Optional[torch.Tensor]) -> List[Optional[int]]:
    """The tensors' data pointers for a kernel call; ``None`` (a NULL pointer) for ``None``."""
    return [None if t is None else t.data_ptr() for t in tensors]


_workspaces = threading.local()


def workspace(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU scratch tensor of at least ``numel`` elements, kept between calls per thread,
    ``name`` and dtype, and grown when needed.

    Fresh buffers of tens of MB come from the OS on every call, page by page (glibc maps
    blocks above 32 MB anew each time), which on a busy CPU costs as much as the arithmetic
    around them. Only op implementations use it, within one call: no op output views it.
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


def clear_workspaces():
    """Frees this thread's workspaces."""
    _workspaces.__dict__.pop('tensors', None)


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
    or a platform without ``libtorch_cpu.so``)."""
    try:
        lib = ctypes.CDLL(osp.join(osp.dirname(torch.__file__), 'lib', 'libtorch_cpu.so'))
        return Blas(*(ctypes.cast(getattr(lib, f), ctypes.c_void_p).value
                      for f in ('sgemm_', 'dgemm_', 'MKL_Set_Num_Threads_Local')))
    except (OSError, AttributeError):
        return None


def _compiler() -> str:
    cc = os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc') or shutil.which('clang')
    if cc is None:
        raise RuntimeError('no C compiler found')
    return cc


def _headers() -> List[Tuple[str, str]]:
    headers = []
    for path in sorted(glob.glob(osp.join(CSRC_DIR, '*.h'))):
        with open(path) as f:
            headers.append((osp.basename(path), f.read()))
    return headers


def build(name: str, sources: Sequence[Tuple[str, str]], flag_sets: Sequence[Tuple[str, ...]]) -> str:
    """The path of the shared library of ``sources`` (``(file name, C text)``, compiled with
    ``-I`` :data:`CSRC_DIR`), built with the first flag set the compiler accepts unless cached.
    Raises ``RuntimeError`` naming the compiler's last error of each flag set."""
    cc = _compiler()
    key = '\0'.join([repr(sources), repr(_headers()), cc, repr(tuple(flag_sets)), platform.machine(),
                     cpu_fingerprint()])
    path = osp.join(cache_dir(), f'{name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so')
    if osp.isfile(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        files = []
        for file_name, text in sources:
            files.append(osp.join(tmp, file_name))
            with open(files[-1], 'w') as f:
                f.write(text)
        errors = []
        for flags in flag_sets:
            error = _compile_and_link(cc, tuple(flags), files, osp.join(tmp, f'{name}.so'))
            if error is None:
                os.replace(osp.join(tmp, f'{name}.so'), path)  # atomic: concurrent builds are harmless
                return path
            errors.append(error)
    raise RuntimeError(f'{cc} failed: {errors}')


def _compile_and_link(cc: str, flags: Tuple[str, ...], files: List[str], out: str) -> Optional[str]:
    """Compiles every file for both scalar types (in parallel) and links them into ``out``;
    the compiler's last line of error, or ``None``."""
    jobs = []
    for path in files:
        for value, suffix, _ in SCALAR_TYPES:
            obj = f'{osp.splitext(path)[0]}_{suffix}.o'
            cmd = [cc, *flags, '-fPIC', f'-DFLOAT32={value}', '-I', CSRC_DIR, '-c', path, '-o', obj]
            jobs.append((obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    failure = None
    for _, proc in jobs:
        _, stderr = proc.communicate(timeout=300)
        if proc.returncode != 0 and failure is None:
            failure = stderr.strip().splitlines()[-1:] or [f'exit {proc.returncode}']
    if failure is not None:
        return failure[0]
    proc = subprocess.run([cc, *flags, '-shared', *(obj for obj, _ in jobs), '-o', out, '-lm'],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines()[-1:] or [f'exit {proc.returncode}'])[0]
    return None


def build_all() -> Dict[str, bool]:
    """Builds every kernel library of :mod:`mmdat.ops` now (e.g. at install): name -> available."""
    import importlib
    built = {}
    for kind in ('deformable', 'neighborhood', 'window', 'dwconv'):
        cpu = importlib.import_module(f'mmdat.ops.{kind}.cpu')
        for value in vars(cpu).values():
            if isinstance(value, Library) and value.name not in built:
                built[value.name] = value() is not None
    return built

