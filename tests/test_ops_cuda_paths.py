"""The CUDA paths of mmdat.ops, verified on CPU.

The deformable and neighborhood attention run FlexAttention's ``score_mod`` / ``mask_mod``
through its dense math path (forward and backward, gradients to the captured table and
positions included; see :mod:`mmdat.ops.flex`), the window attention SDPA's math backend;
each against the official formulation in float64. What only the GPU can show (the fused
kernels, the block mask's sparsity, the timings) is in tools/analysis_tools/gpu_benchmark.py,
whose ``--smoke`` run is tested here as on a machine with torch and mmengine only.
"""
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch

from mmdat.ops.deformable import reference as deformable_reference
from mmdat.ops.deformable.cuda import deformable_attention_flex, deformable_attention_sdpa_bias
from mmdat.ops.neighborhood.cuda import BLOCK, neighborhood_attention_flex, tiled_neighborhood
from mmdat.ops.neighborhood.reference import neighborhood_attention as neighborhood_reference
from mmdat.ops.window import reference as window_reference
from mmdat.ops.window.cuda import window_attention_sdpa

from conftest import NANO_PP, NANO_V1, REPO, subprocess_env


@pytest.fixture(autouse=True)
def _one_thread():
    # the dense math path runs many small ops: on a shared machine, OpenMP workers waking
    # for each of them made these tests 4-5x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _max_errors(outputs, inputs, grad_out, reference_outputs):
    """Largest difference of the outputs and of the gradients w.r.t. every input."""
    grads = torch.autograd.grad(outputs, inputs, grad_out)
    reference_grads = torch.autograd.grad(reference_outputs, inputs, grad_out.to(reference_outputs.dtype))
    errors = [float((outputs.detach().double() - reference_outputs.detach().double()).abs().max())]
    errors += [float((g.double() - r.double()).abs().max()) for g, r in zip(grads, reference_grads)]
    scales = [float(reference_outputs.abs().max())] + [float(r.abs().max()) for r in reference_grads]
    assert all(s > 0 for s in scales)  # every gradient reaches its input
    return errors, scales


def _deformable_operands(dtype, B=2, M=4, G=2, d=8, H=12, W=13, Hk=11, Wk=13, Th=9, Tw=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B * M, d, H, W, generator=g, dtype=dtype)
    k = torch.randn(B * M, d, Hk * Wk, generator=g, dtype=dtype) * d ** -0.5
    v = torch.randn(B * M, d, Hk * Wk, generator=g, dtype=dtype)
    # positions beyond [-1, 1]: corners off the table, some keys wholly outside it
    pos = torch.rand(B * G, Hk * Wk, 2, generator=g, dtype=dtype) * 3.2 - 1.6
    table = torch.randn(M, Th, Tw, generator=g, dtype=dtype)
    qy = torch.linspace(-1, 1, H, dtype=dtype)
    qx = torch.linspace(-1, 1, W, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, pos, table)], (qy, qx, G)


@pytest.mark.parametrize('path', [deformable_attention_flex, deformable_attention_sdpa_bias])
def test_deformable_cuda_paths_match_reference_float64(path):
    # 156 queries x 143 keys: more than one 128-block along each
    (q, k, v, pos, table), (qy, qx, G) = _deformable_operands(torch.float64)
    out = path(q, k, v, pos, table, qy, qx, G)
    ref = deformable_reference.deformable_attention(q, k, v, pos, table, qy, qx, G)
    errors, scales = _max_errors(out, (q, k, v, pos, table), torch.randn_like(out), ref)
    assert max(e / s for e, s in zip(errors, scales)) < 1e-12, errors


