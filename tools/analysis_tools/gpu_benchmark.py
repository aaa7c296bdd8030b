"""GPU benchmark of mmdat's attention paths: one command, a table and a JSON file.

    python tools/analysis_tools/gpu_benchmark.py                # a CUDA GPU; about 3-4 minutes on an H200
    python tools/analysis_tools/gpu_benchmark.py --smoke        # any machine (CPU): the same code in seconds

What it measures, at 800x1344, batch 2, in float32 and under fp16 autocast (``--precisions``):

* ``compile`` (first, so that nothing is compiled yet): a DAT-T++ stage-2 ``D`` block, then an
  ``N`` block, then DAT-T's stage-1 ``L`` block at three image sizes in a row, as multi-scale
  training does, under autocast: the first call's time (forward + backward, the compile
  included), the steady time after it, the graphs Dynamo then holds for the kind's
  FlexAttention entry (a second size recompiles with dynamic sizes; a third should not),
  the output against the reference formulation, errors and fallbacks;
* ``captured``: the attention op of two ``D`` blocks (DAT-T++ stage 1, DAT-T stage 3) on the
  operands the block passes it, forward + backward under autocast, with gradients to q, k,
  v, the table and the positions (``all``), with the positions, the table or both detached
  (FlexAttention's backward then skips their atomic adds), without the bias, and by the
  SDPA fallback; ``captured_shares`` gives the captured tensors' part of the time;
* ``blocks``: the attention module of each DAT-T ``D`` block (stages 3, 4), each DAT-T++ ``N``
  and ``D`` block (stages 1-4) and DAT-T's stage-1 ``L`` and ``S`` blocks, on a random input
  of the stage's shape, forward + backward, with the fast path (on CUDA: the FlexAttention /
  SDPA ops of ``mmdat.ops.*.cuda``) and the official formulation (``reference``);
* ``backbones``: DAT-T (the backbone of ``configs/mask_rcnn_dat_t_3x.py``), DAT-T++
  (``configs/mask_rcnn_datpp_t_3x.py``) with both paths, and timm's Swin-T
  (``swin_tiny_patch4_window7_224``, ``features_only``, built for the input size; mmdet's
  ``SwinTransformer`` where timm is missing and mmdet is there), forward + backward of the
  sum of the outputs, in train mode;
* ``parity``: fast vs reference on every block above, in float32 (TF32 off) and under
  autocast: the largest difference of the output, of the input gradient and of each
  parameter gradient (the position tables', the offset network's) relative to the largest
  magnitude of the reference's.

Time: CUDA events around each step, the median (and min) of ``--repeats`` steps after
``--warmup`` (the warm-up steps also compile the FlexAttention kernels). Memory:
``torch.cuda.max_memory_allocated()`` over the timed steps (``peak``: weights and input
included; ``+peak``: above what was allocated before the first timed step); ``first_s``: the
first warm-up step. ``--budget-s`` bounds the whole run: cases left when it is spent are
listed as skipped. Dynamo's recompile limit is raised (the run compiles more variants of an
entry than training does: dtypes, detached inputs); ``flex_graphs`` reports how many it
compiled, ``compile_failures`` which kinds ran their fallback and why.

Requirements: torch >= 2.11 (with triton on CUDA) and mmengine (the DAT backbone is an
MMEngine ``BaseModule``), nothing else: where ``import mmdat`` needs more (opencv, mmcv),
the script imports ``mmdat.models`` and ``mmdat.ops`` alone. See docs/gpu.md for the wheels
to carry to a machine without network. timm is optional (Swin-T: timm's, else mmdet's,
else skipped).
"""
import argparse
import json
import math
import os
import os.path as osp
import platform
import statistics
import sys
import time
import traceback
from importlib import metadata
from typing import Callable, Dict, List, Optional, Tuple

import torch

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

