"""A model's decode-step chain of products (pallas_kernels/stage_chain.py: qkv, o-proj, gate/up
and down per layer, then the output layer, with the model's shapes and random bf16 weights)
against the memory roofline and XLA, on the GPU.

    python tools/bench_stage_chain.py                      # 125m and 1b, plain and with prologues
    python tools/bench_stage_chain.py --config 125m --prologues on --profile /tmp/prof

Per config and plan (plain products, and with the model's RMS norms, residual stream and
SwiGLU as prologues): the plan (each stage's shape, splits and prologue), the error of the
last stage's output against the float32 chain and a rerun's bitwise agreement (a case further
than WRONG off is reported and not timed), then the time of one chained call (the step's
weights read once, every stage waiting for the one before), of the same carrying
stage_chain's state (no arming pass; timed if three such calls give the chain's result
bitwise) and of XLA's chain of the same products, each as per-call time from
(40 calls - 8 calls) / 32 in one jitted loop, as a fraction of the copy and read bandwidth
over the weights' bytes (measured in the same process), and per stage. With --profile DIR:
the consumer's phases (poll and prologue, products, store, in SM cycles; medians over CTAs
and units) from one profiled call, whose trace stays in DIR. One JSON object per line.
Attention is not in the chain (o-proj reads q in its place): a decode step needs it on top.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
from jax import lax

from bench_decode import copy_bandwidth, per_pass_rate, read_bandwidth  # tools/
from jaxlm.config import load_config
from pallas_kernels import ring_matvec, stage_chain as sc

WRONG = 0.05  # as in bench_ring_matvec.py: measured chains are within about 0.015


def random_weights(plan: sc.ChainPlan, seed: int):
    """(layer weights [L, rows, cols], tail weights [rows, cols]) bf16, scaled 1 / sqrt(cols)
    so that the chain's values stay near 1."""
    keys = iter(jax.random.split(jax.random.key(seed), len(plan.layer) + len(plan.tail)))

    def draw(shape, cols):
        return (jax.random.normal(next(keys), shape) / cols ** 0.5).astype(jnp.bfloat16)

    layer = [draw((plan.num_layers, st.rows, st.cols), st.cols) for st in plan.layer]
    return layer, [draw((st.rows, st.cols), st.cols) for st in plan.tail]


def chained_calls(fn, weights, cols: int):
    """loop(n): n calls in one jitted loop, each starting from the last call's last output (its
    first `cols` values, normalized), so no call can be skipped or overlapped. n is an argument
    of the jitted loop, so every n shares one compile (1b's chain takes minutes to compile)."""
    def loop(w, x, n):
        def body(_, x):
            y = fn(w, x)[:cols]
            return y * lax.rsqrt(jnp.mean(y * y) + 1e-12)
        return lax.fori_loop(0, n, body, x)

    run = jax.jit(loop)  # (the weights an argument: closed over, they would be constants)
    return lambda n: functools.partial(run, weights, n=jnp.int32(n))


def chained_calls_with_state(plan, tiled, cols: int, norms=None):
    """As chained_calls, the calls carrying stage_chain's state (no arming pass a call)."""
    def loop(t, g, x, n):
        def body(_, carry):
            x, state = carry
            (_, tails), state = sc.stage_chain(plan, t, x, norms=g, state=state)
            y = tails[-1][:cols]
            return y * lax.rsqrt(jnp.mean(y * y) + 1e-12), state
        return lax.fori_loop(0, n, body, (x, sc.init_chain_state(plan)))[0]

    run = jax.jit(loop)
    return lambda n: functools.partial(run, tiled, norms, n=jnp.int32(n))


def xla_chain(plan, weights, x, norms=None):
    """The same chain in XLA (bf16 products, float32 accumulation): its last output."""
    layer, tail = weights
    return sc.stage_chain_reference(
        plan, layer, tail, x, norms, dot=lambda w, v: jnp.dot(
            w, v.astype(w.dtype), preferred_element_type=jnp.float32))[1][-1]


