#!/usr/bin/env bash
# Prepares .gpu-carry/ (LDM_GPU_CARRY) for scripts/bench_gpu.sh on the GPU machine:
#   ldm.xz    the `--features cuda,cudnn` release build, stripped (64 MiB, mostly PTX: over
#             the device runner's 64 MiB carry limit) and xz-compressed. Toolkit from PyPI
#             wheels via .ci/cuda-env.sh; wheels and target folder cached in LDM_CUDA_CACHE
#             (default ~/.cache/ldm-cuda), shared with .ci/cuda-check.
#   wheels/   diffusers (the version of scripts/make_fixtures.py) and importlib_metadata, which
#             the GPU machine lacks (it has torch, transformers, huggingface_hub, safetensors)
# The folder is git-ignored (.gitignore), so a device run carries it as an ignored path:
#   run(command="scripts/bench_gpu.sh", carry=[".gpu-carry"])
set -euo pipefail
cd "$(dirname "$0")/.."
carry="${LDM_GPU_CARRY:-.gpu-carry}"
cache="${LDM_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ldm-cuda}"
export CUDABUILD="$cache/build" WITH_CUDNN=1
cargo fetch --locked --quiet
# shellcheck source=.ci/cuda-env.sh
source .ci/cuda-env.sh
CARGO_TARGET_DIR="$cache/target" cargo build --release --locked --features cuda,cudnn
rm -rf "$carry"
mkdir -p "$carry/wheels"
strip -o "$carry/ldm" "$cache/target/release/ldm"
xz -T0 -6 "$carry/ldm"
"${PYTHON:-python3}" -m pip download --quiet --no-deps --dest "$carry/wheels" \
    diffusers==0.42.1 importlib_metadata zipp
ls -l "$carry" "$carry"/wheels && du -sh "$carry"