#: The backbones of the detection configs (``cfg.model.backbone``, no checkpoint):
#: configs/_base_/models/mask_rcnn_dat_fpn.py with configs/mask_rcnn_dat_t_3x.py, and
#: configs/mask_rcnn_datpp_t_3x.py.
DAT_BACKBONES = {
    'dat_t': dict(arch=dict(preset='v1-tiny', flavor='pp', key_strides=(1, 1, 2, 1)), pretrain_img_size=224,
                  out_indices=(0, 1, 2, 3), drop_path_rate=0.3),
    'datpp_t': dict(arch='pp-tiny', pretrain_img_size=224, out_indices=(0, 1, 2, 3), drop_path_rate=0.3),
}
#: Blocks timed alone: (backbone, stage, spec letter); the first block of that letter.
BLOCKS = [('dat_t', 0, 'L'), ('dat_t', 0, 'S'), ('dat_t', 2, 'D'), ('dat_t', 3, 'D'),
          ('datpp_t', 0, 'N'), ('datpp_t', 0, 'D'), ('datpp_t', 1, 'N'), ('datpp_t', 1, 'D'),
          ('datpp_t', 2, 'N'), ('datpp_t', 2, 'D'), ('datpp_t', 3, 'D')]
#: ``--smoke``: one block of each kind
SMOKE_BLOCKS = [('dat_t', 0, 'S'), ('datpp_t', 0, 'N'), ('datpp_t', 3, 'D')]
#: ``compile``: blocks run at each of these image sizes in a row (the stage-2 maps of DAT-T++:
#: 100x168, 80x136, 92x152; different numbers of neighborhood tiles)
COMPILE_BLOCKS = [('datpp_t', 1, 'D'), ('datpp_t', 1, 'N'), ('dat_t', 0, 'L')]
COMPILE_SIZES = ['800x1344', '640x1088', '736x1216']
SMOKE_COMPILE_SIZES = ['64x64', '96x128', '80x112']
#: ``captured``: D blocks whose attention op runs with and without the captured tensors' gradients
CAPTURED_BLOCKS = [('datpp_t', 0, 'D'), ('dat_t', 2, 'D')]
SMOKE_CAPTURED_BLOCKS = [('datpp_t', 3, 'D')]
#: variant: the operands that get a gradient (most telling first: the time budget may cut the rest)
CAPTURED_VARIANTS = {'all': 'q k v pos table', 'both detached': 'q k v', 'no bias': 'q k v',
                     'sdpa_bias': 'q k v pos table', 'pos detached': 'q k v table', 'table detached': 'q k v pos'}
#: the order sections run in (``compile`` first: nothing compiled before it)
SECTIONS = ['compile', 'parity', 'captured', 'backbones', 'blocks']
#: Dynamo's per-function recompile limit during the run (its default, 8, is below what the
#: variants here compile for the deformable entry)
RECOMPILE_LIMIT = 32
SWIN_T = 'swin_tiny_patch4_window7_224'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--smoke', action='store_true',
                   help='on CPU, a small input, one step per case, one block of each kind, backbones in fp32 only: '
                        'checks the script, measures nothing')
    p.add_argument('--size', default='800x1344', help='input H x W')
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--precisions', nargs='+', default=['fp32', 'amp'], choices=['fp32', 'amp'])
    p.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'])
    p.add_argument('--sections', nargs='+', default=SECTIONS, choices=SECTIONS,
                   help=f'parts to run, in the order {", ".join(SECTIONS)} (compile first: it times the first calls)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--budget-s', type=float, default=270., help='stop starting cases after this many seconds')
    p.add_argument('--out', default=None, help='JSON file (default: work_dirs/gpu_benchmark/<device>.json)')
    args = p.parse_args(argv)
    args.blocks, args.backbone_precisions = BLOCKS, args.precisions
    args.compile_sizes, args.captured_blocks = COMPILE_SIZES, CAPTURED_BLOCKS
    if args.smoke:
        args.size, args.batch, args.warmup, args.repeats = '64x64', 1, 0, 1
        args.blocks, args.backbone_precisions = SMOKE_BLOCKS, ['fp32']
        args.compile_sizes, args.captured_blocks = SMOKE_COMPILE_SIZES, SMOKE_CAPTURED_BLOCKS
    args.hw = _hw(args.size)
    return args


def _hw(size: str) -> Tuple[int, int]:
    return tuple(int(s) for s in size.lower().split('x'))


