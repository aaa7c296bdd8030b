"""The embedded demo: DAT trains and evaluates for real, on CPU, with no data to download.

    python tools/run_demo.py [--work-dir work_dirs/demo] [--record docs/demo.md]

1. writes the synthetic shapes dataset (data/shapes; see mmdat/datasets/shapes.py);
2. trains Mask R-CNN + DAT (configs/demo/mask_rcnn_dat_demo.py) and UperNet + DAT
   (configs/demo/upernet_dat_demo.py) from scratch with tools/train.py, both at once, one
   CPU thread each (``--jobs 1`` runs them one after the other);
3. evaluates them on the val split (COCO bbox / segm mAP; mIoU), draws predictions and
   loss curves into the work dir, prints a summary and writes it as ``summary.json`` and
   ``results.md`` (a Markdown table); ``--record FILE`` also puts that table into FILE
   between the ``<!-- demo-results -->`` markers (docs/demo.md keeps the recorded run).

Every run is seeded: the same machine gives the same numbers. Timings: docs/demo.md.
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

TASKS = {
    'mask_rcnn': dict(config='configs/demo/mask_rcnn_dat_demo.py', title='Mask R-CNN + DAT', scope='mmdet'),
    'upernet': dict(config='configs/demo/upernet_dat_demo.py', title='UperNet + DAT', scope='mmseg'),
}
DEFAULT_DATA_ROOT = 'data/shapes'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train and evaluate DAT on the synthetic shapes set (CPU demo)')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='where logs, checkpoints and pictures go')
    parser.add_argument('--data-root', default=DEFAULT_DATA_ROOT, help='where the shapes dataset is (made if absent)')
    parser.add_argument('--tasks', nargs='+', choices=sorted(TASKS), default=list(TASKS), help='what to train')
    parser.add_argument('--jobs', type=int, default=2, choices=[1, 2],
                        help='trainings run at once (2: both together, one per core)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads per training (default: cores // jobs)')
    parser.add_argument('--iters', type=int, default=None, help='override the iterations of every training')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='extra key=value overrides passed to every training')
    parser.add_argument('--record', metavar='FILE',
                        help='also write the results table into FILE between its demo-results markers')
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- training

def _pump(stream, prefix: str, sink: List[str]):
    """Copies a child's output to ours, line by line, with a prefix (two trainings interleave)."""
    buf = ''
    while True:
        chunk = stream.read1(4096) if hasattr(stream, 'read1') else stream.read(4096)
        if not chunk:
            break
        buf += chunk.decode('utf-8', 'replace')
        while True:
            cut = min([i for i in (buf.find('\n'), buf.find('\r')) if i >= 0], default=-1)
            if cut < 0:
                break
            line, buf = buf[:cut], buf[cut + 1:]
            if line.strip():
                sys.stdout.write(f'{prefix}{line}\n')
                sys.stdout.flush()
                sink.append(line)
    if buf.strip():
        sys.stdout.write(f'{prefix}{buf}\n')
        sink.append(buf)


def _train_command(task: str, work_dir: str, args) -> List[str]:
    cfg_options = list(args.cfg_options)
    if args.iters is not None:
        cfg_options += [f'train_cfg.max_iters={args.iters}', f'train_cfg.val_interval={args.iters}',
                        f'default_hooks.checkpoint.interval={args.iters}']
    if osp.normpath(args.data_root) != osp.normpath(DEFAULT_DATA_ROOT):
        root = args.data_root.rstrip('/') + '/'
        cfg_options += [f'train_dataloader.dataset.data_root={root}', f'val_dataloader.dataset.data_root={root}',
                        f'test_dataloader.dataset.data_root={root}']
        if task == 'mask_rcnn':
            ann = root + 'annotations/instances_val.json'
            cfg_options += [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'train.py'), osp.join(ROOT, TASKS[task]['config']),
           '--work-dir', work_dir]
    if cfg_options:
        cmd += ['--cfg-options'] + cfg_options
    return cmd


