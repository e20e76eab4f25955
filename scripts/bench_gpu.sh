#!/usr/bin/env bash
# GPU benchmark: ldm (CUDA, f16) vs diffusers eager and torch.compile'd, in one call.
#
#   scripts/bench_gpu.sh [scripts/bench_gpu.py options]     # on the GPU machine
#   scripts/bench_gpu.sh --cpu-smoke                        # here: the same logic on the CPU
#
# The GPU machine has PyTorch (with its CUDA libraries), transformers and an NVIDIA driver but
# no Rust and no diffusers: the ldm binary and diffusers' wheel come in .gpu-carry/
# (LDM_GPU_CARRY), which scripts/gpu_carry.sh prepares on a build machine:
#   .gpu-carry/ldm.xz    the stripped `--features cuda,cudnn` build, xz-compressed
#   .gpu-carry/wheels/   diffusers and importlib_metadata (pip download --no-deps)
# Results land in $OUT (the device runner's output folder) when set, else bench-gpu-out/.
# With --cpu-smoke the CPU build target/release/ldm (LDM_BIN) runs a tiny pipeline instead, and
# diffusers comes from the Python environment when it has it.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
carry="${LDM_GPU_CARRY:-$repo/.gpu-carry}"
PYTHON="${PYTHON:-python3}"
smoke=0
for arg in "$@"; do
    [[ $arg == --cpu-smoke ]] && smoke=1
done

if [[ $smoke == 1 ]]; then
    ldm="${LDM_BIN:-$repo/target/release/ldm}"
elif [[ -n ${LDM_BIN:-} ]]; then
    ldm="$LDM_BIN"
else
    ldm="$(mktemp -d)/ldm"
    [[ -f $carry/ldm.xz ]] || { echo "bench_gpu.sh: no $carry/ldm.xz (see scripts/gpu_carry.sh)" >&2; exit 1; }
    "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$carry/ldm.xz" "$ldm"
    chmod +x "$ldm"
fi
[[ -x $ldm ]] || { echo "bench_gpu.sh: no ldm binary at $ldm (see scripts/gpu_carry.sh)" >&2; exit 1; }

if ! "$PYTHON" -c 'import diffusers' 2>/dev/null; then
    shopt -s nullglob
    wheels=("$carry"/wheels/*.whl)
    [[ ${#wheels[@]} -gt 0 ]] || { echo "bench_gpu.sh: no diffusers, and no wheels in $carry/wheels" >&2; exit 1; }
    site="$(mktemp -d)/site"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$site" "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $smoke == 0 ]]; then
    # The binary links CUDA 13's runtime libraries and cuDNN 9: PyTorch's copies serve.
    sp="$("$PYTHON" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
    libs=$(find "$sp/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | paste -sd:)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    if ldd "$ldm" | grep -q 'not found'; then
        echo "bench_gpu.sh: $ldm misses libraries:" >&2
        ldd "$ldm" | grep 'not found' >&2
        exit 1
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
fi

exec "$PYTHON" "$repo/scripts/bench_gpu.py" --ldm "$ldm" "$@"
