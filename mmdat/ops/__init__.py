"""mmdat's attention ops: reference formulations, CPU kernels and CUDA paths as PyTorch ops.

Imports torch only, so that it runs on a bare GPU machine. Every switch (environment,
context manager, the per-module choice of backend) is in :mod:`mmdat.ops.config`.
"""
from .config import ATTN_IMPLS, BACKENDS, KINDS, attention_impl, choose_backend, deformable_cpu_strategy, force_backend

__all__ = ['ATTN_IMPLS', 'BACKENDS', 'KINDS', 'attention_impl', 'choose_backend', 'deformable_cpu_strategy',
           'force_backend']
