#!/usr/bin/env bash
# Download the wheels of the packages the GPU machine's image lacks into .wheels/ (git-ignored), so
# that a GPU run can install them there without a network:
#
#   bash scripts/gpu_wheels.sh                    # diffusers peft einops webdataset braceexpand
#   bash scripts/gpu_wheels.sh diffusers==0.42.1  # other packages or pinned versions
#
# Each package is pinned to the version installed here (the one the tests ran against) unless the
# argument names a version; --no-deps: the image already holds their dependencies (torch,
# transformers, huggingface_hub, safetensors, numpy, pyyaml, ...). The wheels are for the GPU
# machine's Python 3.12 on x86-64; pure-Python ones fit any platform. Older wheels of the same
# packages are removed first (two versions of one package stop an install). The folder must stay
# well under the 64 MiB a GPU run may carry; the script fails above WHEELS_MAX_MIB (default 32).
#
# On the GPU machine, with .wheels carried (see benchmarks/README.md, "One GPU run"):
#   python3 -m pip install -q --no-index --no-deps --find-links .wheels diffusers peft einops webdataset braceexpand
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELS_DIR:-.wheels}
PY=${PYTHON:-python3}
MAX_MIB=${WHEELS_MAX_MIB:-32}
if [ "$#" -eq 0 ]; then
    set -- diffusers peft einops webdataset braceexpand
fi
mkdir -p "$DEST"

specs=()
for arg in "$@"; do
    name=${arg%%[=<>!~]*}
    if [ "$name" = "$arg" ]; then  # no version given: the one installed here, if any
        version=$("$PY" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$name")
        [ -n "$version" ] && arg="$name==$version"
    fi
    specs+=("$arg")
    # wheel file names spell the project name with underscores, in any case
    norm=$(echo "$name" | tr 'A-Z-.' 'a-z__')
    find "$DEST" -maxdepth 1 -iname "${norm}-*.whl" -delete
done

"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DEST" "${specs[@]}"

ls -l "$DEST"/*.whl
size_kib=$(du -sk "$DEST" | cut -f1)
echo "$DEST: $((size_kib / 1024)) MiB (${size_kib} KiB) for ${specs[*]}"
if [ "$size_kib" -gt $((MAX_MIB * 1024)) ]; then
    echo "gpu_wheels.sh: $DEST is over ${MAX_MIB} MiB: a GPU run carries at most 64 MiB with the checkout" >&2
    exit 1
fi
