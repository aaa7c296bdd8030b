import os
import os.path as osp

import pytest
import torch

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
