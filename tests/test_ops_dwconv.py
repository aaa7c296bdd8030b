"""The residual dwconv and ConvMlp ops: torch.library registration, fallbacks, compilation."""
import warnings

import pytest
import torch

from mmdat.ops import config
from mmdat.ops.dwconv import cpu, reference

needs_kernels = pytest.mark.skipif(not cpu.LIBRARY.available(), reason='no C compiler')


def _dwconv_operands(shape, dtype=torch.double, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Ch = shape[-1]
    return (torch.randn(shape, generator=gen, dtype=dtype), torch.randn(Ch, 1, 3, 3, generator=gen, dtype=dtype),
            torch.randn(Ch, generator=gen, dtype=dtype))


def _mlp_operands(shape, hidden, dtype=torch.double, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = shape[-1]
    sizes = [shape, (hidden, C), (hidden, ), (hidden, 1, 3, 3), (hidden, ), (C, hidden), (C, )]
    return [torch.randn(s, generator=gen, dtype=dtype) * 0.5 for s in sizes]


@needs_kernels
@pytest.mark.parametrize('gelu', [True, False], ids=['gelu', 'identity'])
@pytest.mark.parametrize('shape', [(2, 5, 7, 6), (1, 1, 3, 4)])
def test_residual_dwconv_opcheck(shape, gelu):
    args = [t.requires_grad_() for t in _dwconv_operands(shape)] + [gelu]
    torch.library.opcheck(cpu.residual_dwconv_forward, args)


@needs_kernels
@pytest.mark.parametrize('shape,hidden', [((2, 5, 7, 6), 12), ((1, 3, 1, 4), 8)])
def test_conv_mlp_opcheck(shape, hidden):
    torch.library.opcheck(cpu.conv_mlp_forward, [t.requires_grad_() for t in _mlp_operands(shape, hidden)])


@needs_kernels
def test_conv_mlp_matches_the_reference_float64():
    params = [t.requires_grad_() for t in _mlp_operands((2, 6, 5, 8), 24)]
    gout = torch.randn(2, 6, 5, 8, dtype=torch.double)
    results = []
    for fn in (reference.conv_mlp, cpu.conv_mlp):
        out = fn(*params)
        results.append([out, *torch.autograd.grad((out * gout).sum(), params)])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0)


def test_bad_input_falls_back_or_fails_clearly(monkeypatch):
    monkeypatch.setattr(config, '_warned', set())
    x, w, b = (t.to('meta') for t in _dwconv_operands((1, 4, 5, 6)))
    with pytest.warns(UserWarning, match='residual dwconv op got a meta tensor; running the reference'):
        assert cpu.residual_dwconv(x, w, b, True).shape == x.shape
    params = [t.to('meta') for t in _mlp_operands((1, 4, 5, 6), 12)]
    with pytest.warns(UserWarning, match='conv mlp op got a meta tensor'):
        assert cpu.conv_mlp(*params).shape == (1, 4, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        cpu.residual_dwconv(x, w, b, True)  # warned once
    x, w, b = _dwconv_operands((1, 4, 5, 6))
    with pytest.raises(TypeError, match='floating-point tensors, got torch.int32'):
        cpu.residual_dwconv(x.int(), w, b, True)
    with pytest.raises(ValueError, match='inconsistent arguments'):
        cpu.residual_dwconv(x[..., :5], w, b, True)
    monkeypatch.setenv('MMDAT_NATIVE_OPS', '0')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        torch.testing.assert_close(cpu.residual_dwconv(x, w, b, True), reference.residual_dwconv(x, w, b, True))


@needs_kernels
def test_compiles_without_graph_breaks():
    params = [t.requires_grad_() for t in _mlp_operands((1, 6, 5, 8), 16)]

    def fn(x, *weights):
        return cpu.residual_dwconv(cpu.conv_mlp(x, *weights), weights[2][:8], weights[3][:8], False)

    compiled = torch.compile(fn, fullgraph=True, backend='aot_eager', dynamic=True)
    for size in ((6, 5), (9, 7)):
        x = torch.randn(1, *size, 8, dtype=torch.double, requires_grad=True)
        eager, ours = fn(x, *params[1:]), compiled(x, *params[1:])
        torch.testing.assert_close(ours, eager, atol=1e-12, rtol=0)
        for a, c in zip(torch.autograd.grad((eager * eager).sum(), [x] + params[1:]),
                        torch.autograd.grad((ours * ours).sum(), [x] + params[1:])):
            torch.testing.assert_close(c, a, atol=1e-12, rtol=0)
