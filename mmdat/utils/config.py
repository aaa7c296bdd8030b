"""``mmdat::`` config inheritance: ``_base_ = 'mmdat::mask_rcnn_dat_t_3x.py'``.

mmdat ships its configs inside the package (``mmdat/.mim/configs``, a link to the
repository's ``configs/``), where MMEngine looks for ``<package>::<path>`` bases. Stock
MMEngine 0.10.7 would still refuse them, for three reasons this module removes:

1. ``mmengine.config.utils.MODULE2PACKAGE`` lists the packages ``pkg::`` may name;
   mmdat is added to it.
2. ``_get_package_and_cfg_path`` insists on a ``/`` in the path (``\\w*::\\w*/\\w*``), so
   the flat names of mmdat's configs (``mmdat::upernet_dat_t_160k.py``) fail; and the
   package is located through ``pkg_resources`` (``get_installed_path``), which points
   to ``site-packages/mmdat`` for an editable install, where no configs are.
3. MMEngine tags every dict of an external base that has a ``type`` with
   ``_scope_=<package>``. A ``_scope_='mmdat'`` switches the default scope to ``mmdat``
   while that dict (and everything nested in it) is built; mmdat has no registries of
   its own (it registers ``DAT`` in MMEngine's root registry and is used from mmdet,
   mmseg and mmpretrain configs alike), so MMEngine would fall back, with warnings, to
   whatever registry started the build -- MMEngine's root ``TRANSFORMS`` for a dataset
   pipeline, which has no ``PackDetInputs``: the build fails.

The one patch: :meth:`mmengine.config.Config._get_cfg_path` is wrapped so that an
``mmdat::<path>`` base resolves to ``<mmdat>/.mim/configs/<path>`` (the package found
from ``mmdat.__file__``, any install mode) with **no scope**. An mmdat base then reads
exactly as if the file were next to the config that inherits it: the dicts it takes
from mmdet/mmseg/mmpretrain bases keep their ``_scope_`` (``mmdet``, ...), its own dicts
are built in the runner's default scope (``default_scope`` of the config, e.g.
``'mmdet'`` from mmdet's ``default_runtime.py``). Every other ``pkg::`` path goes to
MMEngine's own code unchanged.

The patch is applied when :mod:`mmdat` is imported; import it before
``Config.fromfile`` of a config that inherits ``mmdat::`` (``custom_imports`` come too
late: MMEngine resolves ``_base_`` before it imports them).
"""
import os.path as osp
from typing import Optional, Tuple

from mmengine.config import Config
from mmengine.config import utils as config_utils

__all__ = ['MMDAT_CONFIG_DIR', 'get_config_path', 'register_mmdat_configs']

#: Where mmdat's configs live inside the package (``mmdat/.mim/configs``).
MMDAT_CONFIG_DIR = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), '.mim', 'configs')
_PREFIX = 'mmdat::'


def get_config_path(name: str) -> str:
    """The file of an mmdat config: ``'mask_rcnn_dat_t_3x.py'`` or ``'mmdat::...'``."""
    if name.startswith(_PREFIX):
        name = name[len(_PREFIX):]
    if '::' in name:
        raise ValueError(f'`::` separates the package from the config path only once: {name!r}')
    path = osp.join(MMDAT_CONFIG_DIR, name)
    if not osp.isfile(path):
        raise FileNotFoundError(f'mmdat has no config {name!r} (looked in {MMDAT_CONFIG_DIR})')
    return path


def register_mmdat_configs() -> None:
    """Let MMEngine configs inherit ``mmdat::<path>``. Idempotent."""
    config_utils.MODULE2PACKAGE.setdefault('mmdat', 'mmdat')
    original = Config._get_cfg_path  # the function behind the staticmethod
    if getattr(original, '_mmdat', False):
        return

    def _get_cfg_path(cfg_path: str, filename: str) -> Tuple[str, Optional[str]]:
        if cfg_path.startswith(_PREFIX):
            return get_config_path(cfg_path), None
        return original(cfg_path, filename)

    _get_cfg_path._mmdat = True  # type: ignore[attr-defined]
    _get_cfg_path.__wrapped__ = original  # type: ignore[attr-defined]
    _get_cfg_path.__doc__ = original.__doc__
    Config._get_cfg_path = staticmethod(_get_cfg_path)
