"""``act(x + DWConv3x3(x))``: the C kernels compute what the PyTorch ops compute."""
import pytest
import torch
import torch.nn as nn

from mmdat.models.backbones.dat import DATBlock
from mmdat.models.layers import ConvMlp, residual_dwconv as module
from mmdat.models.layers.residual_dwconv import residual_dwconv
from mmdat.ops import config
from mmdat.ops.dwconv import cpu

from conftest import without_native_ops

needs_native = pytest.mark.skipif(not cpu.LIBRARY.available(), reason='no C compiler')


def _reference(x, conv, gelu):
    y = x.permute(0, 3, 1, 2)
    y = y + conv(y)
    return (torch.nn.functional.gelu(y) if gelu else y).permute(0, 2, 3, 1)


def _outputs_and_grads(fn, x, conv, gout):
    x = x.detach().requires_grad_()
    out = fn(x, conv)
    return [out] + list(torch.autograd.grad((out * gout).sum(), (x, conv.weight, conv.bias)))


@needs_native
@pytest.mark.parametrize('shape', [(2, 5, 7, 6), (1, 1, 1, 3), (1, 1, 9, 4), (3, 8, 2, 17), (1, 13, 11, 64)])
@pytest.mark.parametrize('gelu', [True, False], ids=['gelu', 'identity'])
@pytest.mark.parametrize('threads', [1, 3])
def test_native_matches_pytorch_float64(shape, gelu, threads):
    """Output and the gradients w.r.t. input, weight and bias; maps of one row or column
    (every tap at a border) and more threads than rows."""
    gen = torch.Generator().manual_seed(0)
    Ch = shape[-1]
    conv = nn.Conv2d(Ch, Ch, 3, padding=1, groups=Ch).double()
    x = torch.randn(shape, generator=gen, dtype=torch.double)
    gout = torch.randn(shape, generator=gen, dtype=torch.double)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = _outputs_and_grads(lambda t, c: cpu.residual_dwconv_forward(t, c.weight, c.bias, gelu),
                                  x, conv, gout)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(fast, _outputs_and_grads(lambda t, c: _reference(t, c, gelu), x, conv, gout)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@needs_native
@pytest.mark.parametrize('shape', [(2, 5, 7, 6), (1, 1, 1, 3), (3, 8, 2, 17)])
@pytest.mark.parametrize('gelu', [True, False], ids=['gelu', 'identity'])
@pytest.mark.parametrize('threads', [1, 3])
def test_native_input_bias_is_added_before_the_conv(shape, gelu, threads):
    """``input_bias`` (the MLP's first 1x1 conv bias, never added to the map) acts as if added to
    every position of ``x``, the zero padding around it included: output and the gradients
    w.r.t. input, bias, weight and the input bias."""
    gen = torch.Generator().manual_seed(1)
    Ch = shape[-1]
    conv = nn.Conv2d(Ch, Ch, 3, padding=1, groups=Ch).double()
    x = torch.randn(shape, generator=gen, dtype=torch.double)
    gout = torch.randn(shape, generator=gen, dtype=torch.double)
    u = torch.randn(Ch, generator=gen, dtype=torch.double) * 2
    wt = cpu.tap_major(conv.weight.detach())
    out, gx = torch.empty_like(x), torch.empty_like(x)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu.kernel_forward(x, wt, conv.bias.detach(), gelu, out, input_bias=u)
        dweight, dbias, dinput = cpu.kernel_backward(x, wt, conv.bias.detach(), gelu, gout, gx, input_bias=u)
    finally:
        torch.set_num_threads(previous)
    xr, ur = x.clone().requires_grad_(), u.clone().requires_grad_()
    ref = _reference(xr + ur, conv, gelu)
    grads = torch.autograd.grad((ref * gout).sum(), (xr, conv.weight, conv.bias, ur))
    for a, b in zip((out, gx, dweight, dbias, dinput), (ref,) + grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@needs_native
def test_native_float32_gelu_is_pytorchs():
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=32)
    x = torch.randn(2, 9, 14, 32, generator=gen) * 3
    gout = torch.randn(2, 9, 14, 32, generator=gen)
    fast = _outputs_and_grads(lambda t, c: residual_dwconv(t, c, True, 'fast'), x, conv, gout)
    ref = _outputs_and_grads(lambda t, c: _reference(t, c, True), x, conv, gout)
    assert fast[0].dtype == torch.float32
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-5 * max(b.abs().max().item(), 1.), rtol=0)


