"""The deformable attention ops: schema, fake tensors, autograd registration and values of
every gradient against the official formulation in float64; bad input."""
import subprocess
import sys
import warnings

import pytest
import torch

from mmdat.ops import build, config
from mmdat.ops.deformable import cpu, reference

NATIVE = cpu.native_library() is not None
FUSED = NATIVE and build.blas() is not None


@pytest.fixture(params=[pytest.param('fused', marks=pytest.mark.skipif(not FUSED, reason='no C compiler or no MKL')),
                        pytest.param('native-bias', marks=pytest.mark.skipif(not NATIVE, reason='no C compiler')),
                        'torch-bias'])
def cpu_strategy(request):
    """The test runs with the implementation inside the ops capped to each of
    ``config.DEFORMABLE_CPU_STRATEGIES`` in turn."""
    with config.deformable_cpu_strategy(request.param):
        yield request.param


def _operands(B=2, G=2, Mg=2, d=8, H=6, W=13, Ns=20, table=(9, 11), dtype=torch.double, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qy = reference.axis_grid(H, False, 'pp', dtype=dtype)
    qx = reference.axis_grid(W, False, 'pp', dtype=dtype)
    pos = torch.rand(B * G, Ns, 2, generator=gen, dtype=dtype) * 2.4 - 1.2
    q = torch.randn(B * G * Mg, d, H, W, generator=gen, dtype=dtype)
    k, v = (torch.randn(B * G * Mg, d, Ns, generator=gen, dtype=dtype) for _ in range(2))
    tab = None if table is None else torch.randn(G * Mg, *table, generator=gen, dtype=dtype)
    return q, k, v, pos, tab, qy, qx, G


@pytest.mark.parametrize('table', [(9, 11), None], ids=['table', 'no-table'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=['f32', 'f64'])
def test_opcheck(cpu_strategy, table, dtype):
    """``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch
    with dynamic shapes) on the forward op with gradients, and on the backward op."""
    q, k, v, pos, tab, qy, qx, G = _operands(table=table, dtype=dtype)
    inputs = [t.requires_grad_() for t in (q, k, v, pos) + ((tab, ) if tab is not None else ())]
    args = (q, k, v, pos, tab, qy, qx, G, 300)  # 300 logits per tile: several tiles
    torch.library.opcheck(cpu.deformable_attention_forward, args)
    with torch.no_grad():
        out, lse = cpu.deformable_attention_forward(*args)
    detached = [t.detach() for t in (q, k, v, pos)] + [None if tab is None else tab.detach()]
    torch.library.opcheck(cpu.deformable_attention_backward,
                          (torch.randn_like(out), *detached, qy, qx, out, lse, G, 300))
    assert all(t.requires_grad for t in inputs)


@pytest.mark.parametrize('tile', [None, 200], ids=['default-tiles', 'many-tiles'])
@pytest.mark.parametrize('table', [(9, 11), None], ids=['table', 'no-table'])
def test_values_and_every_gradient_match_the_reference_float64(cpu_strategy, tile, table):
    """Output, log-sum-exp and the gradients w.r.t. q, k, v, the positions and the table, on
    a map whose rows (200 logits per tile: 10 queries of 13-column rows) span several tiles."""
    q, k, v, pos, tab, qy, qx, G = _operands(table=table)
    inputs = [t.requires_grad_() for t in (q, k, v) + ((pos, tab) if tab is not None else ())]  # pos: bias only
    gout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=q.dtype)
    ref = reference.deformable_attention(q, k, v, pos, tab, qy, qx, G)
    out, lse = cpu.deformable_attention_forward(q, k, v, pos, tab, qy, qx, G, tile)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    logits = torch.einsum('bcm,bcn->bmn', q.flatten(2), k)
    if tab is not None:
        logits = logits + reference.position_bias(pos, tab, qy, qx, G)
    torch.testing.assert_close(lse.flatten(1), logits.logsumexp(-1), atol=1e-12, rtol=0)
    expected = torch.autograd.grad((ref * gout).sum(), inputs)
    got = torch.autograd.grad((out * gout).sum(), inputs)
    for name, a, b in zip('q k v pos table'.split(), expected, got):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=0, msg=name)
    if tab is not None:
        assert got[3].abs().sum() > 0 and got[4].abs().sum() > 0


