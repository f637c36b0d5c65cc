"""Forward+backward time and MFU of a preset, one row per attention implementation.

    python tools/bench_forward.py --config 1b --batch 4 --seq 2048 --impls xla,cudnn

For each implementation: compile `value_and_grad` of the mean next-token cross-entropy over
`model.forward` (params float32, compute bfloat16), check its bf16 logits against float32, then
time `--repeats` steps after `--warmup` (median, host clock around `block_until_ready`). MFU = tokens/s x training FLOPs per token / peak, with FLOPs per token =
6 x (matmul parameters) + 6 x L x T x N x H (the causal half of the attention matmuls; the
PaLM appendix B convention), and peak = the dense bf16 datasheet rate of the card.
(XLA's cost_analysis is not used: it counts the scanned layer body once.) The numerics check is
the relative L2 error of the bf16 logits against float32 `xla` attention, on plain and packed
(segment_ids) inputs. Results go to stdout and --out (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import accounting, config, model, train

def loss_fn(cfg, params, tokens):
    logits, _ = model.forward(cfg, params, tokens[:, :-1])
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))


def time_step(step, params, tokens, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(step(params, tokens))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, tokens))
        times.append(time.perf_counter() - start)
    return times


def check_against_float32(cfg, params, key) -> float:
    """Relative L2 error of this cfg's logits vs xla attention in float32, plain and packed."""
    tokens = jax.random.randint(key, (2, 256), 0, cfg.vocab_size)
    reference_cfg = dataclasses.replace(cfg, attention_impl="xla", compute_dtype="float32")
    segment_ids = jnp.repeat(jnp.arange(4), 64)[None].repeat(2, 0)
    positions = jnp.tile(jnp.arange(64), 4)[None].repeat(2, 0)
    errors = []
    with jax.default_matmul_precision("highest"):
        for kwargs in ({}, {"segment_ids": segment_ids, "positions": positions}):
            got = jax.jit(model.forward, static_argnums=0)(cfg, params, tokens, **kwargs)[0]
            want = jax.jit(model.forward, static_argnums=0)(reference_cfg, params, tokens, **kwargs)[0]
            got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
            errors.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    return max(errors)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="1b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--impls", default="xla,cudnn")
    parser.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args, overrides = parser.parse_known_args(argv)
    base = config.load_config(args.config, overrides).model
    device = jax.devices()[0]
    peak = train.device_peak_flops()
    if peak is None:
        raise SystemExit(f"no peak FLOP/s known for device {device.device_kind!r}; "
                         f"known: {list(accounting.DEVICES)}")
    key = jax.random.key(0)
    rows = []
    for impl in args.impls.split(","):
        cfg = dataclasses.replace(base, attention_impl=impl, remat=args.remat,
                                  param_dtype="float32", compute_dtype="bfloat16")
        params = model.init_params(cfg, key)
        error = check_against_float32(cfg, params, jax.random.key(1))
        tokens = jax.random.randint(jax.random.key(2), (args.batch, args.seq + 1), 0, cfg.vocab_size)
        step = jax.jit(jax.value_and_grad(lambda p, t, cfg=cfg: loss_fn(cfg, p, t)))
        compiled = step.lower(params, tokens).compile()
        times = time_step(compiled, params, tokens, args.warmup, args.repeats)
        seconds = statistics.median(times)
        tokens_per_second = args.batch * args.seq / seconds
        model_flops = accounting.training_flops_per_token(cfg, args.seq) * args.batch * args.seq
        rows.append({
            "impl": impl, "config": args.config, "batch": args.batch, "seq": args.seq,
            "remat": args.remat, "device": device.device_kind, "median_ms": seconds * 1e3,
            "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "repeats": args.repeats,
            "tokens_per_s": tokens_per_second, "model_tflops_per_step": model_flops / 1e12,
            "mfu": model_flops / seconds / peak, "rel_error_vs_float32": error,
        })
        del params, compiled
    header = f"{'impl':6} {'median ms':>10} {'min':>8} {'max':>8} {'tok/s':>10} {'MFU':>6} {'model TF':>9} {'err vs fp32':>11}"
    print(f"{device.device_kind}, {args.config}, batch {args.batch} x seq {args.seq}, remat {args.remat}, jax {jax.__version__}")
    print(header)
    for r in rows:
        print(f"{r['impl']:6} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['max_ms']:8.1f} "
              f"{r['tokens_per_s']:10.0f} {r['mfu']:6.1%} {r['model_tflops_per_step']:9.1f} "
              f"{r['rel_error_vs_float32']:11.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
