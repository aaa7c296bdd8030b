"""The fast attention paths compute the same function as the reference ones, leanly."""
import functools
import glob
import itertools
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mmdat  # noqa: F401
from mmdat.models.backbones import DAT
from mmdat.models.backbones.dat_checkpoint import load_dat_checkpoint, official_arch
from mmdat.models.layers.deformable_attention import DeformableAttention, _axis_grid
from mmdat.models.layers.neighborhood_attention import NeighborhoodAttention
from mmdat.models.layers.window_attention import WindowAttention
from mmdat.ops import attention_impl, build, config
from mmdat.ops.deformable import cpu as ops
from mmdat.ops.dwconv import cpu as dwconv_cpu
from mmdat.ops.neighborhood import cpu as na_cpu
from mmdat.ops.neighborhood.cpu import neighborhood_attention_tiled
from mmdat.ops.neighborhood.reference import neighborhood_attention
from mmdat.ops.window import cpu as window_cpu

from conftest import NANO_PP, NANO_V1, fixtures_dir, without_native_ops

NATIVE = ops.native_library() is not None
FUSED = NATIVE and build.blas() is not None
NATIVE_NA = na_cpu.LIBRARY.available()
needs_native_na = pytest.mark.skipif(not NATIVE_NA, reason='no C compiler')


@pytest.fixture(params=[pytest.param('fused', marks=pytest.mark.skipif(not FUSED, reason='no C compiler or no MKL')),
                        pytest.param('native-bias', marks=pytest.mark.skipif(not NATIVE, reason='no C compiler')),
                        'torch-bias'])
def cpu_strategy(request):
    """The test runs with the CPU deformable attention op capped to each of
    ``config.DEFORMABLE_CPU_STRATEGIES`` in turn: fused C kernels, tiles with the bias in C,
    tiles with the bias in PyTorch."""
    with config.deformable_cpu_strategy(request.param):
        yield request.param


def _set_tiles(monkeypatch, tile=None):
    """Logits per tile of every CPU implementation (default: theirs)."""
    if tile is not None:
        monkeypatch.setitem(ops.DEFAULT_TILE_ELEMENTS, 'cpu', tile)
        monkeypatch.setattr(ops, 'FUSED_TILE_ELEMENTS', tile)


