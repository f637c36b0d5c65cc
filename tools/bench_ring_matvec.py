"""The ring-streamed matrix-vector chain (pallas_kernels/ring_matvec.py) against the memory
roofline and XLA, on the GPU: does streaming weights through a shared-memory ring keep DRAM busy
across grid barriers?

    python tools/bench_ring_matvec.py                       # default cases
    python tools/bench_ring_matvec.py --case sk:4096:16:2:128:8 --case sk:2048:64:4:128:8

A case is sk:D:L:k_splits:k_slot:stages[:tma|generic] (L layers of [D, D] bf16 weights, the
split-K form with a grid barrier a layer; its partial sums stored by TMA, the default, or by
plain stores). The polling form that replaced the barrier (pk: cases until the seventeenth
session) is now pallas_kernels/stage_chain.py, timed by tools/bench_stage_chain.py; a plan of
one square stage is the same chain. For each case: the error against the
float32 reference, a rerun's bitwise agreement (the grid barrier's semaphore must come back to
0 between calls), then the time of one chained call (the chain's L grid barriers), of one call
without the barriers (every layer multiplies x0: the ring's streaming alone), of one without
barriers or products (the producer and TMA alone), and of XLA's chain, each as per-call time
from (40 calls - 8 calls) / 32 in one jitted loop, and their bandwidth over the weights' bytes
against the copy and read bandwidth measured in the same process. One JSON object per line.
A case more than WRONG off the reference is reported and not timed.
With --profile DIR, rows also give the consumer's phases per layer (grid-barrier wait or poll,
x's copy, products, partials' store, arrival) from one chained call under Mosaic GPU's
profiler, whose trace stays in DIR (chrome://tracing or Perfetto open it).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
from jax import lax

from bench_decode import copy_bandwidth, per_pass_rate, read_bandwidth  # tools/
from pallas_kernels import ring_matvec


# A case whose chained or flat result is further than this from the float32 reference (as a
# fraction of its largest value; measured ones are within 0.013 after 64 layers) is reported
# and not timed: a broken kernel (or one polling for data that never comes) wastes GPU time.
WRONG = 0.05


def chained_calls(matvec_chain, ws):
    """loop(n): a jitted loop of n calls, each starting from the last call's last output
    (normalized), so no call can be skipped or overlapped with the next."""
    def loop(n):
        def body(_, x):
            y = matvec_chain(ws, x)[-1]
            return y * lax.rsqrt(jnp.mean(y * y) + 1e-12)
        return jax.jit(lambda x: lax.fori_loop(0, n, body, x))
    return loop


def profiled_phases(kernel, tiled, x0, blocks, directory, layer_us):
    """One chained call under the profiler: {phase: {cycles, us}} per layer (medians over
    CTAs and layers), us scaled so that a whole layer takes layer_us (the unprofiled
    chained time: the profiler's clock is the SM's, in cycles)."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*-trace.json"))
    jax.block_until_ready(kernel(tiled, x0, blocks=blocks, profile_dir=str(out)))
    jax.effects_barrier()  # the trace is written by a host callback
    new = sorted(set(out.glob("*-trace.json")) - before)
    if not new:
        raise RuntimeError(f"the profiled call wrote no trace into {out}")
    phases = ring_matvec.profile_phases(json.loads(new[-1].read_text()))
    per_cycle = layer_us / phases["layer"]["cycles"]
    return {name: {"cycles": round(v["cycles"]), "us": round(v["cycles"] * per_cycle, 3)}
            for name, v in phases.items()}


def xla_chain(ws, x0):
    def step(x, w):
        y = jnp.dot(w, x.astype(w.dtype), preferred_element_type=jnp.float32)
        return y, y
    return lax.scan(step, x0.astype(jnp.float32), ws)[1]


