#!/usr/bin/env bash
# Prepares .gpu-carry/ (LDM_GPU_CARRY) for scripts/bench_gpu.sh on the GPU machine:
#   ldm.xz    the `--features cuda,cudnn` release build, stripped (64 MiB, mostly PTX: over
#             the device runner's 64 MiB carry limit) and xz-compressed. Toolkit from PyPI
#             wheels via .ci/cuda-env.sh; wheels and target folder cached in LDM_CUDA_CACHE
#             (default ~/.cache/ldm-cuda), shared with .ci/cuda-check.
#   device_parity.xz  tests/device_parity.rs built the same way (run first by gpu_all.sh)
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
# tests/device_parity.rs (each kernel and the tiny U-Net on the GPU against the CPU), as a
# binary of its own: the GPU machine has no cargo.
parity=$(CARGO_TARGET_DIR="$cache/target" cargo test --release --locked --features cuda,cudnn \
    --test device_parity --no-run --message-format=json |
    "${PYTHON:-python3}" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "device_parity":
        print(m["executable"])')
rm -rf "$carry"
mkdir -p "$carry/wheels"
strip -o "$carry/ldm" "$cache/target/release/ldm"
strip -o "$carry/device_parity" "$parity"
xz -T0 -6 "$carry/ldm" "$carry/device_parity"
"${PYTHON:-python3}" -m pip download --quiet --no-deps --dest "$carry/wheels" \
    diffusers==0.42.1 importlib_metadata zipp
ls -l "$carry" "$carry"/wheels && du -sh "$carry"