def _perturbed(module, scale=0.3):
    """Random non-trivial weights (zero-initialised tables, unit norms, ... all perturbed)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module


def _run(module, x, impl, **kwargs):
    """Output and gradients w.r.t. the input and every parameter under one path."""
    module.zero_grad()
    x = x.clone().requires_grad_()
    with attention_impl(impl, 'deformable'):
        out = module(x, **kwargs) if kwargs else module(x)
    outs = out if isinstance(out, (tuple, list)) else [out]
    gen = torch.Generator().manual_seed(2)
    sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs).backward()
    grads = {'input': x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return [o.detach() for o in outs], grads


def _assert_same(a, b, atol, rtol=0):
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    for oa, ob in zip(outs_a, outs_b):
        torch.testing.assert_close(oa, ob, atol=atol, rtol=rtol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=rtol, msg=name)


# ----------------------------------------------------------------------------- deformable

DA_CASES = [  # embed_dims, heads, groups, key stride, offset_range_factor, table, flavor, input, batch
    (32, 4, 2, 2, -1, (5, 6), 'pp', (9, 11), 1),
    (32, 4, 2, 1, 2, (5, 6), 'pp', (7, 4), 2),
    (24, 2, 1, 2, 2, (4, 4), 'v1', (9, 11), 2),
    (24, 2, 1, 1, -1, (4, 4), 'v1', (6, 5), 1),
    (32, 4, 4, 3, -1, None, 'pp', (10, 8), 2),
    (16, 2, 2, 8, -1, (14, 14), 'pp', (16, 24), 1),  # stage-1 like: few keys, a wide table band
    (32, 4, 2, (1, 2), -1, (5, 6), 'pp', (9, 16), 1),  # anisotropic key grid (ADE20K v1 configs)
]


@pytest.mark.parametrize('tile', [None, 300, 2000], ids=['default-tiles', 'small-tiles', 'row-tiles'])
@pytest.mark.parametrize('case', DA_CASES, ids=lambda c: (f'{c[6]}-C{c[0]}-M{c[1]}-G{c[2]}-r{c[3]}-s{c[4]}'
                         f'-{"table" if c[5] else "notable"}-B{c[8]}').replace(' ', ''))
def test_deformable_paths_agree_float64(case, tile, cpu_strategy, monkeypatch):
    """Outputs and gradients (input, offset network, table, projections) agree to rounding.
    Small tiles split query rows (fused kernels) or groups (tiled path)."""
    C, M, G, r, orf, table, flavor, size, B = case
    _set_tiles(monkeypatch, tile)
    module = _perturbed(DeformableAttention(C, M, G, r, 3, orf, table, flavor).double())
    x = torch.randn(B, C, *size, dtype=torch.double)
    reference, fast = _run(module, x, 'reference'), _run(module, x, 'fast')
    _assert_same(reference, fast, atol=1e-10)
    if table is not None:
        assert fast[1]['relative_position_table'].abs().sum() > 0
    assert fast[1]['offset.proj.weight'].abs().sum() > 0


def test_deformable_paths_agree_float32(cpu_strategy):
    """In float32 both paths are equally far from the float64 result (gradients here reach 1e3)."""
    module = _perturbed(DeformableAttention(64, 4, 2, 2, 5, -1, (14, 14), 'pp'), scale=0.1)
    x = torch.randn(2, 64, 24, 40)
    (ref_out, ref_grads), (fast_out, fast_grads) = _run(module, x, 'reference'), _run(module, x, 'fast')
    torch.testing.assert_close(fast_out[0], ref_out[0], atol=1e-5, rtol=0)
    for name, g in ref_grads.items():
        scale = max(g.abs().max().item(), 1.)  # k.bias has a zero gradient: float32 noise only
        assert (fast_grads[name] - g).abs().max().item() <= 2e-5 * scale, name


def _bias_reference(q, k, v, pos, table, qy, qx, groups):
    """The official formulation on the operands of ``ops.deformable_attention``."""
    BM, d, H, W = q.shape
    BG, Ns, _ = pos.shape
    grid = torch.stack(torch.meshgrid(qy, qx, indexing='ij'), -1).reshape(1, H * W, 1, 2)
    disp = (grid - pos.reshape(BG, 1, Ns, 2)) * 0.5
    tab = table.reshape(1, groups, -1, *table.shape[-2:]).expand(BG // groups, -1, -1, -1, -1)
    bias = F.grid_sample(tab.reshape(BG, -1, *table.shape[-2:]), disp.flip(-1), mode='bilinear',
                         align_corners=True).reshape(BM, H * W, Ns)
    attn = (torch.einsum('bcm,bcn->bmn', q.reshape(BM, d, H * W), k) + bias).softmax(-1)
    return torch.einsum('bmn,bcn->bcm', attn, v).reshape(BM, d, H, W)


@pytest.mark.parametrize('where', ['far-outside', 'grid-nodes', 'border', 'huge'])
def test_bias_matches_grid_sample_at_edges(where, cpu_strategy):
    """Zero padding at any distance, table borders and exact grid nodes, incl. gradients."""
    gen = torch.Generator().manual_seed(0)
    B, G, Mg, d, H, W, Th, Tw = 2, 2, 2, 4, 5, 7, 7, 9
    Ns = 12
    qy, qx = _axis_grid(H, False, 'pp', 'cpu', torch.double), _axis_grid(W, False, 'pp', 'cpu', torch.double)
    if where == 'far-outside':
        pos = torch.rand(B * G, Ns, 2, generator=gen, dtype=torch.double) * 8 - 4
    elif where == 'huge':  # beyond int32 table coordinates
        pos = torch.randn(B * G, Ns, 2, generator=gen, dtype=torch.double) * 1e12
    elif where == 'grid-nodes':  # table coordinates exactly integer
        pos = torch.stack([qy[torch.randint(0, H, (B * G * Ns,), generator=gen)],
                           qx[torch.randint(0, W, (B * G * Ns,), generator=gen)]], -1).view(B * G, Ns, 2)
        pos = pos + torch.randint(-2, 3, pos.shape, generator=gen) * torch.tensor([4 / (Th - 1), 4 / (Tw - 1)],
                                                                                   dtype=torch.double)
    else:  # on and just around the table's edge
        pos = torch.tensor([-1., 1.], dtype=torch.double)[torch.randint(0, 2, (B * G, Ns, 2), generator=gen)]
        pos = pos + torch.randn(pos.shape, generator=gen, dtype=torch.double) * 1e-3
    q, k, v = (torch.randn(B * G * Mg, d, *s, generator=gen, dtype=torch.double)
               for s in ((H, W), (Ns,), (Ns,)))
    k, v = k.squeeze(-1), v.squeeze(-1)
    table = torch.randn(G * Mg, Th, Tw, generator=gen, dtype=torch.double)
    inputs = [t.requires_grad_() for t in (q, k, v, pos, table)]
    gout = torch.randn(B * G * Mg, d, H, W, generator=gen, dtype=torch.double)
    ref = _bias_reference(*inputs, qy, qx, G)
    fast = ops.deformable_attention(*inputs, qy, qx, G, tile_elements=40)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0)
    for a, b, name in zip(torch.autograd.grad((ref * gout).sum(), inputs),
                          torch.autograd.grad((fast * gout).sum(), inputs), 'q k v pos table'.split()):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0, msg=name)


BIAS_DENSITIES = [(40, 27), (37, 71), (21, 111)]


def _check_bias_float32(W, Tw, tile):
    """Float32 attention output and gradients against the official formulation in float64."""
    gen = torch.Generator().manual_seed(0)
    B, G, Mg, d, H, Ns, Th = 1, 2, 2, 8, 6, 10, 9
    qy, qx = _axis_grid(H, False, 'pp', 'cpu', torch.double), _axis_grid(W, False, 'pp', 'cpu', torch.double)
    pos = torch.rand(B * G, Ns, 2, generator=gen, dtype=torch.double) * 2.4 - 1.2
    q, k, v = (torch.randn(B * G * Mg, d, *s, generator=gen, dtype=torch.double) for s in ((H, W), (Ns, 1), (Ns, 1)))
    table = torch.randn(G * Mg, Th, Tw, generator=gen, dtype=torch.double) * 3
    gout = torch.randn(B * G * Mg, d, H, W, generator=gen, dtype=torch.double)
    results = []
    fast = functools.partial(ops.deformable_attention, tile_elements=tile)
    for dtype, attention in ((torch.double, _bias_reference), (torch.float, fast)):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k.squeeze(-1), v.squeeze(-1), pos, table)]
        out = attention(*inputs, qy.to(dtype), qx.to(dtype), G)
        results.append([out, *torch.autograd.grad((out * gout.to(dtype)).sum(), inputs)])
    for name, a, b in zip('out q k v pos table'.split(), *results):
        torch.testing.assert_close(b.double(), a, atol=2e-5 * max(a.abs().max().item(), 1.), rtol=0, msg=name)


@pytest.mark.parametrize('tile', [None, 60], ids=['row-tiles', 'split-rows'])
@pytest.mark.parametrize('W,Tw', BIAS_DENSITIES, ids=['few-cells', 'cell-per-column', 'wide'])
def test_bias_float32_at_any_cell_density(W, Tw, tile, cpu_strategy):
    """Float32 bias and gradients against float64 where 16 query columns span a few table
    cells, about 16 (the vector kernels' limit) or many more, in rows split or not."""
    _check_bias_float32(W, Tw, tile)


@pytest.mark.skipif(not FUSED or 'avx512f' not in build.cpu_fingerprint().split(), reason='no AVX-512 here')
def test_fused_kernels_without_avx512(monkeypatch, tmp_path):
    """The plain loops that float32 runs on CPUs without AVX-512 (float64 runs them everywhere)."""
    monkeypatch.setenv('MMDAT_CACHE_DIR', str(tmp_path))
    library = ops.native_library
    lib = build.load(library.name, library.source_files, library.signatures,
                     flag_sets=(build.WIDE_FLAGS + ('-mno-avx512f', ), ) + build.FLAG_SETS)
    assert lib is not None and lib._name != library()._name
    monkeypatch.setattr(ops, 'native_library', lambda: lib)
    for W, Tw in BIAS_DENSITIES:
        for tile in (None, 60):
            _check_bias_float32(W, Tw, tile)


@pytest.mark.skipif(not FUSED, reason='no C compiler or no MKL')
def test_fused_kernels_are_the_cpu_default_and_sum_over_any_team(monkeypatch):
    """The fused kernels run by default on CPU (float32 and float64); each thread sums its own
    dk, dv, table and position gradients, and the totals do not depend on the team size (nor
    on the workspace bound that limits it) or on the output gradient's memory format."""
    gen = torch.Generator().manual_seed(3)
    G, Mg, d, H, W, Ns = 2, 3, 8, 6, 13, 20
    qy, qx = torch.linspace(-1, 1, H, dtype=torch.double), torch.linspace(-1, 1, W, dtype=torch.double)
    pos = torch.rand(G, Ns, 2, generator=gen, dtype=torch.double) * 2 - 1
    q = torch.randn(G * Mg, d, H, W, generator=gen, dtype=torch.double)
    k, v = (torch.randn(G * Mg, d, Ns, generator=gen, dtype=torch.double) for _ in range(2))
    table = torch.randn(G * Mg, 9, 9, generator=gen, dtype=torch.double)
    gout = torch.randn(q.shape, generator=gen, dtype=torch.double)
    # as the output projection's backward gives it for a batch of one (read in place by the kernels)
    gout_channels_last = gout.reshape(1, -1, H, W).contiguous(memory_format=torch.channels_last).view(q.shape)
    assert not gout_channels_last.is_contiguous()
    for dtype in (torch.float32, torch.float64):
        fused = ops._fused(q.to(dtype), pos.to(dtype), table.to(dtype), qy.to(dtype), qx.to(dtype), G, None)
        assert isinstance(fused, ops._FusedAttention)
    monkeypatch.setattr(ops, 'FUSED_WORKSPACE_BYTES', 1)
    assert ops._fused(q, pos, table, qy, qx, G, None).threads == 1
    monkeypatch.setattr(ops, 'FUSED_WORKSPACE_BYTES', 256 << 20)
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 64)
    assert ops._fused(q, pos, table, qy, qx, G, None).threads == G  # one item per group here
    monkeypatch.undo()
    results, threads = [], torch.get_num_threads()
    try:
        for impl, team, workspace in (('native-bias', 2, None), ('fused', 1, None), ('fused', 3, None),
                                      ('fused', 3, 1)):  # a workspace bound that leaves one thread
            _set_tiles(monkeypatch, tile=Ns * Mg * 5)  # fused: 5 queries per tile, rows split
            if workspace is not None:
                monkeypatch.setattr(ops, 'FUSED_WORKSPACE_BYTES', workspace)
            torch.set_num_threads(team)
            inputs = [t.clone().requires_grad_() for t in (q, k, v, pos, table)]
            with config.deformable_cpu_strategy(impl):
                out = ops.deformable_attention(*inputs, qy, qx, G)
                grads = torch.autograd.grad(out, inputs, gout_channels_last if team == 3 else gout)
            results.append([out, *grads])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b, name in zip(results[0], other, 'out q k v pos table'.split()):
            torch.testing.assert_close(b, a, atol=1e-10, rtol=0, msg=name)


