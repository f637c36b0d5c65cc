#!/usr/bin/env bash
# One device call's worth of batch-1 decoding measurements for docs/benchmarks.md (issue:
# decoding): the default chain step against XLA's end to end (125m, 350m, 1b), then the
# chain alone with its attention staging both ways and a profile. About 8 minutes on an H200.
# Usage: OUT=results_dir bash tools/gpu_decode_bench.sh
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
keep() { grep "^{\|Error"; }
timeout 330 python3 tools/bench_decode.py --config 1b --config 125m --config 350m --chain-step \
    2>&1 | keep
timeout 200 python3 tools/bench_stage_chain.py --repeats 3 --config 1b --plans attention \
    --staging both --profile "$OUT/prof" 2>&1 | keep
