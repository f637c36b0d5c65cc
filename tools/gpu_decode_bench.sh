#!/usr/bin/env bash
# A session's batch-1 decoding measurements for docs/benchmarks.md (issue: decoding), in two
# device calls of under 10 minutes each (on an H200 part 1 took about 4 minutes, part 2 5):
#   part 1: the default chain step against XLA's end to end (1b, 125m; 512-token prompts),
#           then the chain alone with its attention staging both ways, profiled;
#   part 2: 350m end to end, then 1b at a long context (3,840-token prompt, cache 4,096);
#   part 3: the decode-attention kernels (Triton, Mosaic GPU, cuDNN, XLA) at their default
#           tiles, each also profiled for the attention kernel's own time (about 1 minute);
#   part 4: the chain at a long context (1b, 4,096 positions) with o-proj's merge polling 64
#           or 128 values a thread at once (ChainPlan.merge_values), twice in turn, then
#           profiled with 128, its trace kept gzipped in OUT (about 5 minutes);
#   part 5: the throughput table: the decode-attention kernel against cuDNN, XLA's
#           batch-1 step, generate's default at batch 1, 8 and 64 (512 prompt + 256 new), and
#           transformers' generate on the same shapes (125m, 1b).
# Usage: OUT=results_dir bash tools/gpu_decode_bench.sh 1|2|3|4|5
set -uo pipefail
OUT=${OUT:-bench_out}
PART=${1:-1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
keep() { grep "^{\|Error"; }
if [ "$PART" = 1 ]; then
    timeout 330 python3 tools/bench_decode.py --config 1b --config 125m --chain-step 2>&1 | keep
    timeout 220 python3 tools/bench_stage_chain.py --repeats 3 --config 1b --plans attention \
        --staging both --profile "$OUT/prof" 2>&1 | keep
elif [ "$PART" = 5 ]; then
    timeout 580 python3 tools/bench_decode.py --config 125m --config 1b --baseline-hf 2>&1 | keep
elif [ "$PART" = 3 ]; then
    timeout 400 python3 tools/sweep_decode_attention.py --profile "$OUT/attention" 2>&1 | keep
elif [ "$PART" = 4 ]; then
    for _ in 1 2; do
        timeout 120 python3 tools/bench_stage_chain.py --config 1b --plans attention \
            --max-len 4096 --repeats 3 --merge-values 64,128 2>&1 | keep
    done
    timeout 120 python3 tools/bench_stage_chain.py --config 1b --plans attention \
        --max-len 4096 --repeats 2 --merge-values 128 --profile /tmp/prof 2>&1 | keep
    # the trace, gzipped, as one file at the top of OUT
    trace=$(ls -t /tmp/prof/*/*-trace.json 2>/dev/null | head -1)
    [ -n "$trace" ] && gzip -c "$trace" > "$OUT/trace_1b_4096_merge128.json.gz"
else
    timeout 280 python3 tools/bench_decode.py --config 350m --chain-step 2>&1 | keep
    timeout 280 python3 tools/bench_decode.py --config 1b --chain-step --prompt-len 3840 \
        2>&1 | keep
fi
