import functools
import os
import os.path as osp

import pytest
import torch


def _memoize_mmengine_package_lookups():
    """MMEngine resolves every ``mmdet::`` / ``mmseg::`` / ``mmpretrain::`` base of a config by
    reloading ``pkg_resources`` (``is_installed``) and parsing all of the package's
    ``.mim/model-index.yml`` and metafiles (about 100 YAML files, 0.2 s per
    base) before it looks under ``.mim/configs``; parsing the paper configs once takes some
    170 of these lookups. Installed packages and their metafiles do not change during a test
    session: each is looked up / parsed once (read-only data; the resolution itself is
    MMEngine's, unchanged). Tools run as subprocesses do the full lookups."""
    from mmengine.config import config as mm_config, utils as mm_config_utils
    if getattr(mm_config_utils.load, '_mmdat_tests', False):
        return
    load = mm_config_utils.load
    metafile = functools.lru_cache(maxsize=None)(load)
    marker = f'{os.sep}.mim{os.sep}'

    def cached_load(file, *args, **kwargs):
        if isinstance(file, str) and not args and not kwargs and marker in file and file.endswith(('.yml', '.yaml')):
            return metafile(file)  # only read by mmengine.config.utils._get_cfg_metainfo
        return load(file, *args, **kwargs)

    cached_load._mmdat_tests = True
    mm_config_utils.load = cached_load
    mm_config.is_installed = functools.lru_cache(maxsize=None)(mm_config.is_installed)


_memoize_mmengine_package_lookups()

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_FIXTURES = osp.normpath(osp.join(REPO, '..', 'shared', 'fixtures', 'official'))
DET_CFG = osp.join(REPO, 'configs', 'demo', 'mask_rcnn_dat_demo.py')
SEG_CFG = osp.join(REPO, 'configs', 'demo', 'upernet_dat_demo.py')


def subprocess_env():
    """Environment of the tools run as subprocesses: the repo importable, one thread per
    process (the trainings run side by side on few cores)."""
    return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1',
                PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))

# Small architectures (those of the parity fixtures) that keep tests fast.
NANO_V1 = dict(preset='v1-tiny', embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), groups=(0, 0, 2, 4),
               stage_specs=('LS', 'LS', 'LD', 'LD'))
NANO_PP = dict(preset='pp-tiny', embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), groups=(1, 2, 2, 4),
               stage_specs=('ND', 'ND', 'ND', 'DD'))


def without_native_ops(monkeypatch, native_library, fn):
    """``fn()`` with ``MMDAT_NATIVE_OPS=0``, the cached ``native_library`` rebuilt for it and
    after it."""
    previous = os.environ.get('MMDAT_NATIVE_OPS')
    monkeypatch.setenv('MMDAT_NATIVE_OPS', '0')
    native_library.cache_clear()
    try:
        return fn()
    finally:
        if previous is None:
            monkeypatch.delenv('MMDAT_NATIVE_OPS')
        else:
            monkeypatch.setenv('MMDAT_NATIVE_OPS', previous)
        native_library.cache_clear()


def fixtures_dir():
    """The parity fixtures folder: $MMDAT_PARITY_FIXTURES, else ../shared/fixtures/official."""
    return os.environ.get('MMDAT_PARITY_FIXTURES', DEFAULT_FIXTURES)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    yield


@pytest.fixture(autouse=True)
def _isolated_default_scope():
    """Tools called in-process set MMEngine's global default scope (the latest DefaultScope
    instance); drop the ones a test created so the next test sees the scope it started with."""
    from mmengine.registry import DefaultScope
    before = set(DefaultScope._instance_dict)
    yield
    for name in set(DefaultScope._instance_dict) - before:
        del DefaultScope._instance_dict[name]
