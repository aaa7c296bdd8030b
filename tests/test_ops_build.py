"""``python -m mmdat.ops``: the kernels built ahead of use (as tools/setup_env.sh does)."""
import os
import subprocess
import sys

import pytest

from mmdat.ops.window import cpu

LIBRARIES = ('deformable_attention', 'neighborhood_attention', 'window_attention', 'residual_dwconv')


def _prebuild(**env):
    return subprocess.run([sys.executable, '-m', 'mmdat.ops'], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


@pytest.mark.skipif(not cpu.LIBRARY.available(), reason='no C compiler')
def test_prebuild_builds_every_library():
    result = _prebuild()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split('\n')[:-1] == [f'{name}: built' for name in LIBRARIES]


def test_prebuild_without_a_compiler_says_so_and_exits_1(tmp_path):
    result = _prebuild(MMDAT_CACHE_DIR=str(tmp_path), CC=str(tmp_path / 'no-such-compiler'))
    assert result.returncode == 1
    assert all(f'{name}: unavailable' in result.stdout for name in LIBRARIES)
    assert 'Traceback' not in result.stderr and not list(tmp_path.glob('*.so'))
