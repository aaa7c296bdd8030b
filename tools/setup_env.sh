#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment with the whole OpenMMLab 2.x
# stack: torch + torchvision, mmengine, mmcv with compiled ops, mmdet, mmsegmentation,
# mmpretrain, and mmdat itself in editable mode. Idempotent: a second run returns in a
# second when nothing it depends on changed.
#
#   MMDAT_VENV         where the environment lives (default: <repo>/.venv)
#   MMDAT_WHEEL_CACHE  where the mmcv wheel built from source is kept (default: ~/.cache/mmdat/wheels)
#   PYTHON             the interpreter to build the venv from (default: python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MMDAT_VENV:-$ROOT/.venv}
WHEELS=${MMDAT_WHEEL_CACHE:-$HOME/.cache/mmdat/wheels}
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
MMCV_VERSION=2.1.0

STAMP=$VENV/.mmdat-env
want=$(cat "$ROOT/tools/setup_env.sh" "$ROOT/setup.py" | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi

log() { printf '[setup_env] %s\n' "$*" >&2; }
start=$(date +%s)
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "${PYTHON:-python3}" -m venv "$VENV"; }
py=$VENV/bin/python
pip() { "$py" -m pip --disable-pip-version-check "$@"; }

# mmcv 2.1's setup.py and mmengine's `pkg::` config resolution both import pkg_resources,
# which setuptools >= 81 no longer ships; torch 2.13 asks for setuptools >= 77.0.3.
SETUPTOOLS='setuptools>=77.0.3,<81'
pip install -q --upgrade 'pip>=23' "$SETUPTOOLS" wheel

# `===` asks for the registry's build of torch exactly: a local `+cpu` build would also
# satisfy `==`, and torchvision's wheels cannot load next to it. The registry build
# runs on CPU as well as on CUDA machines.
if ! "$py" -c "import torch, torchvision; assert torch.__version__.split('+')[0] == '$TORCH_VERSION'" 2>/dev/null; then
    log "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION"
    pip install -q "torch===$TORCH_VERSION" "torchvision===$TORCHVISION_VERSION" "$SETUPTOOLS"
fi

# mmcv has no wheel for this torch: build it once from source against the installed
# torch (CUDA ops when a GPU is visible, CPU ops otherwise) and keep the wheel.
if ! "$py" -c "import mmcv, mmcv.ops" 2>/dev/null; then
    flavour=$("$py" -c "import torch; print('cu' + torch.version.cuda if torch.cuda.is_available() else 'cpu')")
    cache=$WHEELS/torch$TORCH_VERSION-$flavour
    if ! ls "$cache"/mmcv-$MMCV_VERSION-*.whl >/dev/null 2>&1; then
        log "building mmcv $MMCV_VERSION with $flavour ops (once; about 17 minutes on 2 cores)"
        pip install -q ninja addict packaging pyyaml yapf numpy
        extra=()
        if [ "$flavour" != cpu ]; then
            nvcc=${CUDA_HOME:+$CUDA_HOME/bin/}nvcc
            command -v "$nvcc" >/dev/null || {
                log "error: a GPU is visible but no CUDA compiler ($nvcc) is: install the CUDA toolkit"
                log "matching torch's CUDA $("$py" -c 'import torch; print(torch.version.cuda)') and set CUDA_HOME"
                exit 1; }
            extra=(FORCE_CUDA=1)
        fi
        env MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${extra[@]}" \
            "$py" -m pip wheel -q --no-deps --no-build-isolation "mmcv==$MMCV_VERSION" -w "$cache"
    fi
    pip install -q "$cache"/mmcv-$MMCV_VERSION-*.whl
fi

log "installing mmdat and the OpenMMLab libraries"
pip install -q --no-build-isolation -e "$ROOT[tests,export]"

# The C kernels of mmdat.ops, built now rather than on the first forward (a build that fails
# only warns: the ops then run their PyTorch implementations).
"$py" -m mmdat.ops >&2 || log "warning: the C kernels did not build; mmdat runs its PyTorch paths"

"$py" - <<'PY'
import mmcv.ops, mmdet, mmseg, mmpretrain, torch, torchvision  # noqa: F401  fail here, not later
import mmdat  # noqa: F401
print(f'[setup_env] torch {torch.__version__} (cuda {torch.version.cuda}), mmcv {mmcv.__version__}, '
      f'mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}')
PY
echo "$want" > "$STAMP"
log "environment ready in $(( $(date +%s) - start )) s"