def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while running ``fn``."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_deformable_fast_path_keeps_no_logits():
    """Saved for backward: some C x HW maps, nothing of size heads x HW x Ns."""
    C, M, H, W = 16, 4, 40, 48
    module = DeformableAttention(C, M, 2, 1, 3, -1, (7, 7), 'pp')
    x = torch.randn(1, C, H, W, requires_grad=True)
    logits = M * (H * W) ** 2 * 4  # bytes, Ns = HW at key stride 1
    with attention_impl('reference', 'deformable'):
        assert _saved_bytes(lambda: module(x)) > 2 * logits  # logits, attention, bias, displacements
    with attention_impl('fast', 'deformable'):
        saved = _saved_bytes(lambda: module(x))
    assert saved < 20 * C * H * W * 4 < logits / 10


def test_cpu_workspace_survives_inference_mode():
    """The tile workspace kept between calls: first created under inference mode, then
    reused by a training step (and the other way round) in the same thread."""
    build.clear_workspaces()
    module = _perturbed(DeformableAttention(32, 4, 2, 2, 3, -1, (5, 6), 'pp'))
    x = torch.randn(1, 32, 9, 11)
    with torch.inference_mode():
        inferred = module(x)
    x.requires_grad_()
    trained = module(x)
    trained.sum().backward()
    with torch.inference_mode():
        again = module(x)
    torch.testing.assert_close(trained.detach(), inferred)
    torch.testing.assert_close(again, inferred)
    assert x.grad.abs().sum() > 0


