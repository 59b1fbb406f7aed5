#!/usr/bin/env bash
# The GPU run in one command, for a machine without a network: install the carried wheels
# (.wheels/, written by scripts/gpu_wheels.sh) of the packages its Python lacks, install the
# checkout itself, then run benchmarks/gpu_all.py with the arguments given.
#
#   bash benchmarks/gpu_all.sh --archive "$OUT/gpu_all.tar.gz"
#   bash benchmarks/gpu_all.sh --dry-run --parts ar_sampling
#
# Only packages that are missing are installed, so the image's own versions stay. An install that
# fails does not stop the run: gpu_all.py's preflight lists what is still missing, and the parts
# that need it are recorded as failed. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
missing=()
for pkg in diffusers peft einops webdataset braceexpand; do
    "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$pkg" \
        || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ -d .wheels ]; then
        echo "gpu_all.sh: installing ${missing[*]} from .wheels"
        "$PY" -m pip install -q --no-index --no-deps --find-links .wheels "${missing[@]}" \
            || echo "gpu_all.sh: installing ${missing[*]} from .wheels failed" >&2
    else
        echo "gpu_all.sh: ${missing[*]} missing and no .wheels folder (bash scripts/gpu_wheels.sh, then carry .wheels)" >&2
    fi
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "gpu_all.sh: the editable install failed; gpu_all.py runs the parts with the checkout on PYTHONPATH" >&2
PYTHONUNBUFFERED=1 exec "$PY" benchmarks/gpu_all.py "$@"