@needs_native
def test_conv_mlp_and_local_perception_run_the_kernels_on_cpu_unless_disabled(monkeypatch):
    calls = []
    real = cpu.kernel_forward
    monkeypatch.setattr(cpu, 'kernel_forward', lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    torch.manual_seed(0)
    block = DATBlock(nn.Identity(), 16, conv_mlp=True, local_perception=True)
    x = torch.randn(2, 16, 6, 5)
    native = block(x)
    assert calls == [False, True]  # the LPU, then the MLP's GELU middle
    fallback = without_native_ops(monkeypatch, cpu.LIBRARY, lambda: block(x))
    assert len(calls) == 2
    torch.testing.assert_close(native, fallback, atol=1e-5, rtol=1e-5)


@needs_native
def test_reference_impl_takes_pytorchs_convolutions(monkeypatch):
    """``attn_impl='reference'`` (constructor argument, attribute, or ``attention_impl`` for the
    kind ``'dwconv'``) keeps the LPU and the MLP off the kernels, with the same result."""
    calls = []
    real = cpu.kernel_forward
    monkeypatch.setattr(cpu, 'kernel_forward', lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    block = DATBlock(nn.Identity(), 16, conv_mlp=True, local_perception=True, attn_impl='reference')
    x = torch.randn(2, 16, 6, 5)
    reference = block(x)
    assert calls == []
    block.lpu.attn_impl = block.mlp.attn_impl = 'fast'
    torch.testing.assert_close(block(x), reference, atol=1e-5, rtol=1e-5)
    assert calls == [False, True]
    with config.attention_impl('reference', 'dwconv'):
        block(x)
    assert len(calls) == 2


def test_other_inputs_take_the_pytorch_path():
    """bf16 autocast, other dtypes and other convs do not reach the kernels (float32 / float64,
    depth-wise 3x3 with zero padding and bias)."""
    mlp = ConvMlp(8, 32)
    x = torch.randn(1, 8, 5, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not module.kernel_applies(torch.randn(1, 5, 4, 32), mlp.dwconv, 'fast')
        out = mlp(x)
    assert out.shape == x.shape
    assert not module.kernel_applies(torch.randn(1, 5, 4, 32).bfloat16(), mlp.dwconv, 'fast')
    wide = nn.Conv2d(32, 32, 5, padding=2, groups=32)
    y = torch.randn(1, 5, 4, 32)
    assert not module.kernel_applies(y, wide, 'fast')
    torch.testing.assert_close(residual_dwconv(y, wide, True, 'fast'), _reference(y, wide, True))


def _mlp_outputs_and_grads(mlp, x, gout):
    x = x.detach().requires_grad_()
    out = mlp(x)
    params = [p for _, p in sorted(mlp.named_parameters())]
    return [out] + list(torch.autograd.grad((out * gout).sum(), [x] + params))


@needs_native
def test_conv_mlp_node_matches_the_pytorch_ops_float64(monkeypatch):
    """The one-node MLP (GELU output recomputed, backward in the kept workspace): output and
    gradients w.r.t. the input and all six parameters, on a map and then a smaller one (the
    workspace is reused, and no returned gradient shares it)."""
    gen = torch.Generator().manual_seed(0)
    mlp = ConvMlp(8, 24).double()
    for p in mlp.parameters():
        p.data.normal_(generator=gen)
    for shape in [(2, 8, 7, 9), (1, 8, 3, 4)]:
        x = torch.randn(shape, generator=gen, dtype=torch.double)
        gout = torch.randn(shape, generator=gen, dtype=torch.double)
        fast = _mlp_outputs_and_grads(mlp, x, gout)
        again = _mlp_outputs_and_grads(mlp, x, gout)
        ref = without_native_ops(monkeypatch, cpu.LIBRARY, lambda: _mlp_outputs_and_grads(mlp, x, gout))
        assert len(fast) == 8
        for a, b, c in zip(fast, again, ref):
            torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-10)
            assert torch.equal(a, b)


@needs_native
def test_conv_mlp_keeps_no_hidden_layer(monkeypatch):
    """What the MLP saves for backward: no hidden-size tensor (the PyTorch ops keep three);
    the backward recomputes them in the workspace, twice in a row with the same result."""
    mlp = ConvMlp(8, 32)
    x = torch.randn(1, 8, 6, 5, requires_grad=True)
    hidden_numel = 32 * 6 * 5

    def saved_hidden_tensors():
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            mlp(x)
        return sum(n == hidden_numel for n in sizes)

    assert saved_hidden_tensors() == 0
    assert without_native_ops(monkeypatch, cpu.LIBRARY, saved_hidden_tensors) >= 2
    grads = [torch.autograd.grad(mlp(x).square().sum(), [x, *mlp.parameters()]) for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@needs_native
def test_conv_mlp_with_active_dropout_takes_the_pytorch_path(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, 'conv_mlp_forward', lambda *a: calls.append(1) or a[0])
    mlp = ConvMlp(8, 16, drop=0.5)
    x = torch.randn(1, 8, 4, 4)
    assert mlp(x).shape == x.shape and not calls
    mlp.eval()(x)
    assert calls == [1]
