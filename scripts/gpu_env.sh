# Sourced by the scripts that run on the GPU machine (bench_gpu.sh, gpu_all.sh): sets $ldm to a
# runnable ldm binary and makes diffusers importable.
#
# The GPU machine has PyTorch (with its CUDA libraries), transformers and an NVIDIA driver but
# no Rust and no diffusers: the ldm binary and diffusers' wheel come in .gpu-carry/
# (LDM_GPU_CARRY), which scripts/gpu_carry.sh prepares on a build machine:
#   .gpu-carry/ldm.xz    the stripped `--features cuda,cudnn` build, xz-compressed
#   .gpu-carry/wheels/   diffusers and importlib_metadata (pip download --no-deps)
# LDM_BIN names a binary to use instead. With gpu_smoke=1 set before sourcing, the CPU build
# target/release/ldm (or LDM_BIN) serves, and no CUDA libraries are looked for.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
carry="${LDM_GPU_CARRY:-$repo/.gpu-carry}"
PYTHON="${PYTHON:-python3}"

if [[ ${gpu_smoke:-0} == 1 ]]; then
    ldm="${LDM_BIN:-$repo/target/release/ldm}"
elif [[ -n ${LDM_BIN:-} ]]; then
    ldm="$LDM_BIN"
else
    ldm="$(mktemp -d)/ldm"
    [[ -f $carry/ldm.xz ]] || { echo "no $carry/ldm.xz (see scripts/gpu_carry.sh)" >&2; exit 1; }
    "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$carry/ldm.xz" "$ldm"
    chmod +x "$ldm"
fi
[[ -x $ldm ]] || { echo "no ldm binary at $ldm (see scripts/gpu_carry.sh)" >&2; exit 1; }

if ! "$PYTHON" -c 'import diffusers' 2>/dev/null; then
    shopt -s nullglob
    wheels=("$carry"/wheels/*.whl)
    [[ ${#wheels[@]} -gt 0 ]] || { echo "no diffusers, and no wheels in $carry/wheels" >&2; exit 1; }
    site="$(mktemp -d)/site"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$site" "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ ${gpu_smoke:-0} != 1 ]]; then
    # The binary links CUDA 13's runtime libraries and cuDNN 9: PyTorch's copies serve.
    sp="$("$PYTHON" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
    libs=$(find "$sp/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | paste -sd:)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    if ldd "$ldm" | grep -q 'not found'; then
        echo "$ldm misses libraries:" >&2
        ldd "$ldm" | grep 'not found' >&2
        exit 1
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
fi