def import_mmdat():
    """``(DAT, attention_impl, how)``. ``import mmdat`` skips its OpenMMLab glue where mmcv or
    mmengine is missing; ``mmdat.models`` then needs mmengine alone."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import mmdat
    from mmdat.models.backbones.dat import DAT
    from mmdat.ops.config import attention_impl
    how = 'import mmdat' if mmdat.OPENMMLAB else 'mmdat.models alone (no mmcv / mmengine glue)'
    return DAT, attention_impl, how


def build_swin(hw) -> Tuple[Optional[torch.nn.Module], str]:
    """Swin-T for an ``hw`` input (timm's, else mmdet's) and what it is, or ``None`` and why not."""
    try:
        import timm
    except ImportError:
        timm = None
    try:
        if timm is not None:  # timm >= 1.0 pads maps to whole windows; features NHWC
            return timm.create_model(SWIN_T, pretrained=False, features_only=True, img_size=hw,
                                     drop_path_rate=0.2), f'timm {timm.__version__} {SWIN_T}'
        from mmdet.models.backbones import SwinTransformer
    except ImportError:
        return None, 'skipped: neither timm nor mmdet is installed'
    except Exception as e:  # e.g. a timm too old for features_only Swin at this size
        return None, f'timm {timm.__version__}: {type(e).__name__}: {e}'.splitlines()[0][:300]
    return SwinTransformer(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                           drop_path_rate=0.2, out_indices=(0, 1, 2, 3)), 'mmdet SwinTransformer'


def environment(device: torch.device) -> dict:
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    env = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               triton=version('triton'), timm=version('timm'), mmengine=version('mmengine'),
               device=device.type, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               recompile_limit=_dynamo_config('recompile_limit'))
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f'{props.major}.{props.minor}',
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    try:
        import subprocess
        env['mmdat_commit'] = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True,
                                             text=True, timeout=10).stdout.strip() or None
    except Exception:  # no git on the machine
        env['mmdat_commit'] = None
    return env


def _dynamo_config(name, value=None):
    """Dynamo's config ``name`` (set to ``value`` first, when given), ``None`` where it has none."""
    import torch._dynamo.config as config  # `import torch` alone does not load it
    if name not in config.get_config_copy():
        return None
    if value is not None:
        setattr(config, name, value)
    return getattr(config, name)


def flex_graphs() -> Dict[str, Optional[int]]:
    """How many compiled graphs Dynamo holds for each kind's FlexAttention entry (``None``
    where this torch cannot tell)."""
    import torch._dynamo.eval_frame

    from mmdat.ops.deformable import cuda as deformable_cuda
    from mmdat.ops.neighborhood import cuda as neighborhood_cuda
    graphs = {}
    for kind, entry in (('deformable', deformable_cuda._flex_entry), ('neighborhood', neighborhood_cuda._flex_entry)):
        try:
            graphs[kind] = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(entry.__code__))
        except Exception:  # a private helper: gone in some torch
            graphs[kind] = None
    return graphs


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Timer:
    """Median / min time of ``step`` over ``repeats`` after ``warmup``, and peak memory."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, step: Callable[[], None]) -> dict:
        cuda = self.device.type == 'cuda'
        first_s = None
        for i in range(self.warmup):
            t = time.perf_counter()
            step()
            if i == 0:  # compiles what the step needs compiled
                _sync(self.device)
                first_s = time.perf_counter() - t
        if cuda:
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(self.repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                step()
                times.append((time.perf_counter() - t) * 1e3)
        result = dict(ms=statistics.median(times), min_ms=min(times))
        if first_s is not None:
            result['first_s'] = round(first_s, 2)
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            result.update(peak_mib=peak / 2 ** 20, peak_above_base_mib=(peak - base) / 2 ** 20)
        return result


def _autocast(device, precision, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype, enabled=precision == 'amp')


def _outputs_sum(out) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return sum(o.float().sum() for o in outs)


def train_step(model, x, device, precision, amp_dtype, impl_context):
    def step():
        model.zero_grad(set_to_none=True)
        with impl_context(), _autocast(device, precision, amp_dtype):
            loss = _outputs_sum(model(x))
        loss.backward()
    return step


def block_inputs(backbone, stage: int, letter: str, hw, batch: int, device):
    """The attention module of the stage's first ``letter`` block and a random input of its shape."""
    spec = backbone.arch_settings['stage_specs'][stage]
    attn = backbone.stages[stage].blocks[spec.index(letter)].attn
    H, W = hw
    for _ in range(stage + 2):  # stem (stride 4), then stride 2 per stage (padding 1 for ++, ceil for v1)
        H, W = -(-H // 2), -(-W // 2)
    x = torch.randn(batch, backbone.arch_settings['embed_dims'][stage], H, W, device=device)
    return attn, x


def _relative_error(a: Optional[torch.Tensor], b: Optional[torch.Tensor], floor: float = 0.) -> Optional[float]:
    """``max |a - b| / max |b|``, the denominator at least ``floor``."""
    if a is None or b is None:
        return None if a is None and b is None else math.inf
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(max(floor, 1e-30)))


