#!/usr/bin/env bash
# The flash-attention issue's GPU runs, for docs/benchmarks.md: numerics of every path
# against the float32 reference, the TFLOP/s sweep with a PNG, and the 1b training step with
# attention pallas vs cudnn. On one H200 step 1 takes about 10 minutes (the float32 reference and
# the odd-length cases' Triton compiles), step 2 about 4 minutes per head_dim and step 3 about 2:
# where a call's time is limited, run them as separate calls (STEPS=1, STEPS=2 H=64, STEPS=2
# H=128, STEPS=3), or a part of step 1 with `check_attention_gpu.py --cases WORDS`.
# Usage: OUT=results_dir [STEPS="1 2 3"] [H=64,128] [BATCH_1B=32] bash tools/gpu_attention_bench.sh
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
STEPS=${STEPS:-1 2 3}
H=${H:-64,128}
quiet() { grep -v -i "warn" | grep -v "^[WI][0-9]"; }
for step in $STEPS; do case $step in
1)  # Numerics: ours (automatic backends), triton, mosaic (forward), mosbwd (both), cudnn, mha.
    python3 tools/check_attention_gpu.py 2>&1 | quiet | tee "$OUT/check.txt" ;;
2)  # Speed: seq 512..16384, causal and full, forward and forward+backward, plus packed
    # documents; ours = Mosaic GPU where it applies (Hopper), ours-triton = the portable path.
    tag=${H//,/_}
    python3 tools/bench_attention.py --packed --head-dims "$H" --repeats 5 --warmup 2 \
        --impls ours,ours-triton,cudnn,mha,xla --out "$OUT/attention_$tag.json" \
        --plot "$OUT/attention_$tag.png" 2>&1 | quiet | tee "$OUT/attention_$tag.txt" ;;
3)  # End to end: the 1b preset's training step, cudnn before and after pallas.
    for run in cudnn_1 pallas cudnn_2; do
        python3 tools/bench_train.py --config 1b --seq 2048 --batch "${BATCH_1B:-32}" \
            --remat save_dots --model.attention_impl=${run%_*} --out "$OUT/train_1b_$run.json" \
            > "$OUT/train_1b_$run.log" 2>&1
        python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], \
            {k: r.get(k) for k in ('tokens_per_sec', 'mfu', 'step_time_median_s')})" \
            "$OUT/train_1b_$run.json" "$run" || tail -3 "$OUT/train_1b_$run.log"
    done ;;
esac; done
