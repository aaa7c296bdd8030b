#!/usr/bin/env bash
# Wheels for a GPU machine without network that has torch, numpy and timm but no mmengine:
# mmengine and what loading mmdat.models imports through it, into an ignored folder for the
# device tool's `carry` (at most 64 MiB). See docs/gpu.md for the command to run there.
#
#   tools/analysis_tools/gpu_carry.sh [DEST]      # default .gpu_wheels; PYTHON picks the pip
#
# mmengine's requirements also name opencv-python and matplotlib (tens of MB): neither is
# imported for mmdat.models, so the wheels go in with --no-deps. pyyaml, packaging and tqdm
# usually come with timm, carried anyway; tomli is yapf's on Python 3.10. Each for CPython
# 3.10-3.14 (torch 2.11's): the newest wheel that each accepts, pip on the machine takes its match.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-.gpu_wheels}
py=${PYTHON:-python3}
packages=(mmengine==0.10.7 addict platformdirs rich termcolor yapf packaging tqdm pyyaml)

rm -rf "$dest"
mkdir -p "$dest"
for version in 3.10 3.11 3.12 3.13 3.14; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$dest" "${packages[@]}"
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$dest" tomli
# what the machine installs: names only, so that one installed already is kept
printf '%s\n' "${packages[@]}" 'tomli; python_version < "3.11"' > "$dest/requirements.txt"

bytes=$(du -sb "$dest" | cut -f1)
limit=$((64 * 1024 * 1024))
echo "$dest: $(ls "$dest"/*.whl | wc -l) wheels, $((bytes / 1024)) KiB (carry limit $((limit / 1024)) KiB)"
if [ "$bytes" -gt "$limit" ]; then
    echo "too large for the device tool's carry" >&2
    exit 1
fi