def test_deformable_flex_float32_and_without_table():
    (q, k, v, pos, table), (qy, qx, G) = _deformable_operands(torch.float64, H=9, W=15, Hk=8, Wk=18, seed=1)
    ref = deformable_reference.deformable_attention(q, k, v, pos, table, qy, qx, G)
    q32, k32, v32, pos32, table32 = (t.detach().float().requires_grad_() for t in (q, k, v, pos, table))
    out = deformable_attention_flex(q32, k32, v32, pos32, table32, qy.float(), qx.float(), G)
    assert out.dtype == torch.float32
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q32, k32, v32, pos32, table32), grad_out.float())
    ref_grads = torch.autograd.grad(ref, (q, k, v, pos, table), grad_out)
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        assert float((a.double() - b).abs().max()) < 1e-4 * float(b.abs().max())

    plain = deformable_attention_flex(q, k, v, pos, None, qy, qx, G)
    plain_ref = deformable_reference.deformable_attention(q, k, v, pos, None, qy, qx, G)
    assert float((plain - plain_ref).abs().max()) < 1e-12


def test_deformable_flex_under_autocast_runs_in_its_dtype():
    (q, k, v, pos, table), (qy, qx, G) = _deformable_operands(torch.float32, H=6, W=7, Hk=5, Wk=6, seed=2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = deformable_attention_flex(q, k, v, pos, table, qy, qx, G)
    assert out.dtype == torch.bfloat16  # no silent upcast of the attention
    ref = deformable_reference.deformable_attention(q, k, v, pos, table, qy, qx, G)
    assert float((out.float() - ref).abs().max()) < 3e-2 * float(ref.abs().max())
    grads = torch.autograd.grad(out.float().sum(), (table, pos))
    assert all(g.dtype == torch.float32 and bool(g.abs().sum() > 0) for g in grads)


def test_deformable_flex_rejects_inconsistent_shapes():
    (q, k, v, pos, table), (qy, qx, G) = _deformable_operands(torch.float32, H=4, W=4, Hk=3, Wk=3)
    with pytest.raises(ValueError, match='inconsistent shapes'):
        deformable_attention_flex(q, k, v, pos, table[:3], qy, qx, G)


def _neighborhood_operands(dtype, B, heads, H, W, d, kernel_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, heads, H, W, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    span = 2 * kernel_size - 1
    table = torch.randn(heads, span, span, generator=g, dtype=dtype).requires_grad_()
    return q, k, v, table


@pytest.mark.parametrize('H, W, kernel_size', [
    (17, 35, 7),  # 3 x 3 tiles of 8 x 16: 9 query blocks, key blocks clamped at every border
    (7, 7, 7),  # the map is one neighborhood
    (8, 9, 3),
])
def test_neighborhood_flex_matches_reference_float64(H, W, kernel_size):
    q, k, v, table = _neighborhood_operands(torch.float64, 2, 2, H, W, 8, kernel_size)
    out = neighborhood_attention_flex(q, k, v, table, kernel_size)
    ref = neighborhood_reference(q, k, v, table, kernel_size)
    errors, scales = _max_errors(out, (q, k, v, table), torch.randn_like(out), ref)
    assert max(e / s for e, s in zip(errors, scales)) < 1e-12, errors


def test_neighborhood_flex_float32():
    q, k, v, table = _neighborhood_operands(torch.float64, 1, 2, 9, 18, 8, 7, seed=1)
    ref = neighborhood_reference(q, k, v, table, 7)
    q32, k32, v32, table32 = (t.detach().float().requires_grad_() for t in (q, k, v, table))
    out = neighborhood_attention_flex(q32, k32, v32, table32, 7)
    assert out.dtype == torch.float32
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q32, k32, v32, table32), grad_out.float())
    ref_grads = torch.autograd.grad(ref, (q, k, v, table), grad_out)
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        assert float((a.double() - b).abs().max()) < 1e-4 * float(b.abs().max())