def test_native_kernels_build_here_and_can_be_disabled(monkeypatch, tmp_path):
    """Where a C compiler exists (as here) the CPU bias runs in C; MMDAT_NATIVE_OPS=0 opts out."""
    import shutil
    if shutil.which('cc') or shutil.which('gcc'):
        assert NATIVE
    monkeypatch.setenv('MMDAT_NATIVE_OPS', '0')
    ops.native_library.cache_clear()
    try:
        assert ops.native_library() is None
        bias = ops._make_bias(torch.zeros(1, 3, 2), torch.zeros(1, 3, 3), torch.zeros(2), torch.zeros(2), 1)
        assert isinstance(bias, ops._TorchBias)
    finally:
        ops.native_library.cache_clear()
    monkeypatch.setenv('MMDAT_NATIVE_OPS', '1')
    monkeypatch.setenv('MMDAT_CACHE_DIR', str(tmp_path))  # a fresh build, as on first use
    try:
        if NATIVE:
            assert ops.native_library() is not None and list(tmp_path.glob('*.so'))
    finally:
        ops.native_library.cache_clear()


def test_native_build_falls_through_flags_the_compiler_rejects(monkeypatch, tmp_path):
    """``build.load(wide_vectors=True)`` first tries a flag only x86 compilers know: where the
    compiler rejects a flag set, the next one builds the library (both scalar types, from a
    source file that includes the shared header); none builds: a clear error, and ``load``
    warns and returns ``None``."""
    from mmdat.ops import build
    if not NATIVE:
        pytest.skip('no C compiler')
    monkeypatch.setenv('MMDAT_CACHE_DIR', str(tmp_path))
    source = tmp_path / 'answer.c'
    source.write_text('#include "common.h"\nvoid NAME(answer)(scalar_t *x) { x[0] = 42; }\n')
    lib = build.load('fallback', [str(source)], {'answer': (1, 0)},
                     flag_sets=(('--no-such-flag', ), ) + build.FLAG_SETS)
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(1, dtype=dtype)
        build.function(lib, 'answer', dtype)(x.data_ptr())
        assert x.item() == 42
    with pytest.raises(RuntimeError, match='failed'):
        build.build('rejected', build.read_sources([str(source)]), (('--no-such-flag', ), ))
    with pytest.warns(UserWarning, match='native rejected kernels unavailable'):
        assert build.load('rejected', [str(source)], {'answer': (1, 0)}, flag_sets=(('--no-such-flag', ), )) is None