def run_trainings(tasks: List[str], work_dirs: Dict[str, str], args) -> Dict[str, dict]:
    """Runs tools/train.py for the tasks, ``args.jobs`` at a time; returns rc and wall time of each."""
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.jobs)
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    results: Dict[str, dict] = {}
    pending = list(tasks)
    running = []
    width = max(len(t) for t in tasks)
    while pending or running:
        while pending and len(running) < args.jobs:
            task = pending.pop(0)
            cmd = _train_command(task, work_dirs[task], args)
            print(f'[demo] training {TASKS[task]["title"]}: {" ".join(cmd)}', flush=True)
            proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            lines: List[str] = []
            pump = threading.Thread(target=_pump, args=(proc.stdout, f'[{task:<{width}}] ', lines), daemon=True)
            pump.start()
            running.append((task, proc, pump, lines, time.time()))
        time.sleep(0.5)
        for item in list(running):
            task, proc, pump, lines, start = item
            # wait4: the exit status and the CPU time of this child alone
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
            pump.join()
            results[task] = dict(rc=rc, seconds=time.time() - start, cpu_seconds=usage.ru_utime + usage.ru_stime,
                                 tail=lines[-30:])
            running.remove(item)
            print(f'[demo] {TASKS[task]["title"]} finished (exit {rc}) in {results[task]["seconds"] / 60:.1f} min '
                  f'({results[task]["cpu_seconds"] / 60:.1f} min of CPU time)', flush=True)
    return results


# ----------------------------------------------------------------------------- results

def read_scalars(work_dir: str) -> List[dict]:
    """The scalars MMEngine logged in the newest run of ``work_dir`` (vis_data/scalars.json)."""
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not files:
        return []
    with open(files[-1]) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_metrics(records: List[dict], keys: List[str]) -> dict:
    for record in reversed(records):
        if any(k in record for k in keys):
            return {k: record[k] for k in record if k not in ('step', 'iter', 'lr', 'data_time', 'time')}
    return {}


def plot_losses(records: List[dict], title: str, out_file: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    train = [r for r in records if 'loss' in r]
    if not train:
        return
    steps = [r.get('iter', r.get('step')) for r in train]
    keys = ['loss'] + sorted({k for r in train for k in r if k.startswith(('loss_', 'decode.loss', 'aux.loss'))})
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key in keys:
        ax.plot(steps, [r.get(key, float('nan')) for r in train], label=key, lw=2.2 if key == 'loss' else 1.2)
    ax.set_xlabel('iteration')
    ax.set_ylabel('training loss (mean over the log interval)')
    ax.set_yscale('log')
    ax.set_title(title)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)


def _checkpoint(work_dir: str) -> Optional[str]:
    last = osp.join(work_dir, 'last_checkpoint')
    if osp.exists(last):
        with open(last) as f:
            path = f.read().strip()
        if osp.exists(path):
            return path
    found = sorted(glob.glob(osp.join(work_dir, 'iter_*.pth')), key=lambda p: int(p.split('_')[-1][:-4]))
    return found[-1] if found else None


def _predict(task: str, work_dir: str, ckpt: str, indices: List[int]):
    """Loads the trained model from its checkpoint and predicts the val images ``indices``."""
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    # the config as the training ran it (MMEngine dumps it into the work dir), overrides included
    dumped = osp.join(work_dir, osp.basename(TASKS[task]['config']))
    cfg = Config.fromfile(dumped if osp.exists(dumped) else osp.join(ROOT, TASKS[task]['config']))
    init_default_scope(TASKS[task]['scope'])
    if task == 'mask_rcnn':
        from mmdet.apis import init_detector
        from mmdet.registry import DATASETS
        model = init_detector(cfg, ckpt, device='cpu')
    else:
        from mmseg.apis import init_model
        from mmseg.registry import DATASETS
        model = init_model(cfg, ckpt, device='cpu')
    import torch
    dataset = DATASETS.build(cfg.val_dataloader.dataset)
    with torch.no_grad():
        samples = [model.test_step(pseudo_collate([dataset[i]]))[0] for i in indices]
    return samples, dataset.metainfo


