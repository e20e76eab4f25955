#!/usr/bin/env bash
# CPU benchmark: ldm vs diffusers on the same weights, settings and seed, in one run.
#
#   scripts/bench_cpu.sh [--model DIR] [--steps N] [--cases 1,4] [--repeat R] [--record] ...
#
# Builds target/release/ldm (a no-op when it is up to date; --no-build skips it), then runs
# scripts/bench_cpu.py, which times `ldm txt2img` and diffusers' StableDiffusionPipeline
# side by side, checks that the images agree and prints a markdown table with the ratios
# (--record also appends it to the "## CPU" section of BENCHMARKS.md). See the docstring of
# scripts/bench_cpu.py for what is measured and how; `scripts/bench_cpu.sh --help` lists the options.
#
# Python: $PYTHON, else /work/pyenv/venv/bin/python when present, else python3; it needs
# torch, diffusers, transformers, safetensors, numpy and Pillow (the versions of
# scripts/make_fixtures.py), plus GNU time (/usr/bin/time) for the peak memory.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

build=1
args=()
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        *) args+=("$arg") ;;
    esac
done

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x /work/pyenv/venv/bin/python ]]; then
        PYTHON=/work/pyenv/venv/bin/python
    else
        PYTHON=python3
    fi
fi

if [[ $build == 1 ]]; then
    echo "cargo build --release ..." >&2
    cargo build --release --quiet
fi

exec "$PYTHON" "$repo/scripts/bench_cpu.py" ${args[@]+"${args[@]}"}