def test_path_selection():
    module = DeformableAttention(16, 2, 1, attn_impl='reference', attn_drop=0.1)
    x = torch.empty(1)
    assert module.backend(x) == 'reference'
    module.attn_impl = 'fast'
    module.eval()
    assert module.backend(x) == 'cpu'
    module.train()  # attention dropout only exists on the reference path
    assert module.backend(x) == 'reference'
    module.eval()
    with attention_impl('reference', 'deformable'):
        assert module.backend(x) == 'reference'
        with attention_impl('fast', 'deformable'):
            assert module.backend(x) == 'cpu'
        assert module.backend(x) == 'reference'
    assert module.backend(x) == 'cpu'
    with pytest.raises(ValueError, match='attn_impl'):
        DeformableAttention(16, 2, 1, attn_impl='flash')
    with pytest.raises(ValueError, match='attn_impl'):
        with attention_impl('flash', 'deformable'):
            pass


def test_fast_path_is_float32_under_autocast():
    module = _perturbed(DeformableAttention(32, 4, 2, 2, 3, -1, (5, 5), 'pp'), scale=0.1).eval()
    x = torch.randn(1, 32, 12, 10)
    with torch.no_grad():
        full = module(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            mixed = module(x)
            q = torch.randn(4, 8, 12, 10)  # B 1, M 4, G 2
            attn = ops.deformable_attention(q.bfloat16(), torch.randn(4, 8, 30).bfloat16(),
                                            torch.randn(4, 8, 30).bfloat16(), torch.rand(2, 30, 2) * 2 - 1,
                                            module.relative_position_table, torch.linspace(-1, 1, 12),
                                            torch.linspace(-1, 1, 10), 2)
    assert attn.dtype == torch.float32
    torch.testing.assert_close(mixed.float(), full, atol=0.05, rtol=0.05)  # bf16 convolutions


@pytest.mark.parametrize('path', sorted(glob.glob(osp.join(fixtures_dir(), '*.pth'))) or
                         [pytest.param(None, marks=pytest.mark.skip(reason='no parity fixtures'))])
@pytest.mark.parametrize('impl', ['reference', 'fast'])
def test_official_parity_on_every_path(path, impl):
    fixture = torch.load(path, map_location='cpu', weights_only=True)
    model = DAT(**official_arch(fixture['config'], fixture['flavor']))
    load_dat_checkpoint(model, fixture)
    model.eval()
    for m in model.modules():
        if isinstance(m, NeighborhoodAttention):
            m.attn_impl = impl
    with torch.no_grad(), attention_impl(impl, 'deformable'):
        if 'stage_outputs' in fixture:
            ours, theirs = model.forward_stages(fixture['input']), fixture['stage_outputs']
        else:
            ours, theirs = model(fixture['input']), fixture['outputs']
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) <= 1e-4


