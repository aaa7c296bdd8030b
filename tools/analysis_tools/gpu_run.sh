#!/usr/bin/env bash
# On a lent GPU machine (no network; torch, numpy, timm there; the wheels of gpu_carry.sh
# carried in .gpu_wheels): make mmengine importable, run the benchmark, leave the JSON, its
# log and nvidia-smi's report in $OUT (default work_dirs/gpu_benchmark).
#
#   bash tools/analysis_tools/gpu_run.sh [gpu_benchmark.py arguments]
#
# mmengine comes from the wheels: pip install --no-index where pip works, else (no pip, an
# externally managed Python) the wheels unpacked into .gpu_site on PYTHONPATH, those of
# packages the machine lacks only.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-work_dirs/gpu_benchmark}
mkdir -p "$out"
py=$(command -v python || command -v python3)

if ! "$py" -c 'import mmengine' 2>/dev/null; then
    if ! "$py" -m pip install -q --no-index --no-deps --find-links .gpu_wheels -r .gpu_wheels/requirements.txt; then
        echo 'pip could not install the wheels: unpacking them into .gpu_site' >&2
        "$py" - <<'EOF' || exit 1
import glob, importlib.util, re, sys, zipfile
tag, here = f'cp{sys.version_info[0]}{sys.version_info[1]}', sys.version_info[:2]
modules = {'pyyaml': 'yaml'}  # distribution -> top-level module, where they differ
best = {}  # distribution -> (version, wheel): the newest this Python takes
for wheel in glob.glob('.gpu_wheels/*.whl'):
    name, version, rest = wheel.split('/')[-1].split('-', 2)
    name = name.lower().replace('_', '-')
    archive = zipfile.ZipFile(wheel)
    meta = archive.read(next(n for n in archive.namelist() if n.endswith('.dist-info/METADATA'))).decode()
    low = re.search(r'^Requires-Python: *>= *3\.(\d+)', meta, re.M)
    if ((not rest.endswith('-none-any.whl') and not rest.startswith(f'{tag}-'))
            or (low and here < (3, int(low.group(1)))) or (name == 'tomli' and here >= (3, 11))):
        continue
    key = tuple(int(p) if p.isdigit() else 0 for p in version.split('.'))
    if key > best.get(name, ((), None))[0]:
        best[name] = (key, wheel)
for name, (_, wheel) in sorted(best.items()):
    if importlib.util.find_spec(modules.get(name, name).replace('-', '_')) is None:
        zipfile.ZipFile(wheel).extractall('.gpu_site')
        print('unpacked', wheel, file=sys.stderr)
EOF
        export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
"$py" tools/analysis_tools/gpu_benchmark.py --out "$out/gpu_benchmark.json" "$@" 2>&1 | tee "$out/gpu_benchmark.log"
exit "${PIPESTATUS[0]}"
