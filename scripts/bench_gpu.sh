#!/usr/bin/env bash
# GPU benchmark: ldm (CUDA, f16) vs diffusers eager and torch.compile'd, in one call.
#
#   scripts/bench_gpu.sh [scripts/bench_gpu.py options]     # on the GPU machine
#   scripts/bench_gpu.sh --cpu-smoke                        # here: the same logic on the CPU
#
# What the GPU machine needs carried (.gpu-carry/, from scripts/gpu_carry.sh): see gpu_env.sh.
# Results land in $OUT (the device runner's output folder) when set, else bench-gpu-out/.
# With --cpu-smoke the CPU build target/release/ldm (LDM_BIN) runs a tiny pipeline instead, and
# diffusers comes from the Python environment when it has it.
set -euo pipefail
gpu_smoke=0
for arg in "$@"; do
    [[ $arg == --cpu-smoke ]] && gpu_smoke=1
done
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
exec "$PYTHON" "$repo/scripts/bench_gpu.py" --ldm "$ldm" "$@"
