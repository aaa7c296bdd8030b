"""Evaluate a checkpoint with an OpenMMLab config (mmdet, mmseg or mmpretrain).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE] [--show-dir DIR]
                                           [--cfg-options KEY=VALUE ...] [--launcher ...]

Runs the config's ``test_dataloader`` / ``test_evaluator`` (COCO mAP, mIoU, accuracy, ...).
``--out`` also dumps the raw predictions to a pickle; ``--show-dir`` draws them.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repo, for a source checkout

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import RUNNERS, init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import mmdat  # noqa: E402,F401  registers DAT; lets torch.load read mmengine checkpoints
from mmdat.models.backbones.dat_checkpoint import checkpoint_for_loading  # noqa: E402
from mmdat.utils.launch import load_config, resolve_default_scope, setup_cpu_distributed  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (evaluate) a model (mmdet / mmseg / mmpretrain config)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation log and metrics')
    parser.add_argument('--out', help='dump the predictions to this pickle file')
    parser.add_argument('--show-dir', help='draw the predictions into this dir (relative: in the work dir)')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation (tta_model / tta_pipeline)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value pairs; e.g. test_dataloader.batch_size=4')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _enable_drawing(cfg: Config, scope: str, show_dir: str) -> None:
    hooks = cfg.default_hooks
    if 'visualization' not in hooks:
        raise RuntimeError('--show-dir needs a `visualization` hook in default_hooks')
    hooks.visualization.draw = True
    if scope == 'mmseg':
        # SegVisualizationHook writes through the visualizer's save dir (a relative one goes
        # into the work dir, as mmdet's does) and draws every `interval`-th batch only.
        cfg.visualizer['save_dir'] = osp.join(cfg.work_dir, show_dir)
        hooks.visualization.interval = 1
    elif scope == 'mmpretrain':
        hooks.visualization.enable = True
        hooks.visualization.out_dir = show_dir
    else:
        hooks.visualization.test_out_dir = show_dir


def build_config(args) -> Config:
    cfg = load_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    # official DAT / DAT-Detection / DAT-Segmentation checkpoints load unconverted (renamed on the way)
    cfg.load_from = checkpoint_for_loading(args.checkpoint, cfg.work_dir)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise RuntimeError('--tta needs `tta_model` and `tta_pipeline` in the config')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args)
    scope = resolve_default_scope(cfg)
    if scope:
        init_default_scope(scope)
    if args.show_dir:
        _enable_drawing(cfg, scope, args.show_dir)
    setup_cpu_distributed(cfg, args.launcher)

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if args.out is not None:
        assert args.out.endswith(('.pkl', '.pickle')), 'the output file must be a pkl file'
        if scope == 'mmdet':
            from mmdet.evaluation import DumpDetResults as Dump
        else:
            from mmengine.evaluator import DumpResults as Dump
        runner.test_evaluator.metrics.append(Dump(out_file_path=args.out))
    metrics = runner.test()
    return metrics


if __name__ == '__main__':
    main()
