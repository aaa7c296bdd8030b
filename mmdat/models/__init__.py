from .backbones import DAT  # noqa: F401  registers the backbone
