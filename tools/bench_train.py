"""Training throughput: tokens/s and MFU of one preset's train step, median over repeats.

    python tools/bench_train.py --config 1b --seq 2048 --batch 8 --remat full --mesh fsdp=8
    python tools/bench_train.py --config tiny --seq 64 --batch 8          # runs on CPU too

Random tokens, bf16 compute, cuDNN attention on GPUs (XLA attention elsewhere; override with
--model.attention_impl=pallas etc.), float32 master
params and AdamW: exactly `jaxlm.train.make_train_step`. Steps are timed one by one after
`--warmup` steps (compilation included in the first); the median step time gives tokens/s and
MFU (accounting.training_flops_per_token over the card's peak; null when the peak is unknown,
e.g. on CPU). Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import numpy as np

from jaxlm import accounting, moe, optim, sharding, train
from jaxlm.config import Config, TrainConfig, load_config


def build_config(args: argparse.Namespace, num_devices: int) -> Config:
    cfg = load_config(args.config, args.overrides)
    gpu = jax.devices()[0].platform == "gpu"
    # cuDNN attention on GPUs unless --model.attention_impl says otherwise.
    explicit = any(o.startswith("--model.attention_impl") for o in args.overrides)
    attention = cfg.model.attention_impl if explicit else ("cudnn" if gpu else "xla")
    model = dataclasses.replace(cfg.model, compute_dtype="bfloat16", param_dtype="float32",
                                attention_impl=attention, remat=args.remat,
                                max_seq_len=max(cfg.model.max_seq_len, args.seq))
    run = TrainConfig(steps=1000, batch_size=args.batch, seq_len=args.seq, grad_accum=args.grad_accum,
                      warmup_steps=10, zero1=args.zero1)
    mesh = sharding.parse_mesh(args.mesh) if args.mesh else dataclasses.replace(cfg.mesh, data=num_devices)
    return dataclasses.replace(cfg, model=model, train=run, mesh=mesh)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="125m")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="global sequences per step")
    parser.add_argument("--grad_accum", "--grad-accum", type=int, default=1)
    parser.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    parser.add_argument("--zero1", action="store_true")
    parser.add_argument("--mesh", default="", help="e.g. fsdp=8 (default: all devices on data)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--moe-kernel", default="auto", choices=moe.GROUPED_MATMULS,
                        help="grouped matmul of MoE layers (moe.set_grouped_matmul)")
    args, args.overrides = parser.parse_known_args(argv)
    moe.set_grouped_matmul(args.moe_kernel)
    cfg = build_config(args, jax.device_count())
    mesh = sharding.make_mesh(cfg.mesh)
    tx = optim.make_optimizer(cfg.model, cfg.train)
    step_fn = train.make_train_step(cfg, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(args.batch, args.seq + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((args.batch, args.seq), np.float32)}
    times = []
    with jax.set_mesh(mesh):
        state = train.init_state(cfg, mesh, tx)
        device_batch = train.shard_batch(batch, mesh, args.grad_accum)
        for i in range(args.warmup + args.repeats):
            start = time.perf_counter()
            state, metrics = step_fn(state, device_batch)
            jax.block_until_ready(metrics["loss"])
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    tokens_per_sec = args.batch * args.seq / step_time
    peak = train.device_peak_flops()
    flops = accounting.training_flops_per_token(cfg.model, args.seq)
    result = {
        "config": args.config, "overrides": args.overrides, "moe_kernel": args.moe_kernel,
        "seq": args.seq, "batch": args.batch,
        "grad_accum": args.grad_accum, "remat": args.remat, "zero1": args.zero1, "mesh": dict(mesh.shape),
        "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
        "attention_impl": cfg.model.attention_impl, "compute_dtype": cfg.model.compute_dtype,
        "params": accounting.count_params(cfg.model), "step_time_median_s": step_time,
        "step_time_min_s": min(times), "tokens_per_sec": tokens_per_sec,
        "tokens_per_sec_per_device": tokens_per_sec / jax.device_count(),
        "mfu": None if peak is None else accounting.mfu(tokens_per_sec, flops, jax.device_count(), peak),
        "model_flops_per_token": flops, "final_loss": float(metrics["loss"]),
        "memory_estimate_bytes": train.memory_estimate(cfg)["total"],
        "peak_memory_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
        "jax": jax.__version__,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            file.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