def random_norms(plan: sc.ChainPlan, seed: int):
    """Norm weights near 1 for the plan's norm stages, None elsewhere."""
    keys = iter(jax.random.split(jax.random.key(seed), len(plan.layer) + len(plan.tail)))
    return [None if st.prologue != "norm" else
            1 + 0.1 * jax.random.normal(next(keys), (st.cols,) if i >= len(plan.layer)
                                        else (plan.num_layers, st.cols))
            for i, st in enumerate(plan.layer + plan.tail)]


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--config", action="append",
                        help="a model preset (default: 125m and 1b)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k-slot", type=int, default=128)
    parser.add_argument("--ring", type=int, default=8, help="ring slots a CTA")
    parser.add_argument("--prologues", choices=("both", "off", "on"), default="both",
                        help="the chain plain, with the model's norms and SwiGLU, or both "
                             "(default)")
    parser.add_argument("--profile", metavar="DIR",
                        help="also run one profiled call and report the consumer's phases")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1 (got {args.repeats})")
    plans = {}
    for name in args.config or ["125m", "1b"]:
        for prologues in {"both": (False, True), "off": (False,), "on": (True,)}[args.prologues]:
            try:
                plan = sc.chain_plan_for(load_config(name), k_slot=args.k_slot, ring=args.ring,
                                         prologues=prologues)
            except (ValueError, FileNotFoundError) as error:
                parser.error(f"--config {name}: {error}")
            problem = sc.check_plan(plan, plan.ctas or 132)
            if problem:
                parser.error(f"--config {name}: stage_chain does not take {problem}")
            plans[name, prologues] = plan
    copy_bw, read_bw = copy_bandwidth(1 << 30), read_bandwidth(1 << 30)
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                      "copy_GBps": round(copy_bw / 1e9, 1), "read_GBps": round(read_bw / 1e9, 1)}),
          flush=True)
    weights = {}
    for (name, prologues), plan in plans.items():
        if name not in weights:  # (the same shapes and splits with and without prologues)
            layer_ws, tail_ws = random_weights(plan, seed=0)
            weights[name] = (layer_ws, tail_ws,
                             jax.block_until_ready(sc.tile_chain(plan, layer_ws, tail_ws)))
        layer_ws, tail_ws, tiled = weights[name]
        norms = random_norms(plan, seed=2) if prologues else None
        row = measure(name, plan, layer_ws, tail_ws, tiled, norms, args, copy_bw, read_bw)
        print(json.dumps({"config": name, "prologues": prologues, **row}), flush=True)


def measure(name, plan, layer_ws, tail_ws, tiled, norms, args, copy_bw, read_bw) -> dict:
    """One plan's row (module docstring)."""
    nbytes = sum(w.size * 2 for w in layer_ws + tail_ws)
    steps = len(plan.steps())
    x0 = jax.random.normal(jax.random.key(1), (plan.layer[0].cols,), jnp.float32)
    run = jax.jit(lambda t, x: sc.stage_chain(plan, t, x, norms=norms)[1][-1])
    want = sc.stage_chain_reference(plan, layer_ws, tail_ws, x0, norms)[1][-1]
    got, again = run(tiled, x0), run(tiled, x0)
    row = {"weights_MB": round(nbytes / 1e6, 1), "stages": steps,
           "plan": [[st.rows, st.cols, st.splits, st.prologue] for st in plan.layer + plan.tail],
           "max_err_over_scale": float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))),
           "rerun_bitwise_equal": bool(jnp.array_equal(got, again))}
    # Three calls carrying the state: both parities, each armed by the call before.
    with_state = jax.jit(lambda t, x, st: sc.stage_chain(plan, t, x, norms=norms, state=st))
    state, equal = sc.init_chain_state(plan), []
    for _ in range(3):
        (_, tails), state = with_state(tiled, x0, state)
        equal.append(bool(jnp.array_equal(tails[-1], got)))
    row["with_state_bitwise_equal"] = equal
    if not row["max_err_over_scale"] <= WRONG:  # (NaN too: a poll that never saw its data)
        row["timed"] = f"no: wrong by more than {WRONG} of the scale"
        return row
    cols = plan.layer[0].cols
    for label, loop in (
            ("chain", chained_calls(
                lambda t, x: sc.stage_chain(plan, t, x, norms=norms)[1][-1], tiled, cols)),
            ("chain_with_state", chained_calls_with_state(plan, tiled, cols, norms)),
            ("xla_chain", chained_calls(jax.jit(lambda w, x: xla_chain(plan, w, x, norms)),
                                        (layer_ws, tail_ws), cols))):
        if label == "chain_with_state" and not all(equal):
            row["chain_with_state"] = "not timed: its results differ from the chain's"
            continue
        rate = per_pass_rate(loop, x0, nbytes, args.repeats)
        row[f"{label}_us"] = round(nbytes / rate * 1e6, 1)
        row[f"{label}_of_copy"] = round(rate / copy_bw, 3)
        row[f"{label}_of_read"] = round(rate / read_bw, 3)
    row["chain_us_per_stage"] = round(row["chain_us"] / steps, 2)
    row["copy_roofline_us"] = round(nbytes / copy_bw * 1e6, 1)
    if args.profile:
        out = pathlib.Path(args.profile) / f"{name}-{'prologues' if norms else 'plain'}"
        out.mkdir(parents=True, exist_ok=True)
        jax.block_until_ready(sc.stage_chain(plan, tiled, x0, norms=norms, profile_dir=str(out)))
        jax.effects_barrier()  # the trace is written by a host callback
        traces = sorted(out.glob("*-trace.json"))
        if traces:
            phases = ring_matvec.profile_phases(json.loads(traces[-1].read_text()))
            row["phases_cycles"] = {k: round(v["cycles"]) for k, v in phases.items()}
        else:
            row["phases_error"] = f"the profiled call wrote no trace into {out}"
    return row


if __name__ == "__main__":
    main()