def parse_case(case: str):
    """(D, L, blocks, the kernel, CTAs) of a --case, or a ValueError that says the format."""
    fields = case[3:].split(":") if case.startswith("sk:") else []
    usage = ("want sk:D:L:k_splits:k_slot:stages[:tma|generic], positive integers, e.g. "
             "sk:2048:64:4:128:8 (the polling form is tools/bench_stage_chain.py's)")
    store = "tma"
    if len(fields) == 6 and fields[-1] in ("tma", "generic"):
        store = fields.pop()
    if len(fields) != 5 or not all(f.isdigit() and int(f) > 0 for f in fields):
        raise ValueError(usage)
    d, layers, splits, k_slot, stages = map(int, fields)
    blocks = ring_matvec.SplitKBlocks(k_splits=splits, k_slot=k_slot, stages=stages, store=store)
    problem = ring_matvec.supports_split_k((layers, d, d), jnp.bfloat16, blocks)
    if problem:
        raise ValueError(f"the split-K form does not take {problem}")
    return d, layers, blocks, ring_matvec.split_k_matvec_chain, d // 64 * splits


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--case", action="append",
                        help="sk:D:L:k_splits:k_slot:stages[:tma|generic] (a grid barrier "
                             "a layer; how partials are stored); default: plain stores at "
                             "D = 1024 and 4096")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chain-only", action="store_true",
                        help="time only the chained call (for variants of the chain alone: "
                             "their streaming rate is the same form's without barriers)")
    parser.add_argument("--profile", metavar="DIR",
                        help="also run one chained call under "
                             "Mosaic GPU's profiler, keep its trace in DIR and report the "
                             "consumer's phases per layer (cycles, and us scaled to the "
                             "unprofiled chained time)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1 (got {args.repeats})")
    # A small model's width (one 16 KB slot a CTA a layer), then D = 4096 (16 layers, 2
    # splits): the chain's cost a layer, then its streaming rate.
    cases = args.case or ["sk:1024:128:8:128:10:generic", "sk:4096:16:2:128:8:generic"]
    for case in cases:
        try:
            parse_case(case)
        except ValueError as error:
            parser.error(f"--case {case!r}: {error}")
    copy_bw, read_bw = copy_bandwidth(1 << 30), read_bandwidth(1 << 30)
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                      "copy_GBps": round(copy_bw / 1e9, 1), "read_GBps": round(read_bw / 1e9, 1)}),
          flush=True)
    for case in cases:
        d, layers, blocks, kernel, ctas = parse_case(case)
        kw, kx = jax.random.split(jax.random.key(d + layers))
        ws = (jax.random.normal(kw, (layers, d, d)) / d ** 0.5).astype(jnp.bfloat16)
        x0 = jax.random.normal(kx, (d,), jnp.float32)
        nbytes = ws.size * 2
        tiled = jax.block_until_ready(ring_matvec.tile_weights_split_k(ws, blocks))
        ring = jax.jit(lambda w, x: kernel(w, x, blocks=blocks))
        flat = jax.jit(lambda w, x: kernel(w, x, blocks=blocks, chain=False))
        no_math = jax.jit(lambda w, x: kernel(w, x, blocks=blocks, chain=False, math=False))
        want = ring_matvec.ring_matvec_chain_reference(ws, x0)
        got = ring(tiled, x0)
        again = ring(tiled, x0)
        scale = float(jnp.max(jnp.abs(want)))
        want_flat = jnp.einsum("lij,j->li", ws.astype(jnp.float32), x0,
                               precision=lax.Precision.HIGHEST)
        row = {"case": case, "weights_MB": round(nbytes / 1e6, 1), "ctas": ctas,
               "max_err_over_scale": float(jnp.max(jnp.abs(got - want))) / scale,
               "flat_max_err_over_scale": float(jnp.max(jnp.abs(flat(tiled, x0) - want_flat)))
               / float(jnp.max(jnp.abs(want_flat))),
               "rerun_bitwise_equal": bool(jnp.array_equal(got, again))}
        errors = (row["max_err_over_scale"], row["flat_max_err_over_scale"])
        if not all(e <= WRONG for e in errors):  # (NaN too: a poll that never saw its data)
            row["timed"] = f"no: wrong by more than {WRONG} of the scale"
            print(json.dumps(row), flush=True)
            continue
        timed = (("ring_chain", ring, tiled), ("ring_no_barrier", flat, tiled),
                 ("ring_no_math", no_math, tiled), ("xla_chain", jax.jit(xla_chain), ws))
        for name, fn, weights in timed[:1] if args.chain_only else timed:
            rate = per_pass_rate(chained_calls(fn, weights), x0, nbytes, args.repeats)
            row[f"{name}_us"] = round(nbytes / rate * 1e6, 1)
            row[f"{name}_of_copy"] = round(rate / copy_bw, 3)
            row[f"{name}_of_read"] = round(rate / read_bw, 3)
        if not args.chain_only:
            row["barrier_cost_us_per_layer"] = round(
                (row["ring_chain_us"] - row["ring_no_barrier_us"]) / layers, 2)
        if args.profile:
            try:  # (not run on a GPU yet: a failure is reported, the timings are kept)
                row["phases"] = profiled_phases(kernel, tiled, x0, blocks, args.profile,
                                                row["ring_chain_us"] / layers)
            except Exception as error:  # noqa: BLE001
                row["phases_error"] = f"{type(error).__name__}: {error}"[:500]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
