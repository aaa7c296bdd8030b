"""Where mmdat's configs live, for ``_base_ = 'mmdat::mask_rcnn_dat_t_3x.py'``.

The configs ship inside the package (``mmdat/.mim/configs``, a link to the repository's
``configs/``). :mod:`mmdat.patches` makes MMEngine resolve ``mmdat::<path>`` bases here,
without the ``_scope_='mmdat'`` tag MMEngine puts on external bases (mmdat has no registries
of its own; see :func:`mmdat.patches.resolve_mmdat_config_bases`).
"""
import os.path as osp

__all__ = ['MMDAT_CONFIG_DIR', 'MMDAT_PREFIX', 'get_config_path']

#: Where mmdat's configs live inside the package (``mmdat/.mim/configs``).
MMDAT_CONFIG_DIR = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), '.mim', 'configs')
MMDAT_PREFIX = 'mmdat::'


def get_config_path(name: str) -> str:
    """The file of an mmdat config: ``'mask_rcnn_dat_t_3x.py'`` or ``'mmdat::...'``."""
    if name.startswith(MMDAT_PREFIX):
        name = name[len(MMDAT_PREFIX):]
    if '::' in name:
        raise ValueError(f'`::` separates the package from the config path only once: {name!r}')
    path = osp.join(MMDAT_CONFIG_DIR, name)
    if not osp.isfile(path):
        raise FileNotFoundError(f'mmdat has no config {name!r} (looked in {MMDAT_CONFIG_DIR})')
    return path
