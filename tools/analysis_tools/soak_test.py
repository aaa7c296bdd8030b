"""Soak test: train the demo detector for many iterations and watch the process's memory.

    python tools/analysis_tools/soak_test.py [--iters 300] [--config configs/demo/mask_rcnn_dat_demo.py]
                                             [--batch-size 8] [--threads 2] [--work-dir work_dirs/soak]

Runs tools/train.py in a subprocess (no evaluation, no checkpoints), samples the child's
``VmRSS`` (resident memory now) and ``VmHWM`` (peak resident memory so far) from
``/proc/<pid>/status`` every ``--interval`` seconds, and ties each sample to the last
training iteration the child logged. It prints RSS per 10% of the run and the figures
that matter for a leak:

* peak RSS over the first 10% of iterations (after start-up) vs over the last 10%;
* the slope of RSS over the second half of the run (MiB per 100 iterations), which is
  ~0 for flat memory.

Exit status 1 when the training fails, or when ``--max-growth-mib`` is given and the peak
of the last 10% exceeds that of the first 10% by more than that. Linux only (``/proc``).
"""
import argparse
import os
import os.path as osp
import re
import subprocess
import sys
import threading
import time

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='memory soak test of the demo training')
    p.add_argument('--config', default=osp.join(ROOT, 'configs', 'demo', 'mask_rcnn_dat_demo.py'))
    p.add_argument('--iters', type=int, default=300)
    p.add_argument('--batch-size', type=int, default=None, help='override train_dataloader.batch_size')
    p.add_argument('--data-root', default=osp.join(ROOT, 'data', 'shapes'), help='made if absent')
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'soak'))
    p.add_argument('--threads', type=int, default=None, help='OMP_NUM_THREADS of the training')
    p.add_argument('--interval', type=float, default=0.5, help='seconds between memory samples')
    p.add_argument('--max-growth-mib', type=float, default=None)
    p.add_argument('--amp', action='store_true', help="train.py's --amp (bf16 autocast on CPU)")
    p.add_argument('--cfg-options', nargs='+', default=[])
    return p.parse_args(argv)


def read_status(pid):
    out = {}
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith(('VmRSS:', 'VmHWM:')):
                    key, value = line.split(':')
                    out[key] = int(value.split()[0]) / 1024.0  # MiB
    except OSError:
        pass
    return out


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    if not osp.exists(osp.join(args.data_root, 'annotations', 'instances_train.json')):
        from mmdat.datasets.shapes import make_shapes_dataset
        make_shapes_dataset(args.data_root)
    root = args.data_root.rstrip('/') + '/'
    opts = [f'train_cfg.max_iters={args.iters}', f'train_cfg.val_interval={args.iters + 1}',
            f'default_hooks.checkpoint.interval={args.iters + 1}', 'default_hooks.logger.interval=1',
            f'train_dataloader.dataset.data_root={root}', f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}', 'val_cfg=None', 'val_dataloader=None',
            'val_evaluator=None']
    if args.batch_size:
        opts.append(f'train_dataloader.batch_size={args.batch_size}')
    opts += list(args.cfg_options)
    env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'train.py'), args.config, '--work-dir', args.work_dir,
           *(['--amp'] if args.amp else []), '--cfg-options', *opts]
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = {'iter': 0, 'tail': []}
    samples = []  # (seconds, iteration, rss MiB, hwm MiB)
    pattern = re.compile(rf'Iter\(train\) \[\s*(\d+)/{args.iters}\]')

    def pump():
        for line in proc.stdout:
            m = pattern.search(line)
            if m:
                state['iter'] = int(m.group(1))
            state['tail'] = (state['tail'] + [line])[-40:]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while proc.poll() is None:
        s = read_status(proc.pid)
        if 'VmRSS' in s:
            samples.append((time.time() - start, state['iter'], s['VmRSS'], s['VmHWM']))
        time.sleep(args.interval)
    reader.join(timeout=10)
    if proc.returncode != 0 or state['iter'] < args.iters:
        sys.stdout.write(''.join(state['tail']))
        print(f'training failed (exit {proc.returncode}) at iteration {state["iter"]}')
        return 1

    n = args.iters
    train = [s for s in samples if s[1] >= 1]
    first = [s for s in train if s[1] <= max(1, n // 10)]
    last = [s for s in train if s[1] > n - max(1, n // 10)]
    print(f'soak: {n} iterations of {osp.relpath(args.config, ROOT)} in {samples[-1][0]:.0f} s, '
          f'{len(samples)} samples')
    print(' iteration   RSS MiB   peak RSS MiB')
    for k in range(0, 11):
        it = max(1, round(n * k / 10))
        row = min(train, key=lambda s: abs(s[1] - it))
        print(f' {row[1]:9d}   {row[2]:7.1f}   {row[3]:12.1f}')
    peak_first = max(s[2] for s in first)
    peak_last = max(s[2] for s in last)
    half = [s for s in train if s[1] > n // 2]
    xs, ys = [s[1] for s in half], [s[2] for s in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var * 100
    print(f'peak RSS, first 10% of iterations: {peak_first:.1f} MiB')
    print(f'peak RSS, last 10% of iterations:  {peak_last:.1f} MiB  (growth {peak_last - peak_first:+.1f} MiB)')
    print(f'RSS slope over the second half: {slope:+.2f} MiB / 100 iterations')
    print(f'process peak RSS (VmHWM) at the end: {samples[-1][3]:.1f} MiB')
    if args.max_growth_mib is not None and peak_last - peak_first > args.max_growth_mib:
        print(f'FAIL: memory grew by more than {args.max_growth_mib} MiB')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