@pytest.mark.parametrize('arch', [NANO_V1, NANO_PP], ids=['v1', 'pp'])
def test_backbone_paths_agree(arch):
    model = _perturbed(DAT(arch).double(), scale=0.05).train()
    x = torch.randn(1, 3, 40, 56, dtype=torch.double)

    def run(impl):
        with config.attention_impl(impl):
            return _run(model, x, impl)

    _assert_same(run('reference'), run('fast'), atol=1e-9)


class _MmdatOps(TorchDispatchMode):
    """Names of the ``mmdat::`` ops called within the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == 'mmdat':
            self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('arch', [NANO_V1, NANO_PP], ids=['v1', 'pp'])
def test_reference_backbone_calls_no_mmdat_op(arch):
    """``DAT(attn_impl='reference')`` reaches no ``mmdat::`` op, DAT++'s depth-wise convs
    included, and computes the fast backbone's function; ``attention_impl('reference',
    'dwconv')`` takes the depth-wise convs alone off their ops."""
    fast = DAT(arch).eval()
    reference = DAT(arch, attn_impl='reference').eval()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with _MmdatOps() as fast_ops:
            expected = fast(x)
        with _MmdatOps() as reference_ops:
            outs = reference(x)
        with config.attention_impl('reference', 'dwconv'), _MmdatOps() as attention_ops:
            fast(x)
    assert reference_ops.names == set()
    pp = arch is NANO_PP
    attention = {'mmdat::deformable_attention_forward',
                 'mmdat::neighborhood_attention_forward' if pp else 'mmdat::window_attention_forward'}
    if all(lib.available() for lib in (na_cpu.LIBRARY, window_cpu.LIBRARY, dwconv_cpu.LIBRARY)) and NATIVE:
        assert fast_ops.names == attention | ({'mmdat::conv_mlp', 'mmdat::residual_dwconv'} if pp else set())
        assert attention_ops.names == attention
    else:  # without a C compiler the deformable op still runs (PyTorch tiles)
        assert 'mmdat::deformable_attention_forward' in fast_ops.names & attention_ops.names
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize('arch', [NANO_V1, NANO_PP], ids=['v1', 'pp'])
def test_flop_count_does_not_depend_on_the_path(arch):
    """jit-traced FLOP counters (get_flops) see the reference ops whatever the path."""
    from mmengine.analysis import FlopAnalyzer
    model = DAT(arch).eval()
    x = torch.randn(1, 3, 64, 96)

    def count(impl):
        for m in model.modules():
            if isinstance(m, (NeighborhoodAttention, WindowAttention)):
                m.attn_impl = impl
        with attention_impl(impl, 'deformable'):
            analyzer = FlopAnalyzer(model, (x,))
            analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return analyzer.total(), analyzer.by_operator()

    (fast, fast_ops), (reference, reference_ops) = count('fast'), count('reference')
    assert fast == reference and fast_ops == reference_ops
    assert reference_ops.get('einsum', 0) > 0  # the attention products are counted


# ----------------------------------------------------------------------------- neighborhood

@pytest.mark.parametrize('size,kernel,tile', [
    ((7, 7), 7, 8), ((9, 13), 3, 4), ((16, 11), 7, 5), ((23, 30), 7, 8), ((8, 19), 5, 3), ((40, 9), 7, 8)])
@pytest.mark.parametrize('steps', [None, (1, 1, 8), (1, 1 << 30, 2)], ids=['default-steps', 'row-steps', 'two-steps'])
def test_neighborhood_tiled_matches_gather_float64(size, kernel, tile, steps, monkeypatch):
    if steps is not None:
        monkeypatch.setattr(na_cpu, 'STEP_LOGITS', steps[:2])
        monkeypatch.setattr(na_cpu, 'STEPS_PER_CALL', steps[2])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, *size, 6, generator=gen, dtype=torch.double).requires_grad_() for _ in range(3))
    table = torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, generator=gen, dtype=torch.double).requires_grad_()
    gout = torch.randn(2, 3, *size, 6, generator=gen, dtype=torch.double)
    ref = neighborhood_attention(q, k, v, table, kernel)
    fast = neighborhood_attention_tiled(q, k, v, table, kernel, tile)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad((ref * gout).sum(), (q, k, v, table)),
                    torch.autograd.grad((fast * gout).sum(), (q, k, v, table))):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)


def _native_na(q, k, v, table, kernel, scale=1.0):
    """The C kernels' op with the arguments of ``neighborhood_attention``: an
    identity qkv projection of the map ``[q, k, v]`` (gradients flow back through it)."""
    B, nh, H, W, d = q.shape
    C = nh * d
    x = torch.stack([q, k, v]).permute(1, 3, 4, 0, 2, 5).reshape(B, H, W, 3 * C)
    linear = torch.nn.Linear(3 * C, 3 * C).to(q.dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(3 * C))
        linear.bias.zero_()
    out = na_cpu.neighborhood_attention(x, linear.weight, linear.bias, table, nh, kernel, scale)
    return out.reshape(B, H, W, nh, d).permute(0, 3, 1, 2, 4)


@needs_native_na
@pytest.mark.parametrize('size,kernel', [((7, 7), 7), ((9, 13), 3), ((16, 11), 7), ((40, 9), 7), ((31, 8), 5),
                                         ((3, 4), 1), ((12, 40), 7), ((9, 29), 5)])
@pytest.mark.parametrize('threads', [1, 3])
def test_neighborhood_native_matches_gather_float64(size, kernel, threads):
    """The C kernels; tall maps run the backward in several blocks of rows per parity, and
    more threads than cores share the dk / dv / table accumulation. Rows of 29 and 40 have
    interior blocks of lanes (read in place), the others only edge blocks (padded copies)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, *size, 6, generator=gen, dtype=torch.double).requires_grad_() for _ in range(3))
    table = torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, generator=gen, dtype=torch.double).requires_grad_()
    gout = torch.randn(2, 3, *size, 6, generator=gen, dtype=torch.double)
    ref = neighborhood_attention(q * 0.7, k, v, table, kernel)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = _native_na(q, k, v, table, kernel, 0.7)
        grads = torch.autograd.grad((fast * gout).sum(), (q, k, v, table))
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad((ref * gout).sum(), (q, k, v, table)), grads):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)