@pytest.mark.parametrize('H, W, kernel_size', [(17, 35, 7), (50, 84, 7), (7, 30, 7), (33, 16, 5)])
def test_neighborhood_block_mask_lists_exactly_the_blocks_with_neighbors(H, W, kernel_size):
    # The dense path ignores the block sparsity (the fused kernels skip unlisted blocks), so
    # the block mask is checked here against the neighborhoods themselves.
    tn = tiled_neighborhood(H, W, kernel_size, torch.device('cpu'))
    L = tn.rows.numel()
    q_idx, kv_idx = torch.arange(L)[:, None], torch.arange(L)[None, :]
    pairs = tn.mask_mod()(None, None, q_idx, kv_idx)  # (L, L): key kv_idx in query q_idx's window
    real = (tn.rows < H) & (tn.cols < W)
    assert int(pairs[real].sum(1).min()) == int(pairs[real].sum(1).max()) == kernel_size ** 2
    assert not bool(pairs[:, ~real].any())  # padded positions are never keys
    n = L // BLOCK
    blocks_needed = (pairs & real[:, None]).view(n, BLOCK, n, BLOCK).any(3).any(1)
    listed = tn.block_mask.to_dense()[0, 0].bool()
    assert torch.equal(listed, blocks_needed)
    # the backward visits query blocks per key block: the transpose
    q_num, q_index = tn.block_mask.q_num_blocks[0, 0], tn.block_mask.q_indices[0, 0]
    transposed = torch.zeros(n, n, dtype=torch.bool)
    for j in range(n):
        transposed[j, q_index[j, :q_num[j]].long()] = True
    assert torch.equal(transposed, blocks_needed.t())
    assert tn is tiled_neighborhood(H, W, kernel_size, torch.device('cpu'))  # built once per size


def _window_operands(dtype, B, H, W, heads, d, window_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = heads * d
    qkv = torch.randn(B, H, W, 3 * C, generator=g, dtype=dtype).requires_grad_()
    qkv_bias = torch.randn(3 * C, generator=g, dtype=dtype).requires_grad_()
    table = torch.randn(heads, (2 * window_size - 1) ** 2, generator=g, dtype=dtype).requires_grad_()
    return qkv, qkv_bias, table


@pytest.mark.parametrize('H, W, shift', [(9, 20, 4), (16, 23, 4), (14, 14, 4), (10, 13, 0)])
def test_window_sdpa_matches_reference_float64(H, W, shift):
    heads, d, w = 3, 8, 7
    qkv, qkv_bias, table = _window_operands(torch.float64, 2, H, W, heads, d, w)
    out = window_attention_sdpa(qkv, qkv_bias, table, heads, w, shift, d ** -0.5)
    ref = window_reference.window_attention(qkv, qkv_bias, table, heads, w, shift, d ** -0.5)
    padded = bool(H % w or W % w)  # the bias only reaches the result through padded positions
    errors, scales = _max_errors(out, (qkv, table) + ((qkv_bias,) if padded else ()), torch.randn_like(out), ref)
    assert max(e / s for e, s in zip(errors, scales)) < 1e-12, errors


def test_window_sdpa_float32_and_autocast():
    heads, d, w, s = 2, 8, 7, 4
    qkv, qkv_bias, table = _window_operands(torch.float64, 1, 11, 15, heads, d, w, seed=3)
    ref = window_reference.window_attention(qkv, qkv_bias, table, heads, w, s, d ** -0.5)
    operands = [t.detach().float().requires_grad_() for t in (qkv, qkv_bias, table)]
    out = window_attention_sdpa(*operands, heads, w, s, d ** -0.5)
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, operands, grad_out.float())
    ref_grads = torch.autograd.grad(ref, (qkv, qkv_bias, table), grad_out)
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        assert float((a.double() - b).abs().max()) < 1e-4 * float(b.abs().max())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = window_attention_sdpa(*operands, heads, w, s, d ** -0.5)
    assert low.dtype == torch.bfloat16
    assert float((low.double() - ref).abs().max()) < 3e-2 * float(ref.abs().max())