def draw_detections(samples, metainfo, out_file: str, score_thr: float = 0.5) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import mmcv
    import numpy as np
    from matplotlib.patches import Rectangle

    classes, palette = metainfo['classes'], [np.array(c) / 255 for c in metainfo['palette']]
    fig, axes = plt.subplots(2, len(samples), figsize=(3 * len(samples), 6.3), dpi=110, squeeze=False)
    for col, sample in enumerate(samples):
        img = mmcv.imread(sample.img_path, channel_order='rgb')
        for row, (inst, name) in enumerate(((sample.gt_instances, 'ground truth'),
                                            (sample.pred_instances, f'prediction (score > {score_thr})'))):
            ax = axes[row, col]
            overlay = img.astype(np.float64) / 255
            if 'scores' in inst:
                inst = inst[inst.scores > score_thr]
            masks = inst.masks if 'masks' in inst else None
            if masks is not None and not isinstance(masks, np.ndarray) and hasattr(masks, 'to_ndarray'):
                masks = masks.to_ndarray()
            elif masks is not None and hasattr(masks, 'numpy'):
                masks = masks.cpu().numpy()
            for k in range(len(inst)):
                colour = palette[int(inst.labels[k])]
                if masks is not None:
                    m = masks[k].astype(bool)
                    overlay[m] = 0.45 * overlay[m] + 0.55 * colour
            ax.imshow(overlay)
            for k in range(len(inst)):
                box = inst.bboxes[k]
                x0, y0, x1, y1 = (box.tensor if hasattr(box, 'tensor') else box).reshape(-1).tolist()
                colour = palette[int(inst.labels[k])]
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.5))
                text = classes[int(inst.labels[k])]
                if 'scores' in inst:
                    text += f' {float(inst.scores[k]):.2f}'
                ax.text(x0, y0 - 1, text, fontsize=6.5, color='white', va='bottom',
                        bbox=dict(fc=colour, ec='none', pad=0.6, alpha=0.85))
            ax.set_axis_off()
            if col == 0:
                ax.set_title(name, fontsize=9, loc='left')
    fig.suptitle('Mask R-CNN + DAT on shapes val: ground truth (top) and predictions (bottom)', fontsize=10)
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)


