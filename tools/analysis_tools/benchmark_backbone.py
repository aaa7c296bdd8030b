"""Time and peak memory of deformable-attention blocks and whole backbones.

    python tools/analysis_tools/benchmark_backbone.py                    # everything
    python tools/analysis_tools/benchmark_backbone.py --cases blocks --repeats 1
    python tools/analysis_tools/benchmark_backbone.py --cases backbones --sizes 512x512 \\
        --backbones datpp_t swin_t

Cases:

* ``blocks``: one deformable attention (spec letter ``D``: offsets, sampling, attention,
  projections) at the three shapes of the issue, 800x1344 input, batch 1:
  ``datpp_t_s1`` (DAT-T++ stage 1: C 64, 200x336 queries, key stride 8, 2 heads, 1 group),
  ``datpp_t_s3`` (DAT-T++ stage 3: C 256, 50x84, stride 2, 8 heads, 4 groups),
  ``dat_t_s3_r1`` (DAT-T stage 3 at key stride 1: C 384, 50x84, 12 heads, 3 groups); each
  with the ``reference`` and the ``fast`` path (``--impls``); ratios are fast / reference.
* ``backbones``: the backbones of ``configs/mask_rcnn_dat_t_3x.py`` (``dat_t``),
  ``configs/mask_rcnn_datpp_t_3x.py`` (``datpp_t``) and mmdet's Swin-T
  (``mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``, ``swin_t``), built from
  ``cfg.model.backbone`` with mmdet's registry (no checkpoint), at each ``--sizes``;
  ratios are model / Swin-T at the same size. DAT backbones run their default (fast)
  attention paths; ``--backbone-impls reference`` adds the reference paths.
* ``detectors`` (not in the default list: minutes per case on a CPU): the whole Mask R-CNN
  of the same three configs (``cfg.model``, random weights) on ``--detector-batch`` random
  images of ``--detector-size`` (default 800x1280, i.e. 1280x800), through the model's data
  preprocessor: ``fwd`` is inference (``mode='predict'``: RPN, RoI heads, NMS, masks pasted
  at full size), ``fwd+bwd`` a training step (``mode='loss'`` on 10 random boxes with box
  masks per image, then backward). The report adds images per second (``img/s``).

Every case runs in a fresh subprocess, twice: ``fwd`` (eval mode, ``torch.no_grad()``)
and ``fwd+bwd`` (train mode; forward, sum of the outputs, backward). Time: the median
(and min) wall-clock time of ``--repeats`` runs after ``--warmup`` runs; on CPU also the
median process CPU time (``cpu s``: all threads; on a busy machine, with ``--threads 1``,
the least disturbed measure of the work done) and the median count of minor page faults per
run (``faults k``, thousands): memory the allocator took fresh from the OS, whose first touch
is system time, the largest source of run-to-run variation on a VM (each fault costs a few
microseconds; the count varies between runs of the same code). ``--rounds N`` runs the
whole list N times, interleaved, and reports each case over all its runs: on a machine whose
speed drifts (a shared VM) the ratios then compare cases measured side by side. By default
the backbones run 3 rounds and the rest 1 (``DEFAULT_ROUNDS``). Peak memory:

* CPU: the subprocess's peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``) at the
  end of the case, reported raw (``peak RSS``) and minus the resident set measured after
  the imports, before the model and the input are built (``mem``: what the case itself
  needed, model weights and input included). Ratios use ``mem``.
* CUDA: ``torch.cuda.max_memory_allocated()`` over the timed runs (after one warmup), the
  CUDA caching allocator's peak of live tensors. ``--amp`` adds fp16-autocast cases.

The load average and the CPU affinity are printed: CPU timings are only comparable on an
otherwise idle machine (pin with ``taskset -c 0,1`` and keep ``--threads`` to the cores).
The case subprocesses run with ``OMP_WAIT_POLICY=PASSIVE`` by default: on a shared machine,
OpenMP threads spinning at barriers take the cores their peers need, which slowed every
model 2-3x here (most those with many parallel ops, such as the tiled attention paths);
``--omp-wait-policy inherit`` keeps the environment's setting. On an idle machine PASSIVE has
its own cost: every parallel region wakes the sleeping workers (about 85 us on the 2-core VM
this was written on), which weighs on models with many regions (a DAT-T++ fwd+bwd step at
800x1344 has about 2000, DAT-T 800, Swin-T 1200); ``inherit`` measures what a default environment gets.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time
from typing import List

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

#: name -> (embed_dims, heads, groups, key_stride, offset kernel, offset_range_factor,
#:          table size, flavor, H, W)
BLOCKS = {
    'datpp_t_s1': (64, 2, 1, 8, 9, -1, 56, 'pp', 200, 336),
    'datpp_t_s3': (256, 8, 4, 2, 5, -1, 14, 'pp', 50, 84),
    'dat_t_s3_r1': (384, 12, 3, 1, 5, 2, 14, 'pp', 50, 84),
}
BACKBONES = {
    'dat_t': osp.join(REPO, 'configs', 'mask_rcnn_dat_t_3x.py'),
    'datpp_t': osp.join(REPO, 'configs', 'mask_rcnn_datpp_t_3x.py'),
    'swin_t': 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cases', nargs='+', default=['blocks', 'backbones'], choices=['blocks', 'backbones', 'detectors'])
    p.add_argument('--blocks', nargs='+', default=list(BLOCKS), choices=list(BLOCKS))
    p.add_argument('--impls', nargs='+', default=['reference', 'fast'], choices=['reference', 'fast'],
                   help='deformable attention paths of the block cases')
    p.add_argument('--backbones', nargs='+', default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument('--backbone-impls', nargs='+', default=['fast'], choices=['reference', 'fast'],
                   help='attention paths of the DAT backbones (Swin-T has one)')
    p.add_argument('--sizes', nargs='+', default=['800x1344', '512x512'], help='backbone inputs HxW')
    p.add_argument('--detectors', nargs='+', default=list(BACKBONES), choices=list(BACKBONES),
                   help='Mask R-CNN configs of the detector cases')
    p.add_argument('--detector-size', default='800x1280', help='detector input HxW')
    p.add_argument('--detector-batch', type=int, default=1, help='images per detector step')
    p.add_argument('--modes', nargs='+', default=['fwd', 'fwd+bwd'], choices=['fwd', 'fwd+bwd'])
    p.add_argument('--repeats', type=int, default=3, help='timed runs per case and round')
    p.add_argument('--rounds', type=int, default=None,
                   help='run the whole list of cases this many times, interleaved, and report each case '
                   'over all its runs: a machine whose speed drifts then slows all cases alike '
                   '(default: DEFAULT_ROUNDS per kind of case)')
    p.add_argument('--warmup', type=int, default=1, help='untimed runs before them')
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    p.add_argument('--amp', action='store_true', help='CUDA: also run every case under fp16 autocast')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--omp-wait-policy', default='passive', choices=['passive', 'active', 'inherit'],
                   help="OMP_WAIT_POLICY of the case subprocesses (default passive; 'inherit': leave the "
                   'environment as it is)')
    p.add_argument('--timeout', type=float, default=1800, help='seconds per case subprocess')
    p.add_argument('--json', default=None, help='also write all results to this file')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- worker side

def _rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def _minor_faults() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _import(case):
    """Imports what the case needs, so that the baseline resident set includes them."""
    if case['kind'] == 'block':
        from mmdat.models.layers.deformable_attention import DeformableAttention
        return DeformableAttention
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    import mmdat  # noqa: F401  registers DAT
    register_all_modules()
    return MODELS


def _detector_batch(size, batch: int, train: bool):
    """``batch`` random uint8 images with their data samples; for training, 10 random boxes
    per image with labels and box-shaped masks."""
    import numpy as np
    import torch
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    H, W = size
    gen = torch.Generator().manual_seed(0)
    images, samples = [], []
    for _ in range(batch):
        images.append(torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=gen))
        sample = DetDataSample(metainfo=dict(img_shape=(H, W), ori_shape=(H, W), scale_factor=(1., 1.)))
        if train:
            corner = torch.rand(10, 2, generator=gen) * torch.tensor([W * 0.75, H * 0.75])
            boxes = torch.cat([corner, corner + 16 + torch.rand(10, 2, generator=gen) * torch.tensor([W, H]) / 4], 1)
            masks = np.zeros((10, H, W), dtype=np.uint8)
            for m, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
                m[y0:y1, x0:x1] = 1
            sample.gt_instances = InstanceData(bboxes=boxes, labels=torch.randint(0, 80, (10,), generator=gen),
                                               masks=BitmapMasks(masks, H, W))
        samples.append(sample)
    return dict(inputs=images, data_samples=samples)


def _build(case, factory):
    import torch
    if case['kind'] == 'block':
        C, M, G, r, ks, orf, table, flavor, H, W = BLOCKS[case['name']]
        model = factory(C, M, G, r, ks, orf, (table, table), flavor, attn_impl=case['impl'])
        return model, torch.randn(1, C, H, W)
    from mmengine.config import Config
    from mmengine.hub import get_config
    path = BACKBONES[case['name']]
    cfg = get_config(path) if '::' in path else Config.fromfile(path)
    backbone = cfg.model.backbone
    backbone.pop('init_cfg', None)
    backbone.pop('pretrained', None)
    if case['kind'] == 'detector':
        model = factory.build(cfg.model)
        return model, _detector_batch(case['size'], case['batch'], case['mode'] == 'fwd+bwd')
    model = factory.build(backbone)
    for m in model.modules():
        if hasattr(m, 'attn_impl'):
            m.attn_impl = case['impl']
    H, W = case['size']
    return model, torch.randn(1, 3, H, W)


def _outputs_sum(out):
    import torch
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    return sum(o.float().sum() for o in out)


def run_case(case) -> dict:
    import torch
    if case['threads']:
        torch.set_num_threads(case['threads'])
    device = torch.device(case['device'])
    factory = _import(case)
    base_rss = _rss_mb()
    torch.manual_seed(0)
    model, x = _build(case, factory)
    model = model.to(device)
    train = case['mode'] == 'fwd+bwd'
    model.train(train)
    amp = torch.autocast(device.type, dtype=torch.float16, enabled=case['amp'])
    if case['kind'] == 'detector':
        def forward():  # the data preprocessor moves the images to the model's device
            data = model.data_preprocessor(x, train)
            if train:
                return model.parse_losses(model(**data, mode='loss'))[0]
            return model(**data, mode='predict')
    else:
        x = x.to(device)

        def forward():
            out = model(x)
            return _outputs_sum(out) if train else out

    def step():
        if train:
            model.zero_grad(set_to_none=True)
            with amp:
                loss = forward()
            loss.backward()
        else:
            with torch.no_grad(), amp:
                forward()
        if device.type == 'cuda':
            torch.cuda.synchronize()

    for _ in range(case['warmup']):
        step()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times, faults = [], [], []
    for _ in range(case['repeats']):
        start, cpu_start, faults_start = time.perf_counter(), time.process_time(), _minor_faults()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        faults.append(_minor_faults() - faults_start)
    result = dict(case, time=statistics.median(times), time_min=min(times), times=times,
                  cpu=statistics.median(cpu_times), faults=statistics.median(faults))
    if case['kind'] == 'detector':
        result['images_per_s'] = case['batch'] / result['time']
    if device.type == 'cuda':
        result['mem'] = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource
        result['peak_rss'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result['base_rss'] = base_rss
        result['mem'] = result['peak_rss'] - base_rss
    return result


# --------------------------------------------------------------------------- driver side

#: Rounds per kind of case without ``--rounds``. The backbones' ratios compare times within
#: 10-50% of each other, which the drift of a shared VM moves by as much (single rounds of the
#: same code here gave DAT-T++ / Swin-T at 800x1344 from 1.31 to 1.51); the blocks' paths are
#: 6-16x apart, and a detector case takes minutes.
DEFAULT_ROUNDS = {'block': 1, 'backbone': 3, 'detector': 1}


def _cases(args, device):
    amps = [False, True] if (args.amp and device == 'cuda') else [False]
    common = dict(device=device, threads=args.threads, repeats=args.repeats, warmup=args.warmup)
    cases = []
    for amp in amps:
        if 'blocks' in args.cases:
            for name in args.blocks:
                for impl in args.impls:
                    for mode in args.modes:
                        cases.append(dict(common, kind='block', name=name, impl=impl, size=None, mode=mode, amp=amp))
        if 'backbones' in args.cases:
            for size in args.sizes:
                H, W = (int(v) for v in size.lower().split('x'))
                for name in args.backbones:
                    impls = ['-'] if name == 'swin_t' else args.backbone_impls
                    for impl in impls:
                        for mode in args.modes:
                            cases.append(dict(common, kind='backbone', name=name, impl=impl, size=(H, W),
                                              mode=mode, amp=amp))
        if 'detectors' in args.cases:
            H, W = (int(v) for v in args.detector_size.lower().split('x'))
            for name in args.detectors:
                for mode in args.modes:
                    cases.append(dict(common, kind='detector', name=name, impl='-' if name == 'swin_t' else 'fast',
                                      size=(H, W), mode=mode, amp=amp, batch=args.detector_batch))
    return cases


def _rounds(args, cases) -> List[int]:
    """How many rounds each case runs: ``--rounds`` or its kind's default."""
    return [args.rounds or DEFAULT_ROUNDS[case['kind']] for case in cases]


