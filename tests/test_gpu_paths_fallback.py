"""The CUDA paths' fallback where FlexAttention cannot be compiled (mmdat.ops.flex.with_fallback),
their compiled branch up to Inductor, and the GPU benchmark's compile and captured-gradient
sections, on CPU.

On CPU the CUDA paths call FlexAttention's dense math path where CUDA calls the compiled
entry: the fallback tests make that call raise what a failed kernel build raises.
"""
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InductorError

from mmdat.ops import config, flex
from mmdat.ops.deformable import cuda as deformable_cuda, reference as deformable_reference
from mmdat.ops.neighborhood import cuda as neighborhood_cuda, reference as neighborhood_reference

from conftest import REPO, subprocess_env


class OutOfResources(RuntimeError):
    """Stands for Triton's launch error (``triton.runtime.errors.OutOfResources``)."""


OutOfResources.__module__ = 'triton.runtime.errors'


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    monkeypatch.setattr(flex, '_failures', {})
    monkeypatch.setattr(config, '_warned', set())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the dense math path runs many small ops
    yield
    torch.set_num_threads(threads)


def _inductor_error():
    return InductorError(RuntimeError('Cannot find a working triton installation.\nMore details'), None)


def test_compile_failure_names_build_errors_only():
    assert flex.compile_failure(_inductor_error()) == 'RuntimeError: Cannot find a working triton installation.'
    wrapped = BackendCompilerFailed(lambda *a: None, ValueError('lowering failed'), None)
    assert flex.compile_failure(wrapped) == 'ValueError: lowering failed'
    launch = OutOfResources('out of resource: shared memory, Required: 262144, Hardware limit: 232448')
    assert flex.compile_failure(launch).startswith('OutOfResources: out of resource: shared memory')
    try:  # a plain error raised while handling a Triton one
        try:
            raise launch
        except OutOfResources:
            raise RuntimeError('kernel launch failed')
    except RuntimeError as e:
        assert flex.compile_failure(e).startswith('OutOfResources')
    # errors a fallback would not cure
    assert flex.compile_failure(ValueError('inconsistent shapes')) is None
    assert flex.compile_failure(torch.OutOfMemoryError('CUDA out of memory')) is None


def _deformable_operands():
    g = torch.Generator().manual_seed(0)
    B, M, G, d, H, W, Ns = 2, 4, 2, 8, 9, 11, 30
    q = torch.randn(B * M, d, H, W, generator=g, dtype=torch.float64)
    k = torch.randn(B * M, d, Ns, generator=g, dtype=torch.float64) * d ** -0.5
    v = torch.randn(B * M, d, Ns, generator=g, dtype=torch.float64)
    pos = torch.rand(B * G, Ns, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2
    table = torch.randn(M, 7, 9, generator=g, dtype=torch.float64)
    qy, qx = torch.linspace(-1, 1, H, dtype=torch.float64), torch.linspace(-1, 1, W, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v, pos, table)], (qy, qx, G)


def _failing_flex(monkeypatch, error):
    calls = []

    def flex_call(*args):
        calls.append(1)
        raise error
    monkeypatch.setattr(flex, '_dense_flex_attention', flex_call)
    return calls


def _check_against_reference(out, ref, inputs):
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        assert float((a - b).detach().abs().max()) < 1e-12 * float(b.detach().abs().max())


def test_deformable_cuda_path_falls_back_to_sdpa_bias_once_flex_fails_to_compile(monkeypatch, caplog):
    (q, k, v, pos, table), (qy, qx, G) = _deformable_operands()
    calls = _failing_flex(monkeypatch, _inductor_error())
    with pytest.warns(UserWarning, match=r'deformable attention could not be compiled \(RuntimeError: Cannot find a '
                                         r'working triton installation.\); running .*deformable_attention_sdpa_bias'):
        out = deformable_cuda.deformable_attention(q, k, v, pos, table, qy, qx, G)
    assert flex.compile_failures() == {'deformable': 'RuntimeError: Cannot find a working triton installation.'}
    assert 'More details' in caplog.text  # the whole error, logged once
    ref = deformable_reference.deformable_attention(q, k, v, pos, table, qy, qx, G)
    _check_against_reference(out, ref, (q, k, v, pos, table))

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # warned once: not again
        again = deformable_cuda.deformable_attention(q, k, v, pos, table, qy, qx, G)
    assert calls == [1]  # no second try to compile
    assert torch.equal(again, out)


