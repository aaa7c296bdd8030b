"""Train a model from an OpenMMLab config (mmdet, mmseg or mmpretrain) with MMEngine's Runner.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                                 [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]

``--resume`` without a path resumes from the last checkpoint in the work dir (if any);
with a path, from that checkpoint (weights, optimizer, schedulers, iteration counter).
Distributed runs work without CUDA too: there the backend is gloo (see
``mmdat.utils.launch``). Use tools/dist_train.sh or tools/slurm_train.sh to launch them.
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
from mmdat.utils.launch import load_config, resolve_default_scope, setup_cpu_distributed  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model (mmdet / mmseg / mmpretrain config)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and checkpoints')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: fp16 AmpOptimWrapper on an accelerator, bf16 autocast on CPU')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate with the total batch size (auto_scale_lr in the config)')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint; without a path, from the latest checkpoint in the work dir')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value pairs; e.g. train_cfg.max_iters=10 '
        'or "model.backbone.out_indices=[0,1]" (quote lists, no white space)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_config(args) -> Config:
    cfg = load_config(args.config, args.launcher, args.cfg_options, args.work_dir)

    if args.amp:
        optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if optim_wrapper in ('AmpOptimWrapper', 'CPUBF16OptimWrapper'):
            print('AMP is already enabled in the config.', flush=True)
        elif optim_wrapper != 'OptimWrapper':
            raise SystemExit(f'--amp is only supported with OptimWrapper, not {optim_wrapper}')
        elif _has_accelerator():
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
        else:  # MMEngine's AmpOptimWrapper needs an accelerator: bf16 autocast on CPU
            cfg.optim_wrapper.type = 'CPUBF16OptimWrapper'
            print('--amp on CPU: bfloat16 autocast of the backbone and neck (CPUBF16OptimWrapper)', flush=True)

    if args.auto_scale_lr:
        if 'auto_scale_lr' in cfg and 'enable' in cfg.auto_scale_lr and 'base_batch_size' in cfg.auto_scale_lr:
            cfg.auto_scale_lr.enable = True
        else:
            raise RuntimeError('--auto-scale-lr needs `auto_scale_lr = dict(enable=..., base_batch_size=...)` '
                               'in the config')

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def _has_accelerator() -> bool:
    from mmengine.device import is_cuda_available, is_mlu_available, is_npu_available
    return is_cuda_available() or is_npu_available() or is_mlu_available()


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args)
    scope = resolve_default_scope(cfg)
    if scope:
        init_default_scope(scope)
    setup_cpu_distributed(cfg, args.launcher)

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()


if __name__ == '__main__':
    main()