def parity(module, x, device, precision, amp_dtype, attention_impl) -> dict:
    """Fast vs reference: relative max differences of the output and of every gradient."""
    generator = torch.Generator(device=device).manual_seed(0)
    results = {}
    grad_out = None
    for impl in ('reference', 'fast'):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with attention_impl(impl), _autocast(device, precision, amp_dtype):
            out = module(xi)
        if grad_out is None:
            grad_out = torch.randn(out.shape, device=device, generator=generator, dtype=out.dtype)
        out.backward(grad_out.to(out.dtype))
        results[impl] = dict(out=out.detach(), x=xi.grad,
                             **{n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()})
    ref, fast = results['reference'], results['fast']
    # Gradients that vanish in exact arithmetic (the key bias: softmax ignores a constant
    # per query) are rounding noise on both sides: a parameter's error is relative to at
    # least 1e-3 of the largest parameter gradient.
    largest = max(float(g.abs().max()) for n, g in ref.items() if n not in ('out', 'x') and g is not None)
    errors = {name: _relative_error(fast[name], ref[name], 0. if name in ('out', 'x') else 1e-3 * largest)
              for name in ref}
    params = {n: e for n, e in errors.items() if n not in ('out', 'x')}
    worst = max(params, key=lambda n: -1 if params[n] is None else params[n])
    return dict(out=errors['out'], grad_x=errors['x'], grad_params_max=params[worst], worst_param=worst,
                grad_tables={n: e for n, e in params.items() if 'relative_position' in n},
                grad_offset_max=max([e for n, e in params.items() if n.startswith('offset.')], default=None))


def block_step(attn, x, device, precision, amp_dtype, attention_impl, impl) -> Callable[[], torch.Tensor]:
    """One forward + backward of ``attn`` on ``x`` (which requires grad) with ``impl``; returns the output."""
    def step():
        attn.zero_grad(set_to_none=True)
        x.grad = None
        with attention_impl(impl), _autocast(device, precision, amp_dtype):
            out = attn(x)
        out.float().sum().backward()
        return out.detach()
    return step


#: the FlexAttention entry a block letter compiles (none for window attention: SDPA)
_FLEX_KIND = {'D': 'deformable', 'N': 'neighborhood'}


def first_calls(attn, x, letter, device, precision, amp_dtype, attention_impl, repeats) -> dict:
    """The fast path's first call on ``x`` (compile included), its steady time after, the
    graphs the kind's FlexAttention entry then has, and its output against the reference."""
    from mmdat.ops.flex import compile_failures
    kind = _FLEX_KIND.get(letter)
    step = block_step(attn, x, device, precision, amp_dtype, attention_impl, 'fast')
    before = flex_graphs().get(kind)
    t = time.perf_counter()
    out = step()
    _sync(device)
    first_s = time.perf_counter() - t
    steady = Timer(device, 0, repeats)(step)
    after = flex_graphs().get(kind)
    with torch.no_grad(), attention_impl('reference'), _autocast(device, precision, amp_dtype):
        ref = attn(x)
    return dict(first_s=round(first_s, 2), steady_ms=steady['ms'], graphs=after,
                new_graphs=None if before is None or after is None else after - before,
                out_error=_relative_error(out, ref), fallback=compile_failures().get(kind) if kind else None)


