#!/usr/bin/env bash
# One GPU call's worth of training benchmarks for docs/benchmarks.md: jaxlm (tools/bench_train.py)
# and the PyTorch/transformers baseline (tools/bench_train_torch.py), same card, same run.
# Usage: OUT=results_dir bash tools/gpu_train_bench.sh   (JAX_ONLY=1: the three jaxlm rows only)
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
summary() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], {k: r.get(k) for k in ('batch','remat','compile','step_time_median_s','tokens_per_sec','mfu')})" "$1"; }
jaxrun() { name=$1; shift; python3 tools/bench_train.py "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 && summary "$OUT/$name.json" || tail -3 "$OUT/$name.log"; }
torchrun() { name=$1; shift; python3 tools/bench_train_torch.py "$@" > "$OUT/$name.json" 2> "$OUT/$name.log" && summary "$OUT/$name.json" || tail -3 "$OUT/$name.log"; }
# The best settings found so far (docs/benchmarks.md), then the baseline at the same batches.
jaxrun jax_125m_b32 --config 125m --seq 2048 --batch 32
jaxrun jax_350m_b32_save_dots --config 350m --seq 2048 --batch 32 --remat save_dots
jaxrun jax_1b_b16_save_dots --config 1b --seq 2048 --batch 16 --remat save_dots
[ "${JAX_ONLY:-0}" = 1 ] && exit 0
torchrun torch_125m_b32_compiled --config 125m --seq 2048 --batch 32 --compile
torchrun torch_350m_b32_compiled --config 350m --seq 2048 --batch 32 --compile
torchrun torch_350m_b16_compiled --config 350m --seq 2048 --batch 16 --compile
torchrun torch_1b_b16_compiled --config 1b --seq 2048 --batch 16 --compile
torchrun torch_1b_b8_compiled --config 1b --seq 2048 --batch 8 --compile
