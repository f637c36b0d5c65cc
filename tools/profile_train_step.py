"""Where one training step's GPU time goes: a kernel-time table from a JAX profiler trace.

    python tools/profile_train_step.py --config 1b --seq 2048 --batch 8 --remat save_dots --out DIR

Builds the same step as tools/bench_train.py, warms it up, traces `--steps` steps with
`jax.profiler.trace(create_perfetto_trace=True)`, then reads the Perfetto JSON and sums the
device-side events by kernel name and by coarse category (matmul, attention, fusion = XLA's
elementwise/reduction kernels, copies, other). Prints the top kernels and the categories as a
share of the summed kernel time and of the measured step time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import bench_train  # noqa: E402

from jaxlm import optim, sharding, train  # noqa: E402


def category(name: str) -> str:
    lowered = name.lower()
    if any(s in lowered for s in ("gemm", "cutlass", "xmma", "sm90", "nvjet", "matmul", "dot")):
        return "matmul"
    if any(s in lowered for s in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if "fusion" in lowered or "reduce" in lowered or "loop_" in lowered or "input_" in lowered:
        return "fusion (elementwise/reduce)"
    if "copy" in lowered or "memcpy" in lowered or "memset" in lowered or "transpose" in lowered:
        return "copy/transpose"
    return "other"


def kernel_events(trace: dict) -> list[dict]:
    """Complete events ('X') of the trace's GPU processes (process names containing 'GPU')."""
    events = trace.get("traceEvents", [])
    names = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {pid for pid, name in names.items() if "gpu" in name.lower()}
    print("trace processes:", sorted(set(names.values()))[:12])
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]


def load_kernel_events(out_dir: str) -> list[dict]:
    """The GPU kernel events of the trace jax.profiler wrote under out_dir (of its Perfetto and
    TensorBoard files, the one with more of them; none on a machine without a GPU)."""
    files = glob.glob(os.path.join(out_dir, "**", "*trace.json.gz"), recursive=True)
    print("trace files:", files)
    events = []
    for file in files:
        with gzip.open(file, "rt") as handle:
            found = kernel_events(json.load(handle))
        events = found if len(found) > len(events) else events
    return events


def summarize_trace(out_dir: str, repeats: int, top: int, unit: str) -> None:
    """Print kernel time per `unit` (the trace holds `repeats` of them) by category and name."""
    events = load_kernel_events(out_dir)
    by_name: dict[str, float] = collections.Counter()
    by_category: dict[str, float] = collections.Counter()
    ops_of: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in events:
        by_name[event["name"]] += event["dur"] / 1e3 / repeats
        ops_of[event["name"]][str(event.get("args", {}).get("hlo_op", "?"))] += event["dur"] / 1e3 / repeats
        by_category[category(event["name"])] += event["dur"] / 1e3 / repeats
    total = sum(by_category.values()) or float("nan")
    print(f"kernels: {total:.3f} ms and {len(events) / repeats:.0f} launches per {unit}")
    for name, ms in sorted(by_category.items(), key=lambda x: -x[1]):
        print(f"  {name:30s} {ms:8.3f} ms  {ms / total:6.1%}")
    print(f"top {top} kernels (ms per {unit}):")
    for name, ms in sorted(by_name.items(), key=lambda x: -x[1])[:top]:
        ops = ", ".join(f"{op} {t:.1f}" for op, t in ops_of[name].most_common(3))
        print(f"  {ms:8.3f}  {name[:90]}  [HLO ops, ms: {ops}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--remat", default="save_dots", choices=["none", "full", "save_dots"])
    parser.add_argument("--zero1", action="store_true")
    parser.add_argument("--mesh", default="")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="profile_out")
    args, args.overrides = parser.parse_known_args(argv)
    cfg = bench_train.build_config(args, jax.device_count())
    mesh = sharding.make_mesh(cfg.mesh)
    step_fn = train.make_train_step(cfg, mesh)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (args.batch, args.seq + 1),
                                               dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((args.batch, args.seq), np.float32)}
    with jax.set_mesh(mesh):
        state = train.init_state(cfg, mesh, optim.make_optimizer(cfg.model, cfg.train))
        device_batch = train.shard_batch(batch, mesh, args.grad_accum)
        for _ in range(3):
            state, metrics = step_fn(state, device_batch)
        jax.block_until_ready(metrics["loss"])
        os.makedirs(args.out, exist_ok=True)
        start = time.perf_counter()
        with jax.profiler.trace(args.out, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, metrics = step_fn(state, device_batch)
            jax.block_until_ready(metrics["loss"])
        step_ms = (time.perf_counter() - start) / args.steps * 1e3
    print(f"{jax.devices()[0].device_kind}: step {step_ms:.1f} ms (traced, host clock)")
    summarize_trace(args.out, args.steps, args.top, "step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