def test_neighborhood_cuda_path_falls_back_to_the_gather_formulation(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 12, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    table = torch.randn(2, 13, 13, generator=g, dtype=torch.float64).requires_grad_()
    _failing_flex(monkeypatch, OutOfResources('out of resource: shared memory'))
    with pytest.warns(UserWarning, match='neighborhood attention could not be compiled .*OutOfResources'):
        out = neighborhood_cuda.neighborhood_attention(q, k, v, table, 7)
    assert set(flex.compile_failures()) == {'neighborhood'}
    _check_against_reference(out, neighborhood_reference.neighborhood_attention(q, k, v, table, 7), (q, k, v, table))


def test_mmdat_flex_0_runs_the_fallbacks_without_trying_flex(monkeypatch):
    (q, k, v, pos, table), (qy, qx, G) = _deformable_operands()
    calls = _failing_flex(monkeypatch, AssertionError('FlexAttention must not run with MMDAT_FLEX=0'))
    monkeypatch.setenv('MMDAT_FLEX', '0')
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # chosen, not a failure: no warning
        out = deformable_cuda.deformable_attention(q, k, v, pos, table, qy, qx, G)
        tokens = torch.zeros(1, 2, 7, 8, 4, dtype=torch.float64)
        neighborhood_cuda.neighborhood_attention(tokens, tokens, tokens, torch.zeros(2, 13, 13, dtype=torch.float64), 7)
    assert calls == [] and flex.compile_failures() == {}
    _check_against_reference(out, deformable_reference.deformable_attention(q, k, v, pos, table, qy, qx, G),
                             (q, k, v, pos, table))


def test_other_errors_are_not_taken_for_compile_failures(monkeypatch):
    (q, k, v, pos, table), (qy, qx, G) = _deformable_operands()
    _failing_flex(monkeypatch, RuntimeError('CUDA error: an illegal memory access was encountered'))
    with pytest.raises(RuntimeError, match='illegal memory access'):
        deformable_cuda.deformable_attention(q, k, v, pos, table, qy, qx, G)
    assert flex.compile_failures() == {}


def test_inside_an_enclosing_compile_nothing_is_caught(monkeypatch):
    # while Dynamo traces, a try / except around the traced call is not an option: the
    # enclosing compile sees the error
    (q, k, v, pos, table), (qy, qx, G) = _deformable_operands()
    _failing_flex(monkeypatch, _inductor_error())
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    with pytest.raises(InductorError):
        flex.with_fallback('deformable', deformable_cuda.deformable_attention_flex,
                           deformable_cuda.deformable_attention_sdpa_bias, q, k, v, pos, table, qy, qx, G)
    assert flex.compile_failures() == {}


def _backward_fails(gm, example_inputs):
    raise RuntimeError('no backward kernel for this GPU')


def _compiled_with_failing_backward():
    def f(x):
        return (x.sin() * 2).sum()
    return torch.compile(f, backend=aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=_backward_fails))


def test_backward_compile_failures_surface_in_the_forward_call():
    # What lets with_fallback catch them: with the backward lowered with the forward, its
    # failure comes out of the compiled call; AOTAutograd's default lowers it at the first
    # backward, out of any caller's reach.
    x = torch.randn(5, requires_grad=True)
    with flex._lower_backward_with_forward(), pytest.raises(BackendCompilerFailed) as failure:
        _compiled_with_failing_backward()(x)
    assert flex.compile_failure(failure.value) == 'RuntimeError: no backward kernel for this GPU'

    loss = _compiled_with_failing_backward()(x)  # lazily: the forward runs
    with pytest.raises(RuntimeError, match='no backward kernel'):
        loss.backward()


@pytest.fixture
def fused_branch_on_cpu(monkeypatch):
    """The CUDA paths take flex_attention_call's CUDA branch (Dynamo, AOTAutograd) for CPU
    tensors, compiled with ``aot_eager`` in place of Inductor: the traced graphs then run the
    FlexAttention op's own dense implementation, forward and backward."""
    import torch.nn.attention.flex_attention as flex_attention_module

    compiled = {}
    monkeypatch.setattr(flex, '_compiled',
                        lambda entry: compiled.setdefault(entry, torch.compile(entry, backend='aot_eager')))
    monkeypatch.setattr(flex_attention_module, '_validate_device', lambda *args: None)  # CPU refuses a backward

    def fused(entry, q, k, v, score_mod=None, buffers=(), block_mask=None, scale=1.0):
        return flex._fused_flex_attention(entry, q, k, v, score_mod, buffers, block_mask, scale)
    for module in (deformable_cuda, neighborhood_cuda):
        monkeypatch.setattr(module, 'flex_attention_call', fused)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs(entry):
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(entry.__code__))


