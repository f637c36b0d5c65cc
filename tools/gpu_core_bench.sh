#!/usr/bin/env bash
# One GPU session's worth of tools/bench_forward.py runs for docs/benchmarks.md (issue: core).
# Usage: OUT=results_dir bash tools/gpu_core_bench.sh
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
run() { python3 tools/bench_forward.py "$@" 2>&1 | grep -v "^[WI][0-9]"; }
run --config 1b --batch 2 --seq 2048 --impls xla,cudnn --out "$OUT/1b_b2.json"
run --config 1b --batch 8 --seq 2048 --impls cudnn --out "$OUT/1b_b8.json"
run --config 1b --batch 8 --seq 2048 --impls cudnn --remat save_dots --out "$OUT/1b_b8_save_dots.json"
run --config 1b --batch 16 --seq 2048 --impls cudnn --remat save_dots --out "$OUT/1b_b16_save_dots.json"
run --config 1b --batch 16 --seq 2048 --impls cudnn --remat full --out "$OUT/1b_b16_full.json"
