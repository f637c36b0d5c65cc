"""A model's decode step as one chain of stages (pallas_kernels/stage_chain.py: qkv, o-proj,
gate/up and down per layer, then the output layer, with the model's shapes and random bf16
weights; optionally attention over a cache too) against the memory roofline and XLA, on the GPU.

    python tools/bench_stage_chain.py                       # 125m and 1b, all three plans
    python tools/bench_stage_chain.py --config 1b --plans attention --profile /tmp/prof
    python tools/bench_stage_chain.py --config 1b --plans attention --staging both

Plans per config: plain (the products), prologues (with the model's RMS norms, residual
stream and SwiGLU) and attention (the whole step but the embedding and the sampling: also
attention over a cache of --max-len positions, the token the last one). Per plan: the stage
plan (each stage's shape, splits and prologue), the error of the output layer's result against
the float32 reference, whether three calls carrying the state (and, without attention, a call
without it) agree bitwise (a case further than WRONG off is reported and not timed), then the
time of one chained call carrying the state (the step's weights and cache read once, every
stage waiting for the one before), without attention also without the state, and of XLA's
chain of the same work, each as per-call time from (40 calls - 8 calls) / 32 in one jitted
loop and as a fraction of the copy and read bandwidth over the bytes read (weights, and with
attention the K and V before the token; measured in the same process), and per stage. The
loops take the call count as a traced argument (one compile); --static-calls also times the
chain with the state in loops of a static count (chain_with_state_static). With
--profile DIR: the consumer's phases (poll and prologue, products, store, attention units; in
SM cycles, medians over CTAs and units) from one profiled call, whose trace stays in DIR, and
the stages' timeline across CTAs (stage_timeline: each stage's share of the critical path). One
JSON object per line.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench_decode import copy_bandwidth, per_pass_rate, read_bandwidth  # tools/
from jaxlm.config import load_config
from pallas_kernels import ring_matvec, stage_chain as sc

WRONG = 0.05  # as in bench_ring_matvec.py: measured chains are within about 0.015


def random_weights(plan: sc.ChainPlan, seed: int):
    """(layer weights [L, rows, cols], None for attention; tail weights [rows, cols]) bf16,
    scaled 1 / sqrt(cols) so that the chain's values stay near 1."""
    keys = iter(jax.random.split(jax.random.key(seed), len(plan.layer) + len(plan.tail)))

    def draw(shape, cols):
        return (jax.random.normal(next(keys), shape) / cols ** 0.5).astype(jnp.bfloat16)

    layer = [draw((plan.num_layers, st.rows, st.cols), st.cols) if st.weighted else None
             for st in plan.layer]
    return layer, [draw((st.rows, st.cols), st.cols) for st in plan.tail]


def _calls(loop, static: bool):
    """n -> the jitted loop(..., n=n) taking the rest of its arguments: n traced (one compile
    for every n) or, with static, a constant of its own compile. A traced count makes XLA's
    loop a while loop whose predicate may go to the host every call; a static one has a known
    trip count (--static-calls times both)."""
    if static:
        return lambda n: jax.jit(functools.partial(loop, n=n))
    run = jax.jit(loop)
    return lambda n: functools.partial(run, n=jnp.int32(n))


def chained_calls(fn, weights, cols: int, static: bool = False):
    """loop(n): n calls in one jitted loop, each starting from the last call's last output (its
    first `cols` values, normalized), so no call can be skipped or overlapped. By default n is
    an argument of the jitted loop, so every n shares one compile (1b's chain takes minutes to
    compile); static: a compile for each n (_calls)."""
    def loop(w, x, n):
        def body(_, x):
            y = fn(w, x)[:cols]
            return y * lax.rsqrt(jnp.mean(y * y) + 1e-12)
        return lax.fori_loop(0, n, body, x)

    calls = _calls(loop, static)  # (the weights an argument: closed over, they'd be constants)
    return lambda n: functools.partial(calls(n), weights)