class _Caught(Exception):
    pass


def deformable_operands(attn, x, device, precision, amp_dtype, attention_impl) -> list:
    """The operands a ``D`` block passes its attention op (caught on the way in: the op does
    not run), detached: ``q, k, v, pos, table, qy, qx, groups``."""
    from mmdat.ops import deformable as deformable_ops
    original, operands = deformable_ops.deformable_attention, []

    def catch(backend, *args):
        operands.extend(args)
        raise _Caught

    deformable_ops.deformable_attention = catch
    try:
        with torch.no_grad(), attention_impl('fast'), _autocast(device, precision, amp_dtype):
            attn(x)
    except _Caught:
        pass
    finally:
        deformable_ops.deformable_attention = original
    if len(operands) != 8:
        raise RuntimeError('the block did not call mmdat.ops.deformable.deformable_attention as expected')
    return [a.detach() if torch.is_tensor(a) else a for a in operands]


def captured_case(operands, variant, device, precision, amp_dtype, timer) -> dict:
    """Forward + backward of the deformable op with the gradients of ``CAPTURED_VARIANTS[variant]``
    (by FlexAttention; ``sdpa_bias``: by the fallback); for ``all`` also the forward alone."""
    from mmdat.ops.deformable import cuda as deformable_cuda
    q, k, v, pos, table, qy, qx, groups = operands
    wanted = CAPTURED_VARIANTS[variant].split()
    leaves = {n: t.clone().requires_grad_(n in wanted) for n, t in dict(q=q, k=k, v=v, pos=pos, table=table).items()}
    fn = (deformable_cuda.deformable_attention_sdpa_bias if variant == 'sdpa_bias'
          else deformable_cuda.deformable_attention_flex)
    args = (leaves['q'], leaves['k'], leaves['v'], leaves['pos'], None if variant == 'no bias' else leaves['table'],
            qy, qx, groups)
    grad_out = []

    def forward():
        with _autocast(device, precision, amp_dtype):
            return fn(*args)

    def step():
        for t in leaves.values():
            t.grad = None
        out = forward()
        if not grad_out:
            g = torch.Generator(device=device).manual_seed(0)
            grad_out.append(torch.randn(out.shape, device=device, generator=g, dtype=out.dtype))
        out.backward(grad_out[0])

    result = dict(grads=' '.join(wanted), **timer(step))
    if variant == 'all':
        result['fwd_ms'] = Timer(device, min(timer.warmup, 1), timer.repeats)(forward)['ms']
    result['flex_graphs'] = flex_graphs()['deformable']
    return result


def captured_shares(rows: List[dict]) -> List[dict]:
    """Per block: what the captured tensors' gradients (FlexAttention's atomic adds into the
    positions and the table) add to the op's forward + backward, from the ``captured`` rows."""
    def ms(variant, key='ms'):
        r = _find(rows, block=block, variant=variant)
        return None if r is None else r.get(key)

    def diff(a, b):
        return None if a is None or b is None else round(a - b, 3)

    def ratio(a, b):
        return None if a is None or not b else round(a / b, 3)

    shares = []
    for block in dict.fromkeys(r['block'] for r in rows):
        total = ms('all')
        backward = diff(total, ms('all', 'fwd_ms'))
        captured = diff(total, ms('both detached'))
        shares.append(dict(block=block, all_ms=total, backward_ms=backward, captured_grads_ms=captured,
                           captured_share_of_backward=ratio(captured, backward),
                           captured_share_of_all=ratio(captured, total),
                           pos_grad_ms=diff(total, ms('pos detached')), table_grad_ms=diff(total, ms('table detached')),
                           bias_ms=diff(ms('both detached'), ms('no bias')),
                           sdpa_bias_over_flex=ratio(ms('sdpa_bias'), total)))
    return shares


