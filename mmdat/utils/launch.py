"""Run-time set-up shared by ``tools/train.py`` and ``tools/test.py``.

* :func:`load_config`: the config with ``--cfg-options`` merged and its work dir set.
* :func:`resolve_default_scope`: which OpenMMLab library a config belongs to (``mmdet``,
  ``mmseg`` or ``mmpretrain``), from its ``default_scope`` or, failing that, from where its
  model type is registered.
* :func:`setup_cpu_distributed`: distributed runs on machines without CUDA. MMEngine's
  ``init_dist`` calls ``torch.cuda.set_device`` and its ``Runner`` wraps the model in DDP
  with ``device_ids=[LOCAL_RANK]``; both fail on CPU. There the process group is opened
  here with the ``gloo`` backend, DDP gets ``device_ids=None`` and SyncBN (a CUDA-only
  layer) becomes BN.
"""
import datetime
import importlib
import os
import os.path as osp
import subprocess
from typing import Optional

import torch
import torch.distributed as torch_dist
from mmengine.config import Config

KNOWN_SCOPES = ('mmdet', 'mmseg', 'mmpretrain')


def load_config(path: str, launcher: str, cfg_options: Optional[dict], work_dir: Optional[str]) -> Config:
    """The config at ``path`` with ``cfg_options`` merged; work dir: ``work_dir`` > the
    config's > ``./work_dirs/<config name>``."""
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


def resolve_default_scope(cfg: Config) -> Optional[str]:
    """Sets ``cfg.default_scope`` when the config lacks it and returns the scope."""
    scope = cfg.get('default_scope')
    if scope:
        return scope
    model_type = cfg.get('model', {}).get('type') if isinstance(cfg.get('model'), dict) else None
    if isinstance(model_type, str):
        if '.' in model_type and model_type.split('.')[0] in KNOWN_SCOPES:
            scope = model_type.split('.')[0]
        else:
            for candidate in KNOWN_SCOPES:
                try:
                    registry = importlib.import_module(f'{candidate}.registry').MODELS
                except ImportError:
                    continue
                registry.import_from_location()
                if model_type in registry.module_dict:
                    scope = candidate
                    break
    if scope:
        cfg.default_scope = scope
    return scope


def _replace_sync_bn(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'type' and value in ('SyncBN', 'MMSyncBN'):
                node[key] = 'BN'
            else:
                _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for item in node:
            _replace_sync_bn(item)


def _init_process_group_cpu(launcher: str, dist_cfg: dict) -> None:
    kwargs = {k: v for k, v in dist_cfg.items() if k not in ('backend', 'init_backend', 'port')}
    if kwargs.get('timeout') is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=kwargs['timeout'])
    if launcher == 'slurm':
        node_list = os.environ['SLURM_NODELIST']
        os.environ.setdefault('MASTER_PORT', str(dist_cfg.get('port', 29500)))
        if 'MASTER_ADDR' not in os.environ:
            os.environ['MASTER_ADDR'] = subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1')
        os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        os.environ['RANK'] = os.environ['SLURM_PROCID']
        os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
    elif launcher == 'mpi':
        os.environ.setdefault('MASTER_PORT', '29500')
        os.environ['WORLD_SIZE'] = os.environ['OMPI_COMM_WORLD_SIZE']
        os.environ['RANK'] = os.environ['OMPI_COMM_WORLD_RANK']
        os.environ['LOCAL_RANK'] = os.environ['OMPI_COMM_WORLD_LOCAL_RANK']
    elif launcher != 'pytorch':
        raise ValueError(f'unknown launcher {launcher!r}')
    torch_dist.init_process_group(backend='gloo', **kwargs)


def setup_cpu_distributed(cfg: Config, launcher: str) -> bool:
    """Prepares ``cfg`` (and the process group) for a distributed run without CUDA.

    Does nothing and returns False for ``launcher='none'`` or when CUDA is available.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return False
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = dict(env_cfg.get('dist_cfg') or {})
    dist_cfg['backend'] = 'gloo'
    env_cfg['dist_cfg'] = dist_cfg

    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        wrapper = dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                       find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper = dict(wrapper)
    wrapper['device_ids'] = None  # a CPU module: DDP must not be given devices
    cfg.model_wrapper_cfg = wrapper
    if 'model' in cfg:
        _replace_sync_bn(cfg.model)
    if not torch_dist.is_initialized():
        _init_process_group_cpu(launcher, dist_cfg)
    return True
