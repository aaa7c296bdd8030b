"""The window attention ops: torch.library registration, gradients, fallbacks."""
import warnings

import pytest
import torch

from mmdat.ops import build, config
from mmdat.ops.window import cpu, reference

needs_kernels = pytest.mark.skipif(not cpu.LIBRARY.available(), reason='no C compiler')

#: batch, map, heads, head dim, window, shift: padding on either side or none, shifted or not
CASES = [(2, (9, 17), 3, 4, 7, 4), (1, (14, 7), 2, 8, 7, 0), (1, (5, 3), 1, 4, 3, 2)]


def _operands(B, size, heads, d, w, dtype=torch.double, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C3 = 3 * heads * d
    qkv = torch.randn(B, *size, C3, generator=gen, dtype=dtype)
    bias = torch.randn(C3, generator=gen, dtype=dtype)
    table = torch.randn(heads, (2 * w - 1) ** 2, generator=gen, dtype=dtype)
    return qkv, bias, table


@needs_kernels
@pytest.mark.parametrize('case', CASES, ids=lambda c: f'{c[1][0]}x{c[1][1]}-w{c[4]}-s{c[5]}')
def test_opcheck(case):
    """Also with the table as the module passes it: its parameter transposed (not contiguous)."""
    B, size, heads, d, w, s = case
    qkv, bias, table = _operands(B, size, heads, d, w)
    args = [qkv.requires_grad_(), bias.requires_grad_(), table.t().contiguous().requires_grad_().t()]
    args += [heads, w, s, d ** -0.5]
    torch.library.opcheck(cpu.window_attention_forward, args)


@needs_kernels
@pytest.mark.parametrize('case', CASES, ids=lambda c: f'{c[1][0]}x{c[1][1]}-w{c[4]}-s{c[5]}')
def test_kernels_match_the_reference_float64(case):
    B, size, heads, d, w, s = case
    operands = [t.requires_grad_() for t in _operands(B, size, heads, d, w)]
    gout = torch.randn(B, *size, heads * d, dtype=torch.double)
    results = []
    for fn in (reference.window_attention, cpu.window_attention):
        out = fn(*operands, heads, w, s, d ** -0.5)
        results.append([out, *torch.autograd.grad((out * gout).sum(), operands, allow_unused=True,
                                                  materialize_grads=True)])
    for a, b, name in zip(*results, ('out', 'qkv', 'qkv_bias', 'table')):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=0, msg=name)


def test_shift_mask_is_built_once_per_size_and_device():
    a = reference.shift_mask(14, 21, 7, 4, torch.device('cpu'))
    assert reference.shift_mask(14, 21, 7, 4, torch.device('cpu')) is a
    assert reference.shift_mask(21, 14, 7, 4, torch.device('cpu')).shape == (6, 49, 49)
    assert a.shape == (6, 49, 49) and set(a.unique().tolist()) == {-100.0, 0.0}


def test_bad_input_falls_back_or_fails_clearly(monkeypatch):
    """Tensors the kernels cannot take run the reference formulation with one warning; a
    missing compiler runs it silently (the build warned); integer tensors and inconsistent
    shapes are errors."""
    monkeypatch.setattr(config, '_warned', set())
    qkv, bias, table = (t.to('meta') for t in _operands(1, (9, 10), 2, 4, 7))
    with pytest.warns(UserWarning, match='window attention op got a meta tensor; running the reference'):
        out = cpu.window_attention(qkv, bias, table, 2, 7, 4, 0.5)
    assert out.shape == (1, 9, 10, 8) and out.device.type == 'meta'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        cpu.window_attention(qkv, bias, table, 2, 7, 4, 0.5)  # warned once
    qkv, bias, table = _operands(1, (9, 10), 2, 4, 7)
    with pytest.raises(TypeError, match='floating-point tensors, got torch.int64'):
        cpu.window_attention(qkv.long(), bias, table, 2, 7, 4, 0.5)
    with pytest.raises(ValueError, match='inconsistent arguments'):
        cpu.window_attention(qkv, bias, table[:, :-1], 2, 7, 4, 0.5)
    monkeypatch.setenv('MMDAT_NATIVE_OPS', '0')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        torch.testing.assert_close(cpu.window_attention(qkv, bias, table, 2, 7, 4, 0.5),
                                   reference.window_attention(qkv, bias, table, 2, 7, 4, 0.5))


@needs_kernels
def test_half_precision_runs_in_float32():
    qkv, bias, table = _operands(1, (9, 10), 2, 8, 7, torch.float)
    out = cpu.window_attention(qkv.bfloat16(), bias.bfloat16(), table.bfloat16(), 2, 7, 4, 0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.window_attention(qkv, bias, table, 2, 7, 4, 0.5),
                               atol=0.05, rtol=0.05)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert cpu.window_attention(qkv, bias, table, 2, 7, 4, 0.5).dtype == torch.float32


@needs_kernels
def test_compiles_without_graph_breaks():
    qkv, bias, table = (t.requires_grad_() for t in _operands(1, (9, 10), 2, 4, 7))

    def fn(qkv, bias, table):
        return cpu.window_attention(qkv, bias, table, 2, 7, 4, 0.5)

    compiled = torch.compile(fn, fullgraph=True, backend='aot_eager', dynamic=True)
    for size in ((9, 10), (12, 15)):
        qkv = torch.randn(1, *size, 24, dtype=torch.double, requires_grad=True)
        eager, ours = fn(qkv, bias, table), compiled(qkv, bias, table)
        torch.testing.assert_close(ours, eager, atol=1e-12, rtol=0)
        for a, b in zip(torch.autograd.grad((eager * eager).sum(), (qkv, bias, table)),
                        torch.autograd.grad((ours * ours).sum(), (qkv, bias, table))):
            torch.testing.assert_close(b, a, atol=1e-12, rtol=0)


def test_a_failed_build_warns_once_and_runs_the_reference(monkeypatch, tmp_path):
    monkeypatch.setenv('MMDAT_CACHE_DIR', str(tmp_path))
    monkeypatch.setenv('CC', str(tmp_path / 'no-such-compiler'))
    library = build.Library(cpu.LIBRARY.name, cpu.LIBRARY.source_files, cpu.LIBRARY.signatures)
    monkeypatch.setattr(cpu, 'LIBRARY', library)
    qkv, bias, table = (t.requires_grad_() for t in _operands(1, (9, 10), 2, 4, 7))
    with pytest.warns(UserWarning, match='native window_attention kernels unavailable'):
        out = cpu.window_attention(qkv, bias, table, 2, 7, 4, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        again = cpu.window_attention(qkv, bias, table, 2, 7, 4, 0.5)
    torch.testing.assert_close(out, reference.window_attention(qkv, bias, table, 2, 7, 4, 0.5))
    again.sum().backward()  # training goes on
    assert qkv.grad is not None and not list(tmp_path.glob('*.so'))