def draw_segmentations(samples, metainfo, out_file: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import mmcv
    import numpy as np
    from matplotlib.patches import Patch

    classes, palette = metainfo['classes'], np.array(metainfo['palette'], np.uint8)
    fig, axes = plt.subplots(3, len(samples), figsize=(3 * len(samples), 9.4), dpi=110, squeeze=False)
    for col, sample in enumerate(samples):
        img = mmcv.imread(sample.img_path, channel_order='rgb')
        gt = sample.gt_sem_seg.data[0].cpu().numpy()
        pred = sample.pred_sem_seg.data[0].cpu().numpy()
        shown = [(img, 'image'), (palette[np.clip(gt, 0, len(classes) - 1)], 'ground truth'),
                 (palette[pred], 'prediction')]
        for row, (picture, name) in enumerate(shown):
            axes[row, col].imshow(picture)
            axes[row, col].set_axis_off()
            if col == 0:
                axes[row, col].set_title(name, fontsize=9, loc='left')
    handles = [Patch(color=np.array(c) / 255, label=n) for n, c in zip(classes, palette)]
    fig.legend(handles=handles, loc='lower center', ncol=len(classes), fontsize=8)
    fig.suptitle('UperNet + DAT on shapes val: image, ground truth, prediction', fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out_file)
    plt.close(fig)


def background_only_miou(data_root: str, num_classes: int) -> float:
    """mIoU of a model that predicts background everywhere (the floor a trained model must beat)."""
    import cv2
    import numpy as np
    maps = [cv2.imread(p, cv2.IMREAD_UNCHANGED)
            for p in sorted(glob.glob(osp.join(data_root, 'annotations', 'validation', '*.png')))]
    if not maps:
        return float('nan')
    background = float(np.mean([np.mean(m == 0) for m in maps]))
    return background / num_classes  # IoU(background) = background share, 0 for the others


RESULTS_START, RESULTS_END = '<!-- demo-results:start -->', '<!-- demo-results:end -->'


def results_markdown(summary: Dict[str, dict], total_minutes: float, cores: int) -> str:
    """The demo's figures as a Markdown table (what ``results.md`` and ``--record`` write)."""
    rows = ['| model | iterations | metric | train + eval (min) | CPU time (min) |',
            '|---|---|---|---|---|']
    for task, entry in summary.items():
        m = entry.get('metrics', {})
        if entry['exit_code'] != 0 or not m:
            metric = f'failed (exit {entry["exit_code"]})'
        elif task == 'mask_rcnn':
            metric = (f'bbox mAP {m.get("coco/bbox_mAP", float("nan")):.3f} '
                      f'(AP50 {m.get("coco/bbox_mAP_50", float("nan")):.3f}), '
                      f'segm mAP {m.get("coco/segm_mAP", float("nan")):.3f}')
        else:
            metric = f'mIoU {m.get("mIoU", float("nan")):.2f}'
            if 'background_only_mIoU' in entry:
                metric += f' (all-background: {entry["background_only_mIoU"]:.1f})'
        rows.append(f'| {entry["title"]} | {entry.get("iterations", "?")} | {metric} | '
                    f'{entry["train_and_eval_minutes"]:.1f} | {entry["cpu_minutes"]:.1f} |')
    rows.append('')
    rows.append(f'Whole demo: {total_minutes:.1f} min wall on {cores} cores.')
    return '\n'.join(rows) + '\n'


def record_results(path: str, table: str) -> None:
    """Replaces what lies between the demo-results markers of ``path`` with ``table``."""
    text = open(path).read() if osp.exists(path) else ''
    if RESULTS_START in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_START, 1)
        tail = rest.split(RESULTS_END, 1)[1]
    else:
        head, tail = text + ('\n' if text and not text.endswith('\n') else ''), '\n'
    with open(path, 'w') as f:
        f.write(f'{head}{RESULTS_START}\n{table}{RESULTS_END}{tail}')



# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    os.makedirs(args.work_dir, exist_ok=True)

    from mmdat.datasets.shapes import VERSION as SHAPES_VERSION, make_shapes_dataset
    t = time.time()
    marker = osp.join(args.data_root, 'shapes.json')
    if osp.exists(marker) and json.load(open(marker)).get('version') == SHAPES_VERSION:
        print(f'[demo] using the shapes dataset under {args.data_root}', flush=True)
    else:
        make_shapes_dataset(args.data_root)
        print(f'[demo] shapes dataset written under {args.data_root} ({time.time() - t:.1f} s)', flush=True)

    work_dirs = {task: osp.join(args.work_dir, task) for task in args.tasks}
    runs = run_trainings(args.tasks, work_dirs, args)

    summary: Dict[str, dict] = {}
    for task in args.tasks:
        records = read_scalars(work_dirs[task])
        title = TASKS[task]['title']
        entry = dict(title=title, config=TASKS[task]['config'], exit_code=runs[task]['rc'],
                     train_and_eval_minutes=round(runs[task]['seconds'] / 60, 2),
                     cpu_minutes=round(runs[task]['cpu_seconds'] / 60, 2),
                     work_dir=work_dirs[task])
        train_records = [r for r in records if 'loss' in r]
        if train_records:
            entry['iterations'] = train_records[-1].get('iter')
            entry['first_loss'], entry['last_loss'] = train_records[0]['loss'], train_records[-1]['loss']
        if task == 'mask_rcnn':
            entry['metrics'] = final_metrics(records, ['coco/bbox_mAP'])
        else:
            entry['metrics'] = final_metrics(records, ['mIoU'])
        curve = osp.join(args.work_dir, f'{task}_loss.png')
        try:
            plot_losses(records, f'{title}: training loss', curve)
            entry['loss_curve'] = curve if osp.exists(curve) else None
        except Exception as e:  # a picture must not hide the numbers
            print(f'[demo] could not plot the loss curve of {title}: {e!r}', flush=True)
        ckpt = _checkpoint(work_dirs[task]) if runs[task]['rc'] == 0 else None
        if ckpt:
            picture = osp.join(args.work_dir, f'{task}_predictions.png')
            try:
                samples, metainfo = _predict(task, work_dirs[task], ckpt, indices=[0, 1, 2, 3])
                (draw_detections if task == 'mask_rcnn' else draw_segmentations)(samples, metainfo, picture)
                entry['predictions'] = picture
            except Exception as e:
                print(f'[demo] could not draw the predictions of {title}: {e!r}', flush=True)
            entry['checkpoint'] = ckpt
        summary[task] = entry

    total = time.time() - start
    print('\n' + '=' * 78)
    cpu = sum(r.get('cpu_seconds', 0) for r in runs.values()) / 60
    print(f'mmdat demo: DAT trained from scratch on CPU on the synthetic shapes set: {total / 60:.1f} min '
          f'({cpu:.1f} min of CPU time in the trainings, {os.cpu_count()} cores)')
    print('=' * 78)
    failed = False
    for task, entry in summary.items():
        m = entry.get('metrics', {})
        head = (f'{entry["title"]:<17} {entry.get("iterations", "?")} iters, {entry["train_and_eval_minutes"]:.1f} min '
                f'({entry["cpu_minutes"]:.1f} CPU)')
        if entry['exit_code'] != 0 or not m:
            failed = True
            print(f'{head}: FAILED (exit {entry["exit_code"]}); see {entry["work_dir"]}')
            print('\n'.join('    ' + line for line in runs[task]['tail'][-15:]))
            continue
        if task == 'mask_rcnn':
            print(f'{head}: bbox mAP {m.get("coco/bbox_mAP", float("nan")):.3f} '
                  f'(AP50 {m.get("coco/bbox_mAP_50", float("nan")):.3f}), '
                  f'segm mAP {m.get("coco/segm_mAP", float("nan")):.3f} '
                  f'(AP50 {m.get("coco/segm_mAP_50", float("nan")):.3f})')
        else:
            floor = background_only_miou(args.data_root, 4) * 100
            entry['background_only_mIoU'] = round(floor, 2)
            print(f'{head}: mIoU {m.get("mIoU", float("nan")):.2f} (aAcc {m.get("aAcc", float("nan")):.2f}, '
                  f'mAcc {m.get("mAcc", float("nan")):.2f}; all-background would score mIoU {floor:.1f})')
        if 'first_loss' in entry:
            print(f'{"":<17} training loss {entry["first_loss"]:.3f} -> {entry["last_loss"]:.3f}')
        for key in ('loss_curve', 'predictions', 'checkpoint'):
            if entry.get(key):
                print(f'{"":<17} {key.replace("_", " ")}: {entry[key]}')
    with open(osp.join(args.work_dir, 'summary.json'), 'w') as f:
        json.dump(dict(total_minutes=round(total / 60, 2), cores=os.cpu_count(), tasks=summary), f, indent=1,
                  default=str)
    table = results_markdown(summary, total / 60, os.cpu_count() or 1)
    with open(osp.join(args.work_dir, 'results.md'), 'w') as f:
        f.write(table)
    if args.record:
        record_results(args.record, table)
    print(f'summary: {osp.join(args.work_dir, "summary.json")}, {osp.join(args.work_dir, "results.md")}'
          + (f'; recorded in {args.record}' if args.record else ''))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
