"""``python -m mmdat.ops``: builds every C kernel library now (``tools/setup_env.sh`` runs it at
install) and lists what is available; exits 1 when a library could not be built."""
import sys

from .build import build_all

if __name__ == '__main__':
    built = build_all()
    for name, ok in built.items():
        print(f'{name}: {"built" if ok else "unavailable (the ops run their PyTorch implementations)"}')
    sys.exit(0 if built and all(built.values()) else 1)