def test_float32_op_is_as_close_to_float64_as_the_reference():
    q, k, v, pos, tab, qy, qx, G = _operands(dtype=torch.double)
    exact = reference.deformable_attention(q, k, v, pos, tab, qy, qx, G)
    f32 = [t.float() for t in (q, k, v, pos, tab, qy, qx)]
    for attention in (reference.deformable_attention, cpu.deformable_attention):
        torch.testing.assert_close(attention(*f32, G).double(), exact, atol=1e-5, rtol=0)


def test_unsupported_dtypes_are_a_clear_error_or_computed_in_float32():
    q, k, v, pos, tab, qy, qx, G = _operands(dtype=torch.float32)
    with pytest.raises(TypeError, match=r'float32 or float64 operands of one dtype .*bfloat16'):
        cpu.deformable_attention_forward(q.bfloat16(), k, v, pos, tab, qy, qx, G)
    with pytest.raises(TypeError, match='float32 or float64'):
        cpu.deformable_attention_forward(q.double(), k, v, pos, tab, qy, qx, G)
    half = cpu.deformable_attention(q.half(), k.half(), v.half(), pos, tab, qy, qx, G)  # the wrapper casts
    assert half.dtype == torch.half
    torch.testing.assert_close(half.float(), cpu.deformable_attention(q, k, v, pos, tab, qy, qx, G),
                               atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match='inconsistent shapes'):
        cpu.deformable_attention(q, k[:, :, 1:], v, pos, tab, qy, qx, G)
    with pytest.raises(ValueError, match='inconsistent shapes'):
        cpu.deformable_attention(q, k, v, pos, tab, qy[1:], qx, G)
    with pytest.raises(TypeError, match='take floating-point tensors, got torch.int32'):
        cpu.deformable_attention(q.int(), k.int(), v.int(), pos, tab, qy, qx, G)


def test_any_layout_is_accepted():
    """Strided operands (channels-last queries, transposed keys) give the contiguous result."""
    q, k, v, pos, tab, qy, qx, G = _operands()
    expected = cpu.deformable_attention(q, k, v, pos, tab, qy, qx, G)
    q_cl = q.contiguous(memory_format=torch.channels_last)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_cl.is_contiguous() and not k_t.is_contiguous()
    out = cpu.deformable_attention(q_cl, k_t, v, pos, tab.transpose(1, 2).contiguous().transpose(1, 2), qy, qx, G)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-13, rtol=0)


def test_devices_without_an_op_run_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(config, '_warned', set())
    x = torch.empty(1, device='meta')
    with pytest.warns(UserWarning, match='no deformable attention op for meta tensors'):
        assert config.choose_backend('deformable', 'fast', x) == 'reference'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert config.choose_backend('deformable', 'fast', x) == 'reference'  # warned once only
    assert config.choose_backend('deformable', 'fast', torch.empty(1)) == 'cpu'
    assert config.choose_backend('deformable', 'fast', torch.empty(1), dropout=True) == 'reference'
    assert config.choose_backend('deformable', 'reference', torch.empty(1)) == 'reference'
    with config.attention_impl('reference', 'deformable'):
        assert config.choose_backend('deformable', 'fast', torch.empty(1)) == 'reference'
        assert config.choose_backend('window', 'fast', torch.empty(1)) == 'cpu'
        with config.attention_impl('fast'):
            assert config.choose_backend('deformable', 'reference', torch.empty(1)) == 'cpu'
        assert config.choose_backend('deformable', 'fast', torch.empty(1)) == 'reference'
    with pytest.raises(ValueError, match='attention kinds'):
        config.attention_impl('fast', 'flash').__enter__()
    with pytest.raises(ValueError, match='attn_impl'):
        config.attention_impl('flash').__enter__()


