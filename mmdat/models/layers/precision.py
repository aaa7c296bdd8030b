"""The one precision policy of the attention kernels: float32 or float64, never mixed."""
from typing import Callable, Optional, Sequence

import torch


def in_full_precision(fn: Callable, tensors: Sequence[Optional[torch.Tensor]], *args):
    """``fn(*tensors, *args)``, with ``tensors`` all float32 or all float64.

    Under autocast, or when ``tensors`` (``None`` entries skipped) are not all float32 or
    all float64, ``fn`` gets float32 copies with autocast off; its result is then returned
    in float32 under autocast and in the first tensor's dtype otherwise.
    """
    present = [t for t in tensors if t is not None]
    device_type = present[0].device.type
    autocast = torch.is_autocast_enabled(device_type)
    if not autocast and {t.dtype for t in present} in ({torch.float32}, {torch.float64}):
        return fn(*tensors, *args)
    with torch.autocast(device_type, enabled=False):
        out = fn(*(None if t is None else t.float() for t in tensors), *args)
    return out if autocast else out.to(present[0].dtype)