class Run:
    """The cases of one invocation, their results and the time budget."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device('cpu' if args.smoke or not torch.cuda.is_available() else 'cuda')
        self.amp_dtype = getattr(torch, args.amp_dtype if self.device.type == 'cuda' else 'bfloat16')
        self.timer = Timer(self.device, args.warmup, args.repeats)
        self.start = time.perf_counter()
        self.results: Dict[str, List[dict]] = {section: [] for section in SECTIONS}
        self.skipped: List[str] = []

    def case(self, section: str, record: dict, fn: Callable[[], dict]):
        label = ' '.join(str(v) for v in record.values())
        if time.perf_counter() - self.start > self.args.budget_s:
            self.skipped.append(f'{section}: {label}')
            return
        t = time.perf_counter()
        try:
            record.update(fn())
        except torch.cuda.OutOfMemoryError:
            record['error'] = 'out of memory'
        except Exception as e:  # one failing case must not stop the others
            record['error'] = f'{type(e).__name__}: {e}'.splitlines()[0][:300]
            traceback.print_exc()
        record['wall_s'] = round(time.perf_counter() - t, 1)
        self.results[section].append(record)
        print(f'[{time.perf_counter() - self.start:6.1f} s] {section}: {label} '
              f'{record.get("error") or ""}', flush=True)
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:  # one thread: on a shared CPU, spinning OpenMP workers slowed the smoke run 10x
        torch.set_num_threads(1)
    run = Run(args)
    device = run.device
    DAT, attention_impl, how = import_mmdat()
    env = environment(device)
    env['mmdat_import'] = how
    print(json.dumps(env, indent=1), flush=True)

    env['recompile_limit'] = _dynamo_config('recompile_limit', RECOMPILE_LIMIT)
    torch.manual_seed(0)
    backbones = {name: DAT(**cfg).to(device) for name, cfg in DAT_BACKBONES.items()}
    for b in backbones.values():
        b.train()
    # the first precision that is autocast (the training setting), for the sections that run one
    amp = 'amp' if 'amp' in args.precisions else args.precisions[0]

    if 'compile' in args.sections:
        sizes = [_hw(s) for s in args.compile_sizes]
        for i, (name, stage, letter) in enumerate(COMPILE_BLOCKS):
            for size in sizes:
                attn, x = block_inputs(backbones[name], stage, letter, size, args.batch, device)
                x.requires_grad_()
                if i == 0 and size == sizes[0]:  # CUDA context, cuBLAS and cuDNN set up outside the timings
                    block_step(attn, x, device, amp, run.amp_dtype, attention_impl, 'reference')()
                run.case('compile', dict(block=f'{name}.s{stage + 1}.{letter}', size='x'.join(map(str, size)),
                                         map=list(x.shape[2:]), precision=amp),
                         lambda: first_calls(attn, x, letter, device, amp, run.amp_dtype, attention_impl,
                                             max(1, args.repeats // 2)))

    if 'parity' in args.sections:
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        for name, stage, letter in args.blocks:
            attn, x = block_inputs(backbones[name], stage, letter, args.hw, args.batch, device)
            for precision in args.precisions:
                run.case('parity', dict(block=f'{name}.s{stage + 1}.{letter}', precision=precision),
                         lambda: parity(attn, x, device, precision, run.amp_dtype, attention_impl))
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    if 'captured' in args.sections:
        for name, stage, letter in args.captured_blocks:
            attn, x = block_inputs(backbones[name], stage, letter, args.hw, args.batch, device)
            try:
                operands = deformable_operands(attn, x, device, amp, run.amp_dtype, attention_impl)
            except Exception as e:
                run.results['captured'].append(dict(block=f'{name}.s{stage + 1}.{letter}', error=repr(e)[:300]))
                continue
            for variant in CAPTURED_VARIANTS:
                run.case('captured', dict(block=f'{name}.s{stage + 1}.{letter}', variant=variant, precision=amp),
                         lambda: captured_case(operands, variant, device, amp, run.amp_dtype, run.timer))
            del operands

    if 'backbones' in args.sections:
        x = torch.randn(args.batch, 3, *args.hw, device=device)
        swin, env['swin_t'] = build_swin(args.hw)
        if swin is not None:
            swin.to(device).train()  # (mmdet's train() returns None)
        models = dict(backbones, swin_t=swin)
        for precision in args.backbone_precisions:
            for name, model in models.items():
                for impl in (('-',) if name == 'swin_t' else ('fast', 'reference')):
                    record = dict(backbone=name, impl=impl, precision=precision)
                    if model is None:
                        record['error'] = env['swin_t']
                        run.results['backbones'].append(record)
                        continue

                    def context(impl=impl):
                        return attention_impl('fast' if impl == '-' else impl)
                    run.case('backbones', record,
                             lambda: run.timer(train_step(model, x, device, precision, run.amp_dtype, context)))

    if 'blocks' in args.sections:
        for name, stage, letter in args.blocks:
            attn, x = block_inputs(backbones[name], stage, letter, args.hw, args.batch, device)
            x.requires_grad_()
            for precision in args.precisions:
                for impl in ('fast', 'reference'):
                    run.case('blocks', dict(block=f'{name}.s{stage + 1}.{letter}', impl=impl, precision=precision),
                             lambda: run.timer(block_step(attn, x, device, precision, run.amp_dtype, attention_impl,
                                                          impl)))

    from mmdat.ops.flex import compile_failures
    report = dict(environment=env, settings=dict(size=args.hw, batch=args.batch, precisions=args.precisions,
                                                  amp_dtype=str(run.amp_dtype), warmup=args.warmup,
                                                  repeats=args.repeats, smoke=args.smoke,
                                                  compile_sizes=args.compile_sizes, sections=args.sections),
                  **run.results, captured_shares=captured_shares(run.results['captured']),
                  goals=goals(run.results), flex_graphs=flex_graphs(), compile_failures=compile_failures(),
                  skipped=run.skipped, total_s=round(time.perf_counter() - run.start, 1))
    print(format_report(report))
    out = args.out or osp.join(REPO, 'work_dirs', 'gpu_benchmark',
                               f'{env.get("gpu", "cpu").replace(" ", "_")}{"_smoke" if args.smoke else ""}.json')
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(report, f, indent=1)
    print(f'wrote {out}')
    return report


def _find(rows, **keys):
    for r in rows:
        if all(r.get(k) == v for k, v in keys.items()) and 'error' not in r:
            return r
    return None


def goals(results) -> List[dict]:
    """The issue's GPU goals (AMP): ratios and whether each holds, where both sides were measured."""
    checks = []

    def ratio(what, a, b, key, bound):
        if a is not None and b is not None and key in a and key in b:
            value = a[key] / b[key]
            checks.append(dict(goal=what, ratio=round(value, 3), bound=bound, holds=value <= bound))
        else:
            checks.append(dict(goal=what, ratio=None, bound=bound, holds=None))

    bb = results['backbones']
    swin = _find(bb, backbone='swin_t', precision='amp')
    for name, time_bound, mem_bound in (('datpp_t', 1.3, 1.0), ('dat_t', 1.0, 1.0)):
        dat = _find(bb, backbone=name, impl='fast', precision='amp')
        ratio(f'{name} / swin_t time (amp)', dat, swin, 'ms', time_bound)
        ratio(f'{name} / swin_t peak memory (amp)', dat, swin, 'peak_mib', mem_bound)
    for block in sorted({r['block'] for r in results['blocks'] if r['block'].endswith('.D')}):
        fast = _find(results['blocks'], block=block, impl='fast', precision='amp')
        ref = _find(results['blocks'], block=block, impl='reference', precision='amp')
        ratio(f'{block} fast / reference time (amp)', fast, ref, 'ms', 0.2)
        ratio(f'{block} fast / reference memory (amp)', fast, ref, 'peak_above_base_mib', 0.2)
    return checks


