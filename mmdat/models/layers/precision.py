"""The precision policy of the CPU attention kernels, now :func:`mmdat.ops.config.in_full_precision`."""
from ...ops.config import in_full_precision

__all__ = ['in_full_precision']