@needs_native_na
@pytest.mark.parametrize('batch', [1, 2])
def test_neighborhood_native_projection_gradients(batch):
    """The C path owns the qkv projection (recomputed in backward): its weight, bias and
    input gradients as the Linear layer's, the input gradient in the input's own layout."""
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(8, 24).double()
    x = torch.randn(batch, 9, 10, 8, generator=gen, dtype=torch.double, requires_grad=True)
    table = torch.randn(2, 13, 13, generator=gen, dtype=torch.double, requires_grad=True)
    gout = torch.randn(batch, 9, 10, 8, generator=gen, dtype=torch.double)
    params = (x, linear.weight, linear.bias, table)
    fast = na_cpu.neighborhood_attention(x, linear.weight, linear.bias, table, 2, 7, 0.5)
    q, k, v = linear(x).reshape(batch, 9, 10, 3, 2, 4).permute(3, 0, 4, 1, 2, 5)
    ref = neighborhood_attention(q * 0.5, k, v, table, 7).permute(0, 2, 3, 1, 4).reshape(batch, 9, 10, 8)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)
    grads = torch.autograd.grad((fast * gout).sum(), params)
    for a, b in zip(grads, torch.autograd.grad((ref * gout).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert grads[0].is_contiguous()


@needs_native_na
def test_neighborhood_native_float32_and_errors():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 50, 32, generator=gen) for _ in range(3))
    table = torch.randn(2, 13, 13, generator=gen)
    ref = neighborhood_attention(q.double(), k.double(), v.double(), table.double(), 7)
    out = _native_na(q, k, v, table, 7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='at least the kernel size 7, got 6x50'):
        _native_na(q[:, :, :6], k[:, :, :6], v[:, :, :6], table, 7)