def _num(v, fmt='{:.1f}'):
    return '-' if v is None else fmt.format(v)


def format_report(report) -> str:
    lines = [f'device: {report["environment"].get("gpu", "cpu")}, torch {report["environment"]["torch"]}, '
             f'CUDA {report["environment"]["cuda"]}; input {report["settings"]["size"]}, '
             f'batch {report["settings"]["batch"]}']
    if report['compile']:
        lines += ['', 'compile: first calls of the fast path at map sizes in a row (forward + backward)',
                  f'{"block":<14} {"size":<9} {"map":<9} {"first s":>8} {"steady ms":>9} {"graphs":>6} {"new":>4} '
                  f'{"out err":>8}  fallback / error']
        for r in report['compile']:
            lines.append(f'{r["block"]:<14} {r["size"]:<9} {"x".join(map(str, r["map"])):<9} '
                         f'{_num(r.get("first_s"), "{:.2f}"):>8} {_num(r.get("steady_ms")):>9} '
                         f'{_num(r.get("graphs"), "{}"):>6} {_num(r.get("new_graphs"), "{}"):>4} '
                         f'{_num(r.get("out_error"), "{:.1e}"):>8}  {r.get("error") or r.get("fallback") or ""}')
    if report['captured']:
        lines += ['', 'captured: the D blocks\' op, forward + backward; gradients to',
                  f'{"block":<14} {"variant":<15} {"grads":<16} {"ms":>8} {"fwd ms":>8} {"+peak MiB":>9}']
        for r in report['captured']:
            lines.append(f'{r["block"]:<14} {r.get("variant", "-"):<15} {r.get("grads", ""):<16} '
                         f'{_num(r.get("ms")):>8} {_num(r.get("fwd_ms")):>8} '
                         f'{_num(r.get("peak_above_base_mib"), "{:.0f}"):>9}  {r.get("error") or ""}')
        for c in report['captured_shares']:
            lines.append(f'{c["block"]}: captured gradients {_num(c["captured_grads_ms"])} ms = '
                         f'{_num(c["captured_share_of_backward"], "{:.0%}")} of the backward '
                         f'({_num(c["backward_ms"])} ms), {_num(c["captured_share_of_all"], "{:.0%}")} of forward + '
                         f'backward; positions {_num(c["pos_grad_ms"])} ms, table {_num(c["table_grad_ms"])} ms; '
                         f'SDPA fallback / flex {_num(c["sdpa_bias_over_flex"], "{:.2f}")}')
    if report['parity']:
        lines += ['', 'parity (fast vs reference, max |diff| / max |reference|)',
                  f'{"block":<18} {"prec":<5} {"out":>9} {"grad x":>9} {"grad params":>11}  worst param / error']
        for r in report['parity']:
            lines.append(f'{r["block"]:<18} {r["precision"]:<5} {_num(r.get("out"), "{:.1e}"):>9} '
                         f'{_num(r.get("grad_x"), "{:.1e}"):>9} {_num(r.get("grad_params_max"), "{:.1e}"):>11}  '
                         f'{r.get("error") or r.get("worst_param")}')
    for section, key in (('blocks', 'block'), ('backbones', 'backbone')):
        if report[section]:
            lines += ['', f'{section}: forward + backward',
                      f'{key:<18} {"impl":<9} {"prec":<5} {"ms":>9} {"min ms":>9} {"peak MiB":>9} {"+peak MiB":>9}']
            for r in report[section]:
                lines.append(f'{r[key]:<18} {r["impl"]:<9} {r["precision"]:<5} {_num(r.get("ms")):>9} '
                             f'{_num(r.get("min_ms")):>9} {_num(r.get("peak_mib"), "{:.0f}"):>9} '
                             f'{_num(r.get("peak_above_base_mib"), "{:.0f}"):>9}  {r.get("error") or ""}')
    if report['goals']:
        lines += ['', 'goals']
        for g in report['goals']:
            state = {True: 'holds', False: 'FAILS', None: 'not measured'}[g['holds']]
            lines.append(f'{g["goal"]:<48} {_num(g["ratio"], "{:.3f}"):>7} <= {g["bound"]:<4} {state}')
    lines.append(f'FlexAttention graphs: {report["flex_graphs"]}; fallbacks: {report["compile_failures"] or "none"}')
    if report['skipped']:
        lines += ['', f'skipped (time budget): {len(report["skipped"])} cases']
    lines.append(f'total {report["total_s"]} s')
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