def test_force_backend_runs_that_backend_on_any_device():
    x = torch.empty(1)
    with config.force_backend('cuda'):
        assert config.choose_backend('deformable', 'fast', x) == 'cuda'
        assert config.choose_backend('dwconv', 'fast', torch.empty(1, device='meta')) == 'cuda'
        # the reference formulation stays where it is chosen
        assert config.choose_backend('deformable', 'reference', x) == 'reference'
        assert config.choose_backend('deformable', 'fast', x, dropout=True) == 'reference'
        with config.attention_impl('reference', 'window'):
            assert config.choose_backend('window', 'fast', x) == 'reference'
    with config.force_backend('cuda', 'window'):
        assert config.choose_backend('window', 'fast', x) == 'cuda'
        assert config.choose_backend('deformable', 'fast', x) == 'cpu'
    assert config.choose_backend('window', 'fast', x) == 'cpu'
    with pytest.raises(ValueError, match='force_backend'):
        config.force_backend('cpu')
    with pytest.raises(ValueError, match='attention kinds'):
        config.force_backend('cuda', 'flash')


@pytest.mark.skipif(not FUSED, reason='no C compiler or no MKL')
def test_deformable_cpu_strategy_selects_the_implementation():
    q, k, v, pos, tab, qy, qx, G = _operands()
    expected = {'fused': (cpu._FusedAttention, cpu._NativeBias), 'native-bias': (type(None), cpu._NativeBias),
                'torch-bias': (type(None), cpu._TorchBias)}
    assert tuple(expected) == config.DEFORMABLE_CPU_STRATEGIES
    for strategy, (fused, bias) in expected.items():
        with config.deformable_cpu_strategy(strategy):
            assert isinstance(cpu._fused(q, pos, tab, qy, qx, G, None), fused), strategy
            assert isinstance(cpu._make_bias(pos, tab, qy, qx, G), bias), strategy
        assert isinstance(cpu._fused(q, pos, tab, qy, qx, G, None), cpu._FusedAttention)  # restored
    with pytest.raises(ValueError, match='deformable_cpu_strategy'):
        config.deformable_cpu_strategy('gpu').__enter__()


def test_a_failed_kernel_build_falls_back_with_a_warning(monkeypatch, tmp_path):
    """No working compiler: one warning, and the op computes the same with PyTorch tiles."""
    q, k, v, pos, tab, qy, qx, G = _operands()
    expected = cpu.deformable_attention(q, k, v, pos, tab, qy, qx, G)
    monkeypatch.setenv('CC', str(tmp_path / 'no-such-compiler'))
    monkeypatch.setenv('MMDAT_CACHE_DIR', str(tmp_path))  # nothing cached: a build is needed
    cpu.native_library.cache_clear()
    try:
        with pytest.warns(UserWarning, match='native deformable_attention kernels unavailable'):
            out = cpu.deformable_attention(q, k, v, pos, tab, qy, qx, G)
        assert cpu.native_library() is None
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            again = cpu.deformable_attention(q, k, v, pos, tab, qy, qx, G)
    finally:
        monkeypatch.undo()
        cpu.native_library.cache_clear()
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(again, expected, atol=1e-12, rtol=0)


BARE_MACHINE = """
import sys
for name in ('mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'cv2'):
    sys.modules[name] = None  # importing them fails, as on a GPU machine with torch only
import torch
import mmdat
from mmdat.ops import deformable
assert not mmdat.OPENMMLAB
loaded = sorted({k.split('.')[0] for k, m in sys.modules.items() if m is not None})
assert not set(loaded) & {'mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'cv2'}, loaded
q, k, v = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 6), torch.randn(2, 4, 6)
pos, grid = torch.rand(1, 6, 2) * 2 - 1, torch.linspace(-1, 1, 3)
out = deformable.deformable_attention('cpu', q, k, v, pos, None, grid, torch.linspace(-1, 1, 5), 1)
assert out.shape == (2, 4, 3, 5)
"""


def test_ops_import_and_run_with_torch_alone():
    """``import mmdat.ops`` on a machine without the OpenMMLab stack (the GPU benchmark's)."""
    run = subprocess.run([sys.executable, '-c', BARE_MACHINE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
