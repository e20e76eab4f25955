#!/usr/bin/env bash
# Everything a GPU machine is lent for, in one call, most important first (a lease is short):
#   0. tests/device_parity.rs    each kernel and the tiny U-Net on the GPU against the CPU, f32
#                                and f16 (.gpu-carry/device_parity.xz)  -> ops.log
#   1. scripts/gpu_check.py      the CUDA build's parity with diffusers' recorded runs, the
#                                default model, training steps   -> check.log, gpu-check.json
#   2. scripts/bench_gpu.py      SD 1.5 architecture, 512², 1 image: ldm vs diffusers eager and
#                                torch.compile'd                  -> bench-1.md
#   3. scripts/bench_train.py    the default model's training step vs PyTorch, with the f32
#                                convolutions through cuDNN and unfolded  -> train.log
#   4. scripts/bench_gpu.py      4 images, eager only             -> bench-4.md
# Each stage has its own time limit (seconds, STAGE_LIMITS="check bench1 train bench4") and the
# others run when one fails. Output in $OUT (the device runner's folder) or gpu-out/.
#
#   run(command="scripts/gpu_all.sh", carry=[".gpu-carry"], timeout_s=...)    # on the GPU machine
#   gpu_smoke=1 scripts/gpu_all.sh                    # here: the logic on the CPU, tiny pipeline
set -uo pipefail
gpu_smoke="${gpu_smoke:-0}"
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
out="${OUT:-$repo/gpu-out}"
mkdir -p "$out"
read -r check_s bench1_s train_s bench4_s <<<"${STAGE_LIMITS:-120 170 110 60}"
device=cuda smoke=()
if [[ $gpu_smoke == 1 ]]; then
    device=cpu smoke=(--cpu-smoke)
fi
export PYTHONUNBUFFERED=1
work="$(mktemp -d)"

stage() {  # stage NAME LIMIT COMMAND...: runs it, logs to $out/NAME.log, reports the time
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$out/stages.txt"
}

# The default model's folder for the training checks: weights/, or where the binary unpacks its
# embedded copy when weights/ did not travel (it and the binary are over a device run's 64 MiB).
weights="$repo/weights"
if [[ ! -f $weights/model_index.json ]]; then
    "$ldm" txt2img "a black cat" --steps 1 --quiet -o "$work/unpack.png" >/dev/null 2>&1
    weights=$(ls -d "${XDG_CACHE_HOME:-$HOME/.cache}"/ldm/default-model-* | head -1)
fi

if [[ $gpu_smoke != 1 ]]; then
    parity="$work/device_parity"
    "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$carry/device_parity.xz" "$parity" && chmod +x "$parity"
    export LDM_TEST_ROOT="$repo"
    stage ops 60 "$parity" --nocapture --test-threads 1
fi
stage check "$check_s" "$PYTHON" "$repo/scripts/gpu_check.py" --ldm "$ldm" --device "$device" --out "$work/check" \
    --weights "$weights"
cp "$work/check/gpu-check.json" "$out/" 2>/dev/null  # its table is in check.log
stage bench1 "$bench1_s" "$PYTHON" "$repo/scripts/bench_gpu.py" --ldm "$ldm" "${smoke[@]}" --cases 1 --repeat 1 \
    --out "$work/bench1"
cp "$work/bench1/results.md" "$out/bench-1.md" 2>/dev/null
# Training twice: as built (f32 convolutions through cuDNN), then with every convolution as
# an unfolded product (LDM_GPU_CONV=unfold), the A/B that decides the f32 path.
train_both() {
    for conv in "" unfold; do
        echo "LDM_GPU_CONV=$conv"
        LDM_GPU_CONV=$conv "$PYTHON" "$repo/scripts/bench_train.py" --ldm "$ldm" --device "$device" --steps 30 \
            --weights "$weights"
    done
}
export -f train_both
export PYTHON repo ldm device weights
stage train "$train_s" bash -c train_both
stage bench4 "$bench4_s" "$PYTHON" "$repo/scripts/bench_gpu.py" --ldm "$ldm" "${smoke[@]}" --cases 4 --repeat 1 \
    --no-compile --out "$work/bench4"
cp "$work/bench4/results.md" "$out/bench-4.md" 2>/dev/null
exit 0
