"""The neighborhood attention ops: torch.library registration, host-sync-free tiling, fallbacks,
the choice of NATTEN."""
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from mmdat.models.layers import NeighborhoodAttention
from mmdat.ops import config
from mmdat.ops.neighborhood import cpu, natten, reference

needs_kernels = pytest.mark.skipif(not cpu.LIBRARY.available(), reason='no C compiler')

#: batch, map, heads, head dim, kernel: maps with interior blocks of lanes (29 columns) or only
#: edge blocks, a map of exactly the kernel size
CASES = [(2, (9, 11), 2, 4, 5), (1, (7, 29), 1, 8, 7), (1, (7, 7), 2, 4, 7)]


def _projection_operands(B, size, heads, d, kernel, dtype=torch.double, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Cin, C3 = heads * d, 3 * heads * d
    return (torch.randn(B, *size, Cin, generator=gen, dtype=dtype),
            torch.randn(C3, Cin, generator=gen, dtype=dtype) * Cin ** -0.5, torch.randn(C3, generator=gen, dtype=dtype),
            torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=gen, dtype=dtype))


def _reference(x, weight, bias, table, heads, kernel, scale):
    B, H, W, _ = x.shape
    q, k, v = F.linear(x, weight, bias).reshape(B, H, W, 3, heads, -1).permute(3, 0, 4, 1, 2, 5)
    out = reference.neighborhood_attention(q * scale, k, v, table, kernel)
    return out.permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)


@needs_kernels
@pytest.mark.parametrize('case', CASES, ids=lambda c: f'{c[1][0]}x{c[1][1]}-k{c[4]}-B{c[0]}')
def test_opcheck(case):
    B, size, heads, d, kernel = case
    args = [t.requires_grad_() for t in _projection_operands(B, size, heads, d, kernel)] + [heads, kernel, 0.5]
    torch.library.opcheck(cpu.neighborhood_attention_forward, args)


@pytest.mark.parametrize('case', CASES[:2], ids=lambda c: f'{c[1][0]}x{c[1][1]}-k{c[4]}-B{c[0]}')
def test_tiled_opcheck(case):
    B, size, heads, d, kernel = case
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, *size, d, generator=gen, dtype=torch.double).requires_grad_() for _ in range(3))
    table = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=gen, dtype=torch.double).requires_grad_()
    torch.library.opcheck(cpu.neighborhood_attention_tiled_forward, [q, k, v, table, kernel, 4])


def test_tiling_is_python_ints():
    """Regions, patterns and steps of the halo tiling are plain ints (no host syncs), and they
    reproduce the windows' bias coordinates."""
    tl = cpu._Tiling(60, 30, 7, 8, torch.device('cpu'), heads=6)
    assert all(type(a) is int for a in tl.rows.region + tl.cols.region)
    assert all(type(p) is int for p in tl.pattern)
    assert len(set(tl.pattern)) < tl.rows.tiles  # interior rows of tiles share their pattern
    for t, p in enumerate(tl.pattern):
        torch.testing.assert_close(tl.rows.rel[t], tl.rows.rel[tl.pattern_rows[p]], rtol=0, atol=0)


