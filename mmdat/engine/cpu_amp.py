"""bfloat16 mixed precision for training on CPU.

MMEngine's ``AmpOptimWrapper`` refuses to run without CUDA / NPU / MLU. On CPU, bfloat16
autocast needs no loss scaling (bf16 has float32's exponent range), so a wrapper only has
to enter ``torch.autocast('cpu', dtype=torch.bfloat16)`` around the forward pass.

It does so for the submodules named in ``autocast_modules`` only (by default the backbone
and the neck, where nearly all the FLOPs of a detector or segmentor are), and hands their
outputs on in float32: mmcv's CPU kernels used by the heads (``nms``, ``RoIAlign``) have
no bfloat16 version. Inside DAT, deformable and neighborhood attention compute their
softmax and sampling positions in float32 under autocast.
"""
import contextlib
from typing import Sequence

import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


def _to_float32(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float32(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_float32(v) for k, v in x.items()}
    return x


@OPTIM_WRAPPERS.register_module()
class CPUBF16OptimWrapper(OptimWrapper):
    """``OptimWrapper`` that runs ``autocast_modules`` under CPU bfloat16 autocast.

    Args:
        autocast_modules: Attribute names of the model's submodules to autocast; absent
            ones are skipped (a segmentor without a neck). Their outputs leave in float32.
        **kwargs: ``OptimWrapper``'s arguments (``optimizer``, ``clip_grad``,
            ``accumulative_counts``).
    """

    def __init__(self, autocast_modules: Sequence[str] = ('backbone', 'neck'), **kwargs):
        super().__init__(**kwargs)
        self.autocast_modules = tuple(autocast_modules)

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module):
        model = getattr(model, 'module', model)  # DDP / MMDistributedDataParallel
        found = [(name, getattr(model, name)) for name in self.autocast_modules
                 if isinstance(getattr(model, name, None), nn.Module)]
        if not found:
            raise ValueError(f'CPUBF16OptimWrapper: the model ({type(model).__name__}) has none of the '
                             f'submodules {list(self.autocast_modules)} to autocast')
        saved = {}
        for name, module in found:
            saved[name] = module.__dict__.get('forward')  # an instance-level forward, if any

            def forward(*args, _forward=module.forward, **kwargs):
                with torch.autocast('cpu', dtype=torch.bfloat16):
                    out = _forward(*args, **kwargs)
                return _to_float32(out)

            module.forward = forward
        try:
            with super().optim_context(model):
                yield
        finally:
            for name, module in found:
                if saved[name] is None:
                    del module.forward  # back to the class's forward
                else:
                    module.forward = saved[name]