def chained_calls_with_state(plan, tiled, cols: int, norms=None, cache=None, extra=None,
                             static: bool = False):
    """As chained_calls, the calls carrying stage_chain's state (no arming pass a call; with
    attention the state holds the cache, and extra has pos and the RoPE tables)."""
    pos = (extra or {}).get("pos")

    def loop(t, g, c, rope, x, n):
        def body(_, carry):
            x, state = carry
            (_, tails), state = sc.stage_chain(plan, t, x, norms=g, state=state, pos=pos,
                                               rope=rope)
            y = tails[-1][:cols]
            return y * lax.rsqrt(jnp.mean(y * y) + 1e-12), state
        return lax.fori_loop(0, n, body, (x, sc.init_chain_state(plan, c)))[0]

    calls = _calls(loop, static)
    return lambda n: functools.partial(calls(n), tiled, norms, cache, (extra or {}).get("rope"))


def xla_chain(plan, weights, x, norms=None, pos=None, inv_freq=None):
    """The same chain in XLA (bf16 products, float32 accumulation): its last output. weights:
    (layer, tail) or, with attention, (layer, tail, cache)."""
    layer, tail, *cache = weights
    return sc.stage_chain_reference(
        plan, layer, tail, x, norms, cache=cache[0] if cache else None, pos=pos,
        inv_freq=inv_freq, dot=lambda w, v: jnp.dot(
            w, v.astype(w.dtype), preferred_element_type=jnp.float32))[1][-1]


def random_norms(plan: sc.ChainPlan, seed: int):
    """Norm weights near 1 for the plan's norm stages, None elsewhere."""
    keys = iter(jax.random.split(jax.random.key(seed), len(plan.layer) + len(plan.tail)))
    return [None if st.prologue != "norm" else
            1 + 0.1 * jax.random.normal(next(keys), (st.cols,) if i >= len(plan.layer)
                                        else (plan.num_layers, st.cols))
            for i, st in enumerate(plan.layer + plan.tail)]


PLANS = ("plain", "prologues", "attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--config", action="append",
                        help="a model preset (default: 125m and 1b)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k-slot", type=int, default=128)
    parser.add_argument("--ring", type=int, default=8, help="ring slots a CTA (at most)")
    parser.add_argument("--plans", default=",".join(PLANS),
                        help="comma-separated, of: plain (the products), prologues (with the "
                             "model's norms, residual stream and SwiGLU), attention (the whole "
                             "step: with attention over a cache too); default all")
    parser.add_argument("--max-len", type=int, default=768,
                        help="attention plans: the cache's positions; the token is the last "
                             "(default 768: 512 prompt + 256 new tokens)")
    parser.add_argument("--staging", choices=("default", "separate", "shared", "both"),
                        default="default",
                        help="attention plans: outputs and log-sum-exps staged in two buffers "
                             "or one (ChainPlan.shared_staging, which deepens the ring); both: "
                             "each attention plan both ways; default: chain_plan_for's choice "
                             "(shared where the separate staging leaves the ring < 6 slots)")
    parser.add_argument("--registers", default="232",
                        help="comma-separated: the consumer's registers a thread (ChainPlan."
                             "registers), each plan with each (default 232)")
    parser.add_argument("--merge-values", default="64",
                        help="attention plans, comma-separated: values a thread polls at once "
                             "in o-proj's merge (ChainPlan.merge_values), each plan with each "
                             "(default 64)")
    parser.add_argument("--static-calls", action="store_true",
                        help="also time the chain carrying its state in loops of a static "
                             "call count (a compile for each of the two counts), against the "
                             "default's traced count, whose while loop may wait on the host "
                             "every call")
    parser.add_argument("--profile", metavar="DIR",
                        help="also run one profiled call and report the consumer's phases "
                             "and the stages' timeline between CTAs (stage_timeline)")
    parser.add_argument("--clock-ghz", type=float, default=1.98,
                        help="--profile: the SM clock that turns the profiler's cycles into "
                             "ns (default 1.98, an H200's and H100 SXM's boost clock)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1 (got {args.repeats})")
    kinds = args.plans.split(",")
    if not kinds or any(k not in PLANS for k in kinds):
        parser.error(f"--plans {args.plans}: a comma-separated list of {', '.join(PLANS)}")
    if args.max_len < 1:
        parser.error(f"--max-len must be at least 1 (got {args.max_len})")
    try:
        counts = [int(r) for r in args.registers.split(",")]
    except ValueError:
        parser.error(f"--registers {args.registers}: comma-separated integers")
    try:
        merges = [int(r) for r in args.merge_values.split(",")]
    except ValueError:
        parser.error(f"--merge-values {args.merge_values}: comma-separated integers")
    plans = {}
    for name in args.config or ["125m", "1b"]:
        for kind in kinds:
            try:
                plans_of_kind = [sc.chain_plan_for(
                    load_config(name), k_slot=args.k_slot, ring=args.ring,
                    prologues=kind != "plain",
                    max_len=args.max_len if kind == "attention" else None,
                    shared_staging=shared) for shared in (
                        {"default": (None,), "separate": (False,), "shared": (True,),
                         "both": (False, True)}[args.staging]
                        if kind == "attention" else (False,))]
            except (ValueError, FileNotFoundError) as error:
                parser.error(f"--config {name}: {error}")
            for plan in plans_of_kind:
                for registers, merge in itertools.product(
                        counts, merges if kind == "attention" else [plan.merge_values]):
                    variant = dataclasses.replace(plan, registers=registers, merge_values=merge)
                    problem = sc.check_plan(variant, plan.ctas or 132)
                    if problem:
                        parser.error(f"--config {name}: stage_chain does not take {problem}")
                    plans[name, kind, plan.shared_staging, registers, merge] = variant
    copy_bw, read_bw = copy_bandwidth(1 << 30), read_bandwidth(1 << 30)
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                      "copy_GBps": round(copy_bw / 1e9, 1), "read_GBps": round(read_bw / 1e9, 1)}),
          flush=True)
    for (name, kind, shared, registers, merge), plan in plans.items():
        layer_ws, tail_ws = random_weights(plan, seed=0)  # (the same for every plan of a config)
        norms = random_norms(plan, seed=2) if kind != "plain" else None
        row = measure(name, plan, layer_ws, tail_ws, norms, args, copy_bw, read_bw)
        print(json.dumps({"config": name, "plan": kind, "shared_staging": shared,
                          "registers": registers, "merge_values": merge, **row}),
              flush=True)
        del layer_ws, tail_ws


