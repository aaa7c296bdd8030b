from .dat import ARCH_SETTINGS, DAT, resolve_arch

__all__ = ['ARCH_SETTINGS', 'DAT', 'resolve_arch']