@needs_native_na
def test_neighborhood_module_runs_the_c_kernels_on_cpu_unless_disabled(monkeypatch):
    calls = []
    for name in ('neighborhood_attention_forward', 'neighborhood_attention_tiled_forward'):
        real = getattr(na_cpu, name)
        monkeypatch.setattr(na_cpu, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    module = _perturbed(NeighborhoodAttention(16, 2, 7, use_natten=False))
    x = torch.randn(1, 16, 9, 9)
    native = module(x)
    tiled = without_native_ops(monkeypatch, na_cpu.LIBRARY, lambda: module(x))
    assert calls == ['neighborhood_attention_forward', 'neighborhood_attention_tiled_forward']
    torch.testing.assert_close(native, tiled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('size,batch', [((12, 17), 2), ((5, 6), 1), ((9, 40), 1)])
def test_neighborhood_module_paths_agree(size, batch):
    module = _perturbed(NeighborhoodAttention(16, 2, 7, use_natten=False).double()).train()
    x = torch.randn(batch, 16, *size, dtype=torch.double)

    def run(impl):
        module.attn_impl = impl
        return _run(module, x, impl)

    _assert_same(run('reference'), run('fast'), atol=1e-10)


def test_neighborhood_fast_path_keeps_no_neighbour_copies():
    H, W, heads, d = 24, 40, 2, 16
    module = NeighborhoodAttention(heads * d, heads, 7, use_natten=False)
    x = torch.randn(1, heads * d, H, W, requires_grad=True)
    gathered = 2 * heads * H * W * 49 * d * 4  # k and v of every query's 7 x 7 window
    module.attn_impl = 'reference'
    assert _saved_bytes(lambda: module(x)) > gathered
    module.attn_impl = 'fast'
    assert _saved_bytes(lambda: module(x)) < gathered / 8


def test_tile_iteration_covers_everything():
    tiles = list(ops._tiles(6, 10, 5, 25))  # two groups x one row per tile? 6 groups, 10 logits per row
    covered = torch.zeros(6, 5, dtype=torch.int)
    for g, a in tiles:
        covered[g, a] += 1
    assert (covered == 1).all()
    for BG, per_row, H, target in itertools.product((1, 3), (7, 50), (1, 4, 9), (1, 30, 10 ** 6)):
        covered = torch.zeros(BG, H, dtype=torch.int)
        for g, a in ops._tiles(BG, per_row, H, target):
            covered[g, a] += 1
        assert (covered == 1).all()


def test_half_precision_inputs_run_in_float32():
    """Without autocast, half inputs are computed in float32 and returned in half."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 8, *s, generator=gen) for s in ((6, 7), (15,), (15,)))
    pos, table = torch.rand(2, 15, 2, generator=gen) * 2 - 1, torch.randn(4, 5, 5, generator=gen)
    grid = torch.linspace(-1, 1, 6), torch.linspace(-1, 1, 7)
    full = ops.deformable_attention(q, k, v, pos, table, *grid, 2)
    half = ops.deformable_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pos, table.bfloat16(), *grid, 2)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=0.05, rtol=0.05)
    qn, kn, vn = (torch.randn(1, 2, 9, 10, 4, generator=gen) for _ in range(3))
    tn = torch.randn(2, 13, 13, generator=gen)
    for na in (neighborhood_attention_tiled, _native_na if NATIVE_NA else None):
        if na is None:
            continue
        out = na(qn.bfloat16(), kn.bfloat16(), vn.bfloat16(), tn.bfloat16(), 7)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), neighborhood_attention(qn, kn, vn, tn, 7), atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------- window

@pytest.mark.skipif(not window_cpu.LIBRARY.available(), reason='no C compiler')
@pytest.mark.parametrize('shifted', [False, True], ids=['L', 'S'])
@pytest.mark.parametrize('size,channels,heads', [((14, 14), 12, 3), ((9, 17), 12, 3), ((5, 3), 12, 3),
                                                 ((10, 23), 12, 3), ((16, 8), 12, 3), ((10, 23), 64, 2)])
def test_window_native_matches_reference_float64(size, channels, heads, shifted):
    """The C kernels against the PyTorch formulation, padding (the keys of padded
    positions are the qkv bias) and the shift mask included; head dims 4 (below one vector
    of the kernels' products) and 32 (whole vectors)."""
    module = _perturbed(WindowAttention(channels, heads, 7, shifted).double()).train()
    x = torch.randn(2, channels, *size, dtype=torch.double)

    def run(impl):
        module.attn_impl = impl
        return _run(module, x, impl)

    calls = []
    real = window_cpu.window_attention_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(window_cpu, 'window_attention_forward', lambda *a: calls.append(1) or real(*a))
        fast = run('fast')
    assert calls
    _assert_same(run('reference'), fast, atol=1e-11)


@pytest.mark.skipif(not window_cpu.LIBRARY.available(), reason='no C compiler')
def test_window_native_float32_and_dropout_path():
    module = _perturbed(WindowAttention(32, 2, 7, True, attn_drop=0.1)).eval()
    x = torch.randn(1, 32, 12, 20)
    assert module.backend(x) == 'cpu'
    fast = module(x)
    module.attn_impl = 'reference'
    torch.testing.assert_close(fast, module(x), atol=1e-5, rtol=1e-5)
    module.attn_impl = 'fast'
    module.train()  # attention dropout exists on the reference path only
    assert module.backend(x) == 'reference'
    with pytest.raises(ValueError, match='attn_impl'):
        WindowAttention(32, 2, 7, attn_impl='flash')