def test_bad_input_falls_back_or_fails_clearly(monkeypatch):
    """Tensors the kernels cannot take: the reference with one warning; without the C kernels:
    the halo tiles, silently (the build warned); small maps and integer tensors: errors."""
    monkeypatch.setattr(config, '_warned', set())
    operands = _projection_operands(1, (9, 10), 2, 4, 7)
    meta = [t.to('meta') for t in operands]
    with pytest.warns(UserWarning, match='neighborhood attention op got a meta tensor; running the reference'):
        out = cpu.neighborhood_attention(*meta, 2, 7, 0.5)
    assert out.shape == (1, 9, 10, 8) and out.device.type == 'meta'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        cpu.neighborhood_attention(*meta, 2, 7, 0.5)  # warned once
    with pytest.raises(ValueError, match='at least the kernel size 7, got 6x10'):
        cpu.neighborhood_attention(operands[0][:, :6], *operands[1:], 2, 7, 0.5)
    with pytest.raises(TypeError, match='floating-point tensors, got torch.int64'):
        cpu.neighborhood_attention(operands[0].long(), *operands[1:], 2, 7, 0.5)
    calls = []
    real = cpu.neighborhood_attention_tiled_forward
    monkeypatch.setattr(cpu, 'neighborhood_attention_tiled_forward', lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv('MMDAT_NATIVE_OPS', '0')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        out = cpu.neighborhood_attention(*operands, 2, 7, 0.5)
    assert calls
    torch.testing.assert_close(out, _reference(*operands, 2, 7, 0.5), atol=1e-12, rtol=0)


@needs_kernels
def test_compiles_without_graph_breaks():
    _, weight, bias, table = (t.requires_grad_() for t in _projection_operands(1, (9, 10), 2, 4, 7))

    def fn(x, weight, bias, table):
        return cpu.neighborhood_attention(x, weight, bias, table, 2, 7, 0.5)

    compiled = torch.compile(fn, fullgraph=True, backend='aot_eager', dynamic=True)
    for size in ((9, 10), (12, 17)):
        x = torch.randn(1, *size, 8, dtype=torch.double, requires_grad=True)
        eager, ours = fn(x, weight, bias, table), compiled(x, weight, bias, table)
        torch.testing.assert_close(ours, eager, atol=1e-12, rtol=0)
        for a, b in zip(torch.autograd.grad((eager * eager).sum(), (x, weight, bias, table)),
                        torch.autograd.grad((ours * ours).sum(), (x, weight, bias, table))):
            torch.testing.assert_close(b, a, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- NATTEN (a stand-in)

def _natten_ops(error=None, wrong=False):
    """NA2D's unfused QK (with bias) and AV as NATTEN's take them (``B x heads x H x W x ...``),
    by the gather formulation; ``error`` raises it instead, ``wrong`` drops the bias."""
    def qk(q, k, rpb, kernel_size):
        if error is not None:
            raise error
        B, nh, H, W, d = q.shape
        keys, bias = reference.neighborhood(H, W, kernel_size, q.device)
        logits = torch.einsum('bhnd,bhnkd->bhnk', q.reshape(B, nh, H * W, d), k.reshape(B, nh, H * W, d)[:, :, keys])
        return (logits if wrong else logits + rpb.flatten(1)[:, bias]).reshape(B, nh, H, W, -1)

    def av(attn, v, kernel_size):
        B, nh, H, W, d = v.shape
        keys, _ = reference.neighborhood(H, W, kernel_size, v.device)
        out = torch.einsum('bhnk,bhnkd->bhnd', attn.reshape(B, nh, H * W, -1), v.reshape(B, nh, H * W, d)[:, :, keys])
        return out.reshape(B, nh, H, W, d)

    return qk, av


@pytest.fixture(params=['0.17', '0.14'])
def fake_natten(request, monkeypatch):
    """Installs a NATTEN stand-in of that version's API (and forgets earlier probes); returns
    ``install(**kwargs)`` (:func:`_natten_ops`' arguments) and the log of its QK calls."""
    calls = []

    def install(**kwargs):
        qk, av = _natten_ops(**kwargs)
        functional = types.ModuleType('natten.functional')
        if request.param == '0.17':
            functional.na2d_qk = lambda q, k, kernel_size, dilation, rpb: calls.append(dilation) or qk(q, k, rpb,
                                                                                                     kernel_size)
            functional.na2d_av = lambda a, v, kernel_size, dilation: av(a, v, kernel_size)
        else:
            functional.natten2dqkrpb = lambda q, k, rpb, kernel_size, dilation: calls.append(dilation) or qk(
                q, k, rpb, kernel_size)
            functional.natten2dav = lambda a, v, kernel_size, dilation: av(a, v, kernel_size)
        package = types.ModuleType('natten')
        package.functional = functional
        monkeypatch.setitem(sys.modules, 'natten', package)
        monkeypatch.setitem(sys.modules, 'natten.functional', functional)
        monkeypatch.setattr(natten, '_probed', {})

    return install, calls


def test_natten_is_chosen_where_installed_and_agreeing(fake_natten):
    install, calls = fake_natten
    install()
    x = torch.empty(1)
    assert config.choose_backend('neighborhood', 'fast', x, natten_kernel_size=7) == 'natten'
    assert calls == [1]  # the probe, once
    assert config.choose_backend('neighborhood', 'fast', x, natten_kernel_size=7) == 'natten'
    assert calls == [1]
    assert config.choose_backend('neighborhood', 'fast', x) == 'cpu'  # the module does not allow it
    assert config.choose_backend('neighborhood', 'reference', x, natten_kernel_size=7) == 'reference'
    assert config.choose_backend('neighborhood', 'fast', x, dropout=True, natten_kernel_size=7) == 'reference'
    with config.force_backend('cuda'):
        assert config.choose_backend('neighborhood', 'fast', x, natten_kernel_size=7) == 'cuda'

    module = NeighborhoodAttention(16, 2, 7).double()
    torch.nn.init.normal_(module.relative_position_bias_table)
    y = torch.randn(2, 16, 9, 11, dtype=torch.double)
    assert module.backend(y) == 'natten'
    out = module(y)
    assert len(calls) == 2
    module.attn_impl = 'reference'
    torch.testing.assert_close(out, module(y), atol=1e-12, rtol=0)
    module.attn_impl = 'fast'
    module.use_natten = False
    assert module.backend(y) == 'cpu'
    torch.testing.assert_close(module(y), out, atol=1e-12, rtol=0)
    assert len(calls) == 2


def test_natten_that_is_missing_fails_or_disagrees_is_not_used(fake_natten, monkeypatch):
    install, calls = fake_natten
    x = torch.empty(1)
    for kwargs, message in ((dict(error=RuntimeError('no CPU kernels')), 'cannot run on cpu .no CPU kernels'),
                            (dict(wrong=True), 'disagrees')):
        install(**kwargs)
        with pytest.warns(UserWarning, match=message):
            assert config.choose_backend('neighborhood', 'fast', x, natten_kernel_size=7) == 'cpu'
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # probed once
            assert config.choose_backend('neighborhood', 'fast', x, natten_kernel_size=7) == 'cpu'
    install()
    monkeypatch.setitem(sys.modules, 'natten', None)  # not installed
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert config.choose_backend('neighborhood', 'fast', x, natten_kernel_size=7) == 'cpu'
    with pytest.raises(RuntimeError, match='natten is not usable for kernel size 7'):
        natten.neighborhood_attention(*torch.randn(3, 1, 2, 9, 9, 4), torch.randn(2, 13, 13), 7)


def test_natten_path_compiles_without_graph_breaks(fake_natten):
    """The probe is a constant to dynamo (assume_constant_result): one graph."""
    install, calls = fake_natten
    install()
    module = NeighborhoodAttention(16, 2, 7).eval()
    y = torch.randn(1, 16, 9, 11)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(module, fullgraph=True, backend='eager')
        with torch.no_grad():
            eager, ours = module(y), compiled(y)
    finally:
        torch._dynamo.reset()
    assert len(calls) == 3  # the probe, eager, the trace
    torch.testing.assert_close(ours, eager, atol=1e-6, rtol=0)