def test_cuda_branch_traces_and_recompiles_once_with_dynamic_sizes(fused_branch_on_cpu):
    # What the GPU adds to this is Inductor's and Triton's lowering: Dynamo's trace of the
    # entries (score_mod and its tensors, block mask), the backward lowered with the forward,
    # the recompile with dynamic sizes at the second map size and its reuse at the third run here.
    graphs = []
    for H, W in ((9, 11), (12, 7), (10, 13)):
        g = torch.Generator().manual_seed(0)
        B, M, G, d, Ns = 1, 4, 2, 8, H * W // 4
        q = torch.randn(B * M, d, H, W, generator=g, dtype=torch.float64)
        k = torch.randn(B * M, d, Ns, generator=g, dtype=torch.float64) * d ** -0.5
        v = torch.randn(B * M, d, Ns, generator=g, dtype=torch.float64)
        pos = torch.rand(B * G, Ns, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2
        table = torch.randn(M, 2 * H - 1, 2 * W - 1, generator=g, dtype=torch.float64)
        inputs = [t.requires_grad_() for t in (q, k, v, pos, table)]
        qy, qx = torch.linspace(-1, 1, H, dtype=torch.float64), torch.linspace(-1, 1, W, dtype=torch.float64)
        out = deformable_cuda.deformable_attention(q, k, v, pos, table, qy, qx, G)
        _check_against_reference(out, deformable_reference.deformable_attention(q, k, v, pos, table, qy, qx, G),
                                 inputs)
        graphs.append(_graphs(deformable_cuda._flex_entry))
    for H, W in ((9, 20), (17, 35), (12, 40)):  # 1 x 2, 3 x 3, 2 x 3 tiles of 8 x 16
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, H, W, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
        table = torch.randn(2, 13, 13, generator=g, dtype=torch.float64).requires_grad_()
        out = neighborhood_cuda.neighborhood_attention(q, k, v, table, 7)
        _check_against_reference(out, neighborhood_reference.neighborhood_attention(q, k, v, table, 7),
                                 (q, k, v, table))
        graphs.append(_graphs(neighborhood_cuda._flex_entry))
    assert graphs == [1, 2, 2, 1, 2, 2]
    assert flex.compile_failures() == {}


def test_gpu_benchmark_smoke_runs_the_compile_and_captured_sections(tmp_path):
    out = tmp_path / 'bench.json'
    script = osp.join(REPO, 'tools', 'analysis_tools', 'gpu_benchmark.py')
    proc = subprocess.run([sys.executable, script, '--smoke', '--sections', 'compile', 'captured', '--out', str(out)],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    errors = [r for section in ('compile', 'captured') for r in report[section] if 'error' in r]
    assert errors == [], errors
    compile_rows = report['compile']
    sizes = report['settings']['compile_sizes']
    assert [(r['block'], r['size']) for r in compile_rows] == [
        (block, size) for block in ('datpp_t.s2.D', 'datpp_t.s2.N', 'dat_t.s1.L') for size in sizes]
    assert all(r['first_s'] > 0 and r['steady_ms'] > 0 and r['out_error'] < 5e-2 for r in compile_rows)
    assert len({tuple(r['map']) for r in compile_rows if r['block'] == 'datpp_t.s2.D'}) == 3  # three map sizes
    variants = {r['variant'] for r in report['captured']}
    assert variants == {'all', 'both detached', 'no bias', 'sdpa_bias', 'pos detached', 'table detached'}
    assert all(r['ms'] > 0 for r in report['captured'])
    shares = report['captured_shares']
    assert [s['block'] for s in shares] == ['datpp_t.s4.D']
    assert shares[0]['captured_grads_ms'] is not None and shares[0]['backward_ms'] is not None
    assert report['compile_failures'] == {}
    assert 'compile: first calls' in proc.stdout and 'captured' in proc.stdout
