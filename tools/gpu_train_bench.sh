#!/usr/bin/env bash
# One GPU call's worth of training benchmarks for docs/benchmarks.md: jaxlm (tools/bench_train.py)
# and the PyTorch/transformers baseline (tools/bench_train_torch.py), same card, same run.
# Usage: OUT=results_dir PRESETS="1b 350m" bash tools/gpu_train_bench.sh   (JAX_ONLY=1: jaxlm rows only)
set -uo pipefail
OUT=${OUT:-bench_out}
PRESETS=${PRESETS:-"125m 350m 1b"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
summary() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], {k: r.get(k) for k in ('batch','remat','compile','step_time_median_s','tokens_per_sec','mfu')})" "$1"; }
jaxrun() { name=$1; shift; timeout -s KILL 240 python3 tools/bench_train.py "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 && summary "$OUT/$name.json" || tail -3 "$OUT/$name.log"; }
torchrun() { name=$1; shift; timeout -s KILL 300 python3 tools/bench_train_torch.py --device h200 "$@" > "$OUT/$name.json" 2> "$OUT/$name.log" && summary "$OUT/$name.json" || tail -3 "$OUT/$name.log"; }
# The best settings found so far (docs/benchmarks.md); the presets unroll the layer scan, and
# 1b chunks the loss, which leaves room for batch 32.
for preset in $PRESETS; do
  case $preset in
    125m) jaxrun jax_125m_b32 --config 125m --seq 2048 --batch 32 ;;
    350m) jaxrun jax_350m_b32_save_dots --config 350m --seq 2048 --batch 32 --remat save_dots ;;
    1b) jaxrun jax_1b_b32_save_dots --config 1b --seq 2048 --batch 32 --remat save_dots ;;
  esac
  [ "${JAX_ONLY:-0}" = 1 ] && continue
  case $preset in
    125m) torchrun torch_125m_b32_compiled --config 125m --seq 2048 --batch 32 --compile ;;
    350m) torchrun torch_350m_b32_compiled --config 350m --seq 2048 --batch 32 --compile ;;
    1b) torchrun torch_1b_b16_compiled --config 1b --seq 2048 --batch 16 --compile ;;
  esac
done
