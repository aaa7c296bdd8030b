"""The backbone under ``torch.compile`` (whole graph, static and dynamic sizes) and
``torch.export``: same outputs and gradients as eager, on the default (fast) path."""
import pytest
import torch

import mmdat  # noqa: F401
from mmdat.models.backbones import DAT

# The smallest archs that still hold every kind of block: window, shifted window and
# deformable attention with and without a position table (v1); neighborhood and deformable
# attention, local perception units and conv MLPs (++).
TINY_V1 = dict(preset='v1-tiny', embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), groups=(0, 0, 2, 4),
               stage_specs=('L', 'S', 'LD', 'D'), mlp_ratio=2)
TINY_PP = dict(preset='pp-tiny', embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), groups=(1, 2, 2, 4),
               stage_specs=('ND', 'D', 'N', 'D'), mlp_ratio=2)
ARCHS = [pytest.param(TINY_V1, id='v1'), pytest.param(TINY_PP, id='pp')]


def _backbone(arch):
    model = DAT(arch).train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial weights (zero-initialised tables, unit norms)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _step(model, x, run=None):
    """Outputs of ``run`` (default: ``model``; e.g. its compiled form) and the gradients of a
    weighted sum of them w.r.t. the input and every parameter of ``model``."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    outs = (model if run is None else run)(x)
    gen = torch.Generator().manual_seed(2)
    sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs).backward()
    grads = {'input': x.grad}
    grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return [o.detach() for o in outs], grads


def _assert_close(compiled, eager, atol=1e-4):
    for a, b in zip(compiled[0], eager[0]):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
    assert compiled[1].keys() == eager[1].keys()
    for name, g in eager[1].items():
        torch.testing.assert_close(compiled[1][name], g, atol=atol, rtol=1e-4, msg=name)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # the graph count below is per test
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('arch', ARCHS)
def test_compile_inductor_fullgraph_matches_eager(arch):
    """Inductor, one graph (``fullgraph=True`` fails on any graph break), forward and backward."""
    model = _backbone(arch)
    x = torch.randn(1, 3, 64, 64)
    eager = _step(model, x)
    compiled = _step(model, x, torch.compile(model, fullgraph=True))
    _assert_close(compiled, eager)


@pytest.mark.parametrize('arch', ARCHS)
def test_compile_dynamic_sizes_match_eager(arch):
    """``dynamic=True``: multi-scale training changes the map size every step; one graph
    serves them (no recompilation), with the gradients of eager."""
    model = _backbone(arch)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend='aot_eager')
    for size in ((64, 96), (96, 64)):
        x = torch.randn(1, 3, *size)
        _assert_close(_step(model, x, compiled), _step(model, x))
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1


@pytest.mark.parametrize('arch', ARCHS)
def test_export_default_path_matches_eager(arch):
    model = _backbone(arch).eval()
    x = torch.randn(1, 3, 64, 64)
    program = torch.export.export(model, (x, ))
    with torch.no_grad():
        eager = model(x)
        exported = program.module()(x)
    for a, b in zip(exported, eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    targets = {str(n.target) for n in program.graph.nodes if n.op == 'call_function'}
    assert 'mmdat.deformable_attention_forward.default' in targets  # the op, not the reference path