def unit_sequence(plan: sc.ChainPlan, cta: int, num_ctas: int) -> list:
    """(layer, stage) of CTA cta's units in the order it runs them (stage_chain's round robin:
    unit u of a stage runs on CTA u % num_ctas); tail stages come as layer 0."""
    stages = plan.layer + plan.tail

    def count(k):
        return max(0, -(-(stages[k].units - cta) // num_ctas))

    n_layer = len(plan.layer)
    order = [(layer, k) for layer in range(plan.num_layers) for k in range(n_layer)
             for _ in range(count(k))]
    return order + [(0, k) for k in range(n_layer, len(stages)) for _ in range(count(k))]


UNIT_ENDS = ("store", "att_store")  # the consumer scopes that close a unit
READY = ("x", "att_q", "att_new")  # the scopes that end when a unit's input is there
TIMELINE_LAYERS = 4  # the layers stage_timeline's medians take (all recorded for every CTA)


def stage_timeline(trace: dict, plan: sc.ChainPlan, clock_ghz: float,
                   layers: int | None = None) -> dict:
    """Where a profiled chain's time goes between CTAs, from the consumer's scopes.

    Mosaic GPU's profiler stamps each CTA's start with the global timer (ns, the same clock
    on every SM) and its events with the SM's cycle counter, so an event's time in ns is the
    start plus its cycles over clock_ghz. Each CTA's units are matched to (layer, stage) by
    unit_sequence. Only stages whose units were all recorded count: the profiler keeps a
    CTA's first PROFILE_REGIONS scopes, which at 1b with 4,096 positions end in the last
    layer.
    Each CTA's cycles are put on one clock by `common_clock`, which fits every CTA's rate
    and offset to the moments its norm units got their input (on the nominal clock, SMs'
    counters drifted microseconds apart within a few layers: the twenty-second session's
    "drift"). `layers` keeps the medians to the first layers (the benchmark:
    TIMELINE_LAYERS), which the profiler's scope limit records for every CTA. Per
    stage of a layer, medians over the layers (the first layer's first stage has no stage
    before it and is left out; with `layers`, so is the tail):
      done_after_prev_us: its last unit's end after the previous stage's last unit's end
        (the stage's share of the critical path; they add up to a layer);
      ready_after_prev_us: the last time any of its units had its input (the end of its "x"
        poll, or att_q / att_new, as thread 0 of the unit saw it), after the previous
        stage's last end;
      spread_us: its last unit's end after its first's.
    Also "layer_us", the median time between two layers' last ends, and "cta_clock_GHz",
    the slowest and fastest rate common_clock found for a CTA's cycle counter."""
    threads = ring_matvec._by_thread(trace["traceEvents"])
    # The consumers' traces (the ones with units), in CTA order (the profiler's tid grows
    # with the CTA).
    ctas = sorted((t for t, events in threads.items()
                   if any(e["name"] in UNIT_ENDS for e in events)), key=lambda t: t[1])
    stages = plan.layer + plan.tail
    n_layer = len(plan.layer)
    # Each CTA's unit ends and readies in its own SM cycles from its start (global timer, ns).
    cycles: dict = {}  # (layer, stage) -> [(cta, ready cycles or None, end cycles)]
    starts = {}
    for cta, thread in enumerate(ctas):
        events = threads[thread]
        starts[cta] = events[0]["ts"] * 1e3
        units = iter(unit_sequence(plan, cta, len(ctas)))
        depth, ready = 0, None
        for event in events:
            if event["ph"] == "B":
                depth += 1
                continue
            depth -= 1
            if depth:
                continue
            cycle = event["ts"] * 1e3 - starts[cta]
            if event["name"] in READY:
                ready = cycle
            elif event["name"] in UNIT_ENDS:
                try:
                    key = next(units)
                except StopIteration:
                    names = collections.Counter(e["name"] for e in events if e["ph"] == "B")
                    raise ValueError(
                        f"CTA {cta} of {len(ctas)} ran more units than the plan gives it "
                        f"({len(unit_sequence(plan, cta, len(ctas)))}); its scopes: "
                        f"{dict(names)}") from None
                cycles.setdefault(key, []).append((cta, ready, cycle))
                ready = None
    # The moments a norm stage's units got their input (layer 0's first stage reads x0,
    # there from the start, so it is not one).
    sync: dict = {}
    for key, rows in cycles.items():
        if stages[key[1]].prologue == "norm" and key != (0, 0):
            for cta, ready, _ in rows:
                if ready is not None:
                    sync.setdefault(key, {}).setdefault(cta, ready)
    clocks = common_clock(sync, starts, clock_ghz)
    ends: dict = {}
    readies: dict = {}
    for key, rows in cycles.items():
        for cta, ready, end in rows:
            offset, ns_per_cycle = clocks[cta]
            ends.setdefault(key, []).append(offset + ns_per_cycle * end)
            if ready is not None:
                readies.setdefault(key, []).append(offset + ns_per_cycle * ready)
    order = [(layer, k) for layer in range(min(plan.num_layers, layers or plan.num_layers))
             for k in range(n_layer)]
    if layers is None:
        order += [(0, k) for k in range(n_layer, len(stages))]
    complete = {key for key in order if len(ends.get(key, ())) == stages[key[1]].units}
    rows: dict = {}
    for prev, key in zip(order, order[1:]):
        if prev not in complete or key not in complete:
            continue
        last_prev = max(ends[prev])
        row = rows.setdefault(key[1], {"done": [], "ready": [], "spread": []})
        row["done"].append(max(ends[key]) - last_prev)
        if key in readies:
            row["ready"].append(max(readies[key]) - last_prev)
        row["spread"].append(max(ends[key]) - min(ends[key]))
    last = {layer: max(ends[(layer, n_layer - 1)]) for layer, _ in order
            if (layer, n_layer - 1) in complete}

    def median_us(values):
        return round(float(np.median(values)) / 1e3, 2) if len(values) else None

    out = {f"{k}:{stages[k].prologue}": {"done_after_prev_us": median_us(row["done"]),
                                         "ready_after_prev_us": median_us(row["ready"]),
                                         "spread_us": median_us(row["spread"])}
           for k, row in sorted(rows.items())}
    out["layer_us"] = median_us([last[layer] - last[layer - 1] for layer in last
                                 if layer - 1 in last])
    rates = [1 / clocks[cta][1] for cta in clocks]
    out["cta_clock_GHz"] = [round(min(rates), 3), round(max(rates), 3)]
    return out


def common_clock(sync: dict, starts: dict, clock_ghz: float, rounds: int = 5) -> dict:
    """{cta: (offset ns, ns a cycle)}: each CTA's cycle counts on one clock.

    The profiler stamps a CTA's start with the global timer (which ticks too coarsely to time
    events by itself) and its events with its SM's cycle counter, and SMs' counters do not
    advance at one rate: in a 125m chain on an H200 (twenty-fourth session) the CTAs with
    fewer units counted up to 14% more cycles than the others between the same two moments.
    On the nominal clock their events drifted microseconds late within a few layers, and
    consumers seemed to get their inputs before the producers stored them. A norm stage's
    units each poll the whole of the stage before's output, so they get it within about a
    poll of each other: those moments (sync: {point: {cta: cycles}}) set each CTA's offset
    and rate, by least squares against the median over CTAs of where the last round put
    them; so the common clock is the median CTA's counter at clock_ghz. A CTA with fewer
    than 3 such moments (or a fit that does not go forward) keeps clock_ghz, and its start
    or one moment's offset."""
    clocks = {cta: (start, 1 / clock_ghz) for cta, start in starts.items()}
    for _ in range(rounds):
        moments = {point: float(np.median([clocks[c][0] + clocks[c][1] * v
                                           for c, v in by_cta.items()]))
                   for point, by_cta in sync.items()}
        for cta in clocks:
            pairs = [(by_cta[cta], moments[p]) for p, by_cta in sync.items() if cta in by_cta]
            rate = 0.0
            if len(pairs) >= 3:
                counted, at = np.array(pairs).T
                rate, offset = np.polyfit(counted, at, 1)
            if rate > 0:
                clocks[cta] = (float(offset), float(rate))
            elif pairs:
                counted, at = pairs[0]
                clocks[cta] = (at - counted / clock_ghz, 1 / clock_ghz)
    return clocks


def attention_inputs(plan: sc.ChainPlan, max_len: int, seed: int):
    """(cache (k, v) with random keys and values at positions < max_len - 1, pos = max_len - 1,
    RoPE's inv_freq)."""
    att = plan.layer[plan.attention]
    shape = (plan.num_layers, att.kv_heads, att.chunks * sc.CHUNK, sc.HEAD_DIM)
    keys = jax.random.split(jax.random.key(seed), 2)
    cache = tuple(jax.random.normal(k, shape).astype(jnp.bfloat16) for k in keys)
    inv_freq = 1.0 / 10000.0 ** (jnp.arange(sc.HEAD_DIM // 2) / (sc.HEAD_DIM // 2))
    return cache, max_len - 1, inv_freq


def measure(name, plan, layer_ws, tail_ws, norms, args, copy_bw, read_bw) -> dict:
    """One plan's row (module docstring)."""
    tiled = jax.block_until_ready(sc.tile_chain(plan, layer_ws, tail_ws))
    nbytes = sum(w.size * 2 for w in layer_ws + tail_ws if w is not None)
    steps = len(plan.steps())
    x0 = jax.random.normal(jax.random.key(1), (plan.layer[0].cols,), jnp.float32)
    cols = plan.layer[0].cols
    extra = {}
    if plan.attention is not None:
        cache, pos, inv_freq = attention_inputs(plan, args.max_len, seed=3)
        rope = sc.rope_tables(plan, inv_freq)
        att = plan.layer[plan.attention]
        nbytes += 2 * plan.num_layers * att.kv_heads * pos * sc.HEAD_DIM * 2  # K and V read
        extra = dict(pos=pos, rope=rope)
        want = sc.stage_chain_reference(plan, layer_ws, tail_ws, x0, norms, cache=cache,
                                        pos=pos, inv_freq=inv_freq)[1][-1]
    else:
        cache = None
        want = sc.stage_chain_reference(plan, layer_ws, tail_ws, x0, norms)[1][-1]
    row = {"bytes_MB": round(nbytes / 1e6, 1), "stages": steps, "ring": plan.ring,
           "stage_plan": [[st.rows, st.cols, st.splits, st.prologue]
                          for st in plan.layer + plan.tail]}
    # Three calls carrying the state: both parities, each armed by the call before.
    with_state = jax.jit(lambda t, x, st: sc.stage_chain(plan, t, x, norms=norms, state=st,
                                                         **extra))
    state, results = sc.init_chain_state(plan, cache), []
    for _ in range(3):
        (_, tails), state = with_state(tiled, x0, state)
        results.append(tails[-1])
    got = results[0]
    row["max_err_over_scale"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    row["stateful_calls_bitwise_equal"] = [bool(jnp.array_equal(r, got)) for r in results[1:]]
    if plan.attention is None:
        run = jax.jit(lambda t, x: sc.stage_chain(plan, t, x, norms=norms)[1][-1])
        row["stateless_bitwise_equal"] = bool(jnp.array_equal(run(tiled, x0), got))
    if not row["max_err_over_scale"] <= WRONG:  # (NaN too: a poll that never saw its data)
        row["timed"] = f"no: wrong by more than {WRONG} of the scale"
        return row
    loops = [("chain_with_state", chained_calls_with_state(plan, tiled, cols, norms, cache,
                                                             extra))]
    if args.static_calls:
        loops.append(("chain_with_state_static", chained_calls_with_state(
            plan, tiled, cols, norms, cache, extra, static=True)))
    if plan.attention is None:
        loops.append(("chain", chained_calls(
            lambda t, x: sc.stage_chain(plan, t, x, norms=norms)[1][-1], tiled, cols)))
        loops.append(("xla_chain", chained_calls(
            jax.jit(lambda w, x: xla_chain(plan, w, x, norms)), (layer_ws, tail_ws), cols)))
    else:
        loops.append(("xla_chain", chained_calls(
            jax.jit(lambda w, x: xla_chain(plan, w, x, norms, pos, inv_freq)),
            (layer_ws, tail_ws, cache), cols)))
    for label, loop in loops:
        if label.startswith("chain_with_state") and not all(
                row["stateful_calls_bitwise_equal"]):
            row[label] = "not timed: the stateful calls differ"
            continue
        rate = per_pass_rate(loop, x0, nbytes, args.repeats)
        row[f"{label}_us"] = round(nbytes / rate * 1e6, 1)
        row[f"{label}_of_copy"] = round(rate / copy_bw, 3)
        row[f"{label}_of_read"] = round(rate / read_bw, 3)
    if "chain_with_state_us" in row:
        row["us_per_stage"] = round(row["chain_with_state_us"] / steps, 2)
    row["copy_roofline_us"] = round(nbytes / copy_bw * 1e6, 1)
    if args.profile:
        out = pathlib.Path(args.profile) / (f"{name}-{len(plan.layer)}-{norms is not None}-"
                                            f"{plan.shared_staging}-{plan.registers}-"
                                            f"{plan.merge_values}")
        out.mkdir(parents=True, exist_ok=True)
        (_, tails), _ = sc.stage_chain(plan, tiled, x0, norms=norms, profile_dir=str(out),
                                       state=sc.init_chain_state(plan, cache), **extra)
        jax.block_until_ready(tails)
        jax.effects_barrier()  # the trace is written by a host callback
        traces = sorted(out.glob("*-trace.json"))
        if traces:
            trace = json.loads(traces[-1].read_text())
            phases = ring_matvec.profile_phases(trace)
            row["phases_cycles"] = {k: round(v["cycles"]) for k, v in phases.items()}
            try:
                row["timeline"] = stage_timeline(trace, plan, args.clock_ghz,
                                                 layers=TIMELINE_LAYERS)
            except ValueError as error:  # (the phases above still stand)
                row["timeline_error"] = str(error)
        else:
            row["phases_error"] = f"the profiled call wrote no trace into {out}"
    return row


if __name__ == "__main__":
    main()