#: Runs the benchmark as on a bare GPU machine: torch and mmengine, none of these.
_BARE_MACHINE = """
import importlib.abc, runpy, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition('.')[0] in {'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'cv2', 'matplotlib', 'timm',
                                      'torchvision', 'natten'}:
            raise ModuleNotFoundError(name + ' is not installed on a bare GPU machine', name=name)
sys.meta_path.insert(0, NotInstalled())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_gpu_benchmark_smoke_on_a_bare_machine(tmp_path):
    out = tmp_path / 'bench.json'
    script = osp.join(REPO, 'tools', 'analysis_tools', 'gpu_benchmark.py')
    proc = subprocess.run([sys.executable, '-c', _BARE_MACHINE, script, '--smoke', '--out', str(out)],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report['environment']['torch'] == torch.__version__
    assert report['environment']['mmdat_import'].startswith('mmdat.models alone')  # no mmcv, no opencv
    assert report['backbones'][-1] == dict(backbone='swin_t', impl='-', precision='fp32',
                                           error='skipped: neither timm nor mmdet is installed')
    errors = [r for section in ('parity', 'blocks', 'backbones') for r in report[section] if 'error' in r]
    assert errors == [report['backbones'][-1]], errors
    dat_rows = [r for r in report['backbones'] if r['backbone'].startswith('dat')]
    assert {(r['backbone'], r['impl'], r['precision']) for r in dat_rows} == {
        (b, i, 'fp32') for b in ('dat_t', 'datpp_t') for i in ('fast', 'reference')}
    assert {r['precision'] for r in report['blocks']} == {'fp32', 'amp'}
    assert all(r['ms'] > 0 for r in dat_rows + report['blocks'])
    # on CPU the fast paths are the CPU ops: they agree with the reference formulation
    assert all(r['out'] < 1e-4 and r['grad_x'] < 1e-4 and r['grad_params_max'] < 1e-4
               for r in report['parity'] if r['precision'] == 'fp32')
    assert 'parity' in proc.stdout and 'goals' in proc.stdout


@pytest.mark.parametrize('arch', [
    dict(NANO_PP, stage_specs=('ND', 'N', 'ND', 'D')),
    dict(NANO_V1, flavor='pp', key_strides=(1, 1, 2, 1), stage_specs=('LS', 'S', 'LD', 'D')),
])
def test_backbone_on_the_cuda_paths_matches_reference(arch, monkeypatch):
    # config.force_backend('cuda') makes the modules take their CUDA branch for CPU tensors,
    # so that the whole backbone runs the CUDA paths through the dense math path: same
    # outputs and gradients as the reference.
    from mmdat.models.backbones import DAT
    from mmdat.ops import attention_impl, force_backend
    from mmdat.ops.deformable import cuda as deformable_cuda
    from mmdat.ops.neighborhood import cuda as neighborhood_cuda
    from mmdat.ops.window import cuda as window_cuda

    calls = []
    for module, name in ((deformable_cuda, 'deformable_attention'), (neighborhood_cuda, 'neighborhood_attention'),
                         (window_cuda, 'window_attention')):
        path = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, path=path, name=name: calls.append(name) or path(*a))

    torch.manual_seed(0)
    model = DAT(arch=arch).double()
    x = torch.randn(1, 3, 32, 48, dtype=torch.float64)
    results = {}
    for impl in ('reference', 'fast'):
        model.zero_grad(set_to_none=True)
        with attention_impl(impl), force_backend('cuda'):
            outs = model(x)
        sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)).sum()
            for o in outs).backward()
        results[impl] = [o.detach() for o in outs], {n: p.grad for n, p in model.named_parameters()}
    kinds = {'D': 'deformable_attention', 'N': 'neighborhood_attention', 'L': 'window_attention',
             'S': 'window_attention'}
    assert sorted(calls) == sorted(kinds[letter] for spec in arch['stage_specs'] for letter in spec)
    (fast_outs, fast_grads), (ref_outs, ref_grads) = results['fast'], results['reference']
    for a, b in zip(fast_outs, ref_outs):
        assert float((a - b).abs().max()) < 1e-12 * float(b.abs().max())
    largest = max(float(g.abs().max()) for g in ref_grads.values())
    for name, g in ref_grads.items():  # the key biases' gradients vanish: compared to the largest
        assert float((fast_grads[name] - g).abs().max()) < 1e-12 * max(float(g.abs().max()), 1e-3 * largest), name