def _spawn(case, timeout, wait_policy='inherit') -> dict:
    cmd = [sys.executable, osp.abspath(__file__), '--worker', json.dumps(case)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    if wait_policy != 'inherit':
        env['OMP_WAIT_POLICY'] = wait_policy.upper()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return dict(case, error=f'timeout after {timeout:.0f} s')
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(case, error=' | '.join(tail) or f'exit code {proc.returncode}')


def _merge(runs):
    """One result from a case's rounds: median and min over all timed runs, median CPU time,
    the largest peak memory."""
    ok = [r for r in runs if 'error' not in r]
    if not ok:
        return runs[-1]
    times = [t for r in ok for t in r['times']]
    merged = dict(ok[0], times=times, time=statistics.median(times), time_min=min(times),
                  cpu=statistics.median(r['cpu'] for r in ok), faults=statistics.median(r['faults'] for r in ok),
                  rounds=len(ok))
    if 'images_per_s' in merged:
        merged['images_per_s'] = merged['batch'] / merged['time']
    for key in ('mem', 'peak_rss', 'base_rss'):
        if key in ok[0]:
            merged[key] = max(r[key] for r in ok)
    return merged


def _label(r):
    size = 'x'.join(map(str, r['size'])) if r.get('size') else ''
    name = r['name'] + (' mrcnn' if r['kind'] == 'detector' else '')
    return name, size, r['impl'], r['mode'] + (' amp' if r['amp'] else '')


def _fmt_ratio(a, b):
    return f'{a / b:.2f}' if a is not None and b else '-'


def report(results, device):
    mem_name = 'mem MB' if device != 'cuda' else 'cuda max MB'
    header = f'{"case":14s} {"input":9s} {"impl":9s} {"mode":12s} {"time s":>8s} {"min s":>8s} {mem_name:>11s}'
    if device != 'cuda':
        header += f' {"peak RSS":>9s} {"cpu s":>8s} {"faults k":>8s}'
    header += f'  {"t ratio":>7s} {"m ratio":>7s}' + ('' if device == 'cuda' else f' {"cpu rat":>7s}') + '  ratio of'
    print(header)
    print('-' * len(header))
    keyed = {_label(r): r for r in results}
    for r in results:
        name, size, impl, mode = _label(r)
        if 'error' in r:
            print(f'{name:14s} {size:9s} {impl:9s} {mode:12s} ERROR: {r["error"]}')
            continue
        if r['kind'] == 'block':
            other, what = keyed.get((name, size, 'reference', mode)), 'fast / reference'
        else:
            swin = 'swin_t' + name[len(r['name']):]
            other = keyed.get((swin, size, '-', mode))
            what = f'{name} / {swin}'
        line = f'{name:14s} {size:9s} {impl:9s} {mode:12s} {r["time"]:8.3f} {r["time_min"]:8.3f} {r["mem"]:11.0f}'
        if device != 'cuda':
            line += f' {r["peak_rss"]:9.0f} {r["cpu"]:8.3f} {r["faults"] / 1000:8.1f}'
        if other is not None and other is not r and 'error' not in other:
            line += f'  {_fmt_ratio(r["time"], other["time"]):>7s} {_fmt_ratio(r["mem"], other["mem"]):>7s}'
            if device != 'cuda':
                line += f' {_fmt_ratio(r["cpu"], other["cpu"]):>7s}'
            line += f'  {what}'
        if 'images_per_s' in r:
            line += f'  ({r["images_per_s"]:.2f} img/s)'
        print(line)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print('RESULT ' + json.dumps(run_case(json.loads(args.worker))), flush=True)
        return
    import torch
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    print(f'torch {torch.__version__}, device {device}'
          + (f' ({torch.cuda.get_device_name()})' if device == 'cuda' else
             f', threads {args.threads or torch.get_num_threads()}, affinity {sorted(os.sched_getaffinity(0))}'))
    policy = os.environ.get('OMP_WAIT_POLICY', '(unset)') if args.omp_wait_policy == 'inherit' else args.omp_wait_policy
    print(f'OMP_WAIT_POLICY of the cases: {policy}')
    print(f'load average at start: {os.getloadavg()}')
    cases = _cases(args, device)
    runs = [[] for _ in cases]
    rounds = _rounds(args, cases)
    for round_ in range(max(rounds, default=0)):
        for case, case_runs, case_rounds in zip(cases, runs, rounds):
            if round_ >= case_rounds:
                continue
            r = _spawn(case, args.timeout, args.omp_wait_policy)
            case_runs.append(r)
            name, size, impl, mode = _label(r)
            status = r.get('error') or f'{r["time"]:.3f} s, {r["mem"]:.0f} MB'
            rnd = f' (round {round_ + 1})' if case_rounds > 1 else ''
            print(f'  {name} {size} {impl} {mode}{rnd}: {status}', flush=True)
    print(f'load average at end: {os.getloadavg()}\n')
    results = [_merge(case_runs) for case_runs in runs]
    report(results, device)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
