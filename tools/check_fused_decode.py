"""The Pallas batch-1 decode step (pallas_kernels/fused_decode.py) on a GPU: numerics against
`model.forward` with the same cache, and its step time (one launch per stage, and the
experimental one-launch form) against XLA's step (model.forward).

    python tools/check_fused_decode.py --config 125m            # bf16 + float32 checks, timings
    python tools/check_fused_decode.py --config 1b --no-float32
    python tools/check_fused_decode.py --config 1b --no-float32 --no-bench --trace

Numerics: a 512-token random prompt is prefilled by model.forward, then `--steps` tokens are
decoded greedily by the Pallas step; the XLA step is fed the same tokens from its own copy of the
cache, and the logits are compared at every step. In float32 (compute dtype float32) the two
must agree to float32 rounding: a missed barrier or a stale read would show as an O(1) error.
In bf16 they round at the same points, so they agree to a few bf16 ulps.

Trace (`--trace`): one one-launch step with `Plan.trace`, each program stamping the GPU's timer
at every barrier; `timeline` sums, per stage kind, the barrier time (last program done to first
release) and the stage time (first release to last program done), with the median and the
slowest program's work. It shows which stage and which programs hold the step up.

Timing: a jitted loop of `--steps` greedy steps (each step's argmax is the next token), median
of `--repeats`, per step; the roofline is the weight + KV bytes of a step over the copy
bandwidth measured here. One JSON object per line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from bench_decode import copy_bandwidth  # tools/, next to this script
from bench_forward import time_step
from jaxlm import accounting, kv_cache, model
from jaxlm.config import load_config
from pallas_kernels import fused_decode, fused_decode_kernel


def setup(name: str, dtype: str, prompt_len: int, steps: int):
    cfg = dataclasses.replace(load_config(name).model, param_dtype=dtype, compute_dtype=dtype,
                              attention_impl="xla")
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, prompt_len), 0, cfg.vocab_size)
    cache_len = -(-(prompt_len + steps) // 64) * 64
    prefill = jax.jit(lambda p, t: model.forward(cfg, p, t, cache=kv_cache.init_cache(
        cfg, 1, cache_len))[1])
    return cfg, params, tokens, prefill(params, tokens)


def check(name: str, dtype: str, steps: int, one_launch: bool, **plan_options) -> dict:
    cfg, params, tokens, cache = setup(name, dtype, 512, steps)
    plan = fused_decode.make_plan(cfg, cache, **plan_options)
    weights = jax.jit(lambda p: fused_decode.prepare(cfg, p))(params)
    fused_step = jax.jit(lambda w, t, c: fused_decode.decode_token(cfg, w, t, c, plan=plan,
                                                                   one_launch=one_launch),
                         donate_argnums=2)
    infer = jax.jit(lambda p: model.inference_params(cfg, p))(params)
    xla_step = jax.jit(lambda p, t, c: model.forward(cfg, p, t[None], cache=c), donate_argnums=2)
    xla_cache = jax.tree.map(jnp.copy, cache)
    token = tokens[0, -1:]
    errors, agree, scale = [], 0, 0.0
    for _ in range(steps):
        logits, cache = fused_step(weights, token, cache)
        ref, xla_cache = xla_step(infer, token, xla_cache)
        ref = ref[0]
        errors.append(float(jnp.max(jnp.abs(logits - ref))))
        scale = max(scale, float(jnp.max(jnp.abs(ref))))
        agree += int(jnp.argmax(logits[0]) == jnp.argmax(ref[0]))
        token = jnp.argmax(logits[0])[None].astype(jnp.int32)
    cache_error = float(jnp.max(jnp.abs(cache["k"].astype(jnp.float32)
                                        - xla_cache["k"].astype(jnp.float32))))
    return {"check": name, "dtype": dtype, "one_launch": one_launch, "steps": steps,
            "max_logit_error": errors and max(errors), "logit_scale": scale,
            "argmax_agree": f"{agree}/{steps}", "cache_k_error": cache_error,
            "programs": plan.programs, "splits": plan.splits, **plan_options}


BREAKDOWN = {  # one-launch variants that leave parts out (wrong results, timing only)
    "no_barriers": ("barrier",),
    "barriers_only": fused_decode.STAGES + ("head",),
    "barriers_head": fused_decode.STAGES,
    "no_attention": ("attention", "o_proj"),
}


def greedy_loop(step, steps: int, first_token):
    """(params, cache) -> `steps` greedy steps of `step(params, token, cache) -> (logits,
    cache)` in one fori_loop, each step's argmax the next token (for timing)."""
    def loop(params, cache):
        def body(_, carry):
            token, cache = carry
            logits, cache = step(params, token, cache)
            return jnp.argmax(logits.reshape(-1, logits.shape[-1])[0])[None].astype(jnp.int32), cache
        return jax.lax.fori_loop(0, steps, body, (first_token, cache))
    return loop


def bench(name: str, steps: int, repeats: int, bandwidth: float, breakdown: bool,
          extra: dict = {}, **plan_options) -> None:
    """Times XLA's step and the Pallas step (both forms; with `breakdown`, the BREAKDOWN
    variants; `extra`: label -> Plan fields for more one-launch variants)."""
    cfg, params, tokens, cache = setup(name, "bfloat16", 512, steps)
    plan = fused_decode.make_plan(cfg, cache, **plan_options)
    weights = jax.jit(lambda p: fused_decode.prepare(cfg, p))(params)
    infer = jax.jit(lambda p: model.inference_params(cfg, p))(params)

    variants = {
        "pallas": (weights, lambda w, t, c: fused_decode.decode_token(cfg, w, t, c, plan=plan)),
        "one_launch": (weights, lambda w, t, c: fused_decode.decode_token(
            cfg, w, t, c, plan=plan, one_launch=True)),
        "xla": (infer, lambda p, t, c: model.forward(cfg, p, t[None], cache=c)),
    }
    changes = {**extra, **({label: {"skip": skip} for label, skip in BREAKDOWN.items()}
                           if breakdown else {})}
    for label, fields in changes.items():
        variant = dataclasses.replace(plan, **fields)
        variants[label] = (weights, lambda w, t, c, variant=variant: fused_decode.decode_token(
            cfg, w, t, c, plan=variant, one_launch=True))
    step_bytes = accounting.decode_step_bytes(cfg, 1, 512 + steps // 2)
    for label, (args, step) in variants.items():
        run = jax.jit(greedy_loop(step, steps, tokens[0, -1:]))
        times = time_step(run, args, cache, warmup=1, repeats=repeats)
        per_step = statistics.median(times) / steps
        print(json.dumps({"bench": name, "step": label, "step_us": round(per_step * 1e6, 1),
                          "tokens_per_s": round(1 / per_step, 1), "step_bytes": step_bytes,
                          "roofline_fraction": round(step_bytes / bandwidth / per_step, 3),
                          "times_s": [round(t, 4) for t in times]}), flush=True)


def timeline(plan: fused_decode.Plan, trace) -> dict:
    """Where a traced one-launch step's time went, from state["trace"] [programs, 3 E + 1]: per
    program and barrier, when its stage was done, when the arrival counter answered and when
    it was released; then when its last logit was written (ns, the low 32 bits of the GPU's
    global timer).

    Per stage kind, summed over layers (us): `barrier`, from the last program done before the
    stage to the first release; `span`, from that release to the last program done with the
    stage; `work_median` / `work_max`, one program's release-to-done time over programs;
    `atomic`, the median time the arrival's atomic took; `release_spread`, first to last
    release. barrier + span, summed, is the step (`step_us`).

    Inside attention (`attention_parts`, summed over layers, median and max over the programs
    that ran a unit): `qkv_rope` from the release to q/k/v loaded and rotated (when attention
    follows a barrier), `blocks` the key blocks, `partials` the new token and the partials'
    stores, `count_merge` the arrival count and, for the last unit of a kv head, the merge."""
    raw = np.asarray(trace, np.int64)
    if raw.shape[1] != fused_decode.trace_columns(plan):
        raise ValueError(f"trace has {raw.shape[1]} columns; this plan makes "
                         f"{fused_decode.trace_columns(plan)}")
    t = (raw - raw[0, 2] + 2 ** 31) % 2 ** 32 - 2 ** 31  # differences survive the 32-bit wrap
    count = fused_decode.barriers(plan)
    done, counted, release = (t[:, i:3 * count:3] for i in range(3))
    finish = np.concatenate([done[:, 1:], t[:, 3 * count:]], axis=1)  # each stage's end
    synced = fused_decode_kernel.synced_stages(plan)
    names = synced * plan.layers + ["head"]
    keys = ("barrier", "span", "work_median", "work_max", "atomic", "release_spread")
    rows: dict = {}
    for e, name in enumerate(names):
        work = finish[:, e] - release[:, e]
        row = rows.setdefault(name, {"count": 0, **dict.fromkeys(keys, 0.0)})
        row["count"] += 1
        for key, ns in (("barrier", release[:, e].min() - done[:, e].max()),
                        ("span", finish[:, e].max() - release[:, e].min()),
                        ("work_median", np.median(work)), ("work_max", work.max()),
                        ("atomic", np.median(counted[:, e] - done[:, e])),
                        ("release_spread", release[:, e].max() - release[:, e].min())):
            row[key] += float(ns) / 1e3
    for row in rows.values():
        for key in keys:
            row[key] = round(row[key], 2)
    total = (t[:, 3 * count].max() - done[:, 0].max()) / 1e3
    return {"step_us": round(float(total), 2), "stages": rows,
            "attention_parts": _attention_parts(plan, raw, t, release, synced)}


def _attention_parts(plan, raw, t, release, synced) -> dict:
    """timeline's `attention_parts` from the ATTENTION_PARTS stamps per layer after the
    barrier columns (a program without an attention unit left them 0)."""
    first = 3 * fused_decode.barriers(plan) + 1
    stamps = t[:, first:].reshape(len(t), plan.layers, fused_decode.ATTENTION_PARTS)
    ran = raw[:, first:].reshape(stamps.shape)[:, :, -1] != 0  # [programs, layers]
    names = (["qkv_rope"] if "attention" in synced else []) + ["blocks", "partials",
                                                              "count_merge"]
    parts = {name: {"median": 0.0, "max": 0.0} for name in names}
    for layer in range(plan.layers):
        points = [stamps[:, layer, j] for j in range(fused_decode.ATTENTION_PARTS)]
        if "attention" in synced:
            points.insert(0, release[:, layer * len(synced) + synced.index("attention")])
        units = ran[:, layer]
        for name, (a, b) in zip(names, zip(points[:-1], points[1:])):
            ns = (b - a)[units]
            parts[name]["median"] += float(np.median(ns)) / 1e3
            parts[name]["max"] += float(ns.max()) / 1e3
    return {name: {k: round(v, 2) for k, v in d.items()} for name, d in parts.items()}


def trace_step(name: str, steps: int, **plan_options) -> dict:
    """The timeline of one traced one-launch step (after `steps` untraced warm-up steps)."""
    cfg, params, tokens, cache = setup(name, "bfloat16", 512, steps + 1)
    plan = fused_decode.make_plan(cfg, cache, trace=True, **plan_options)
    weights = jax.jit(lambda p: fused_decode.prepare(cfg, p))(params)
    traced = jax.jit(lambda w, t, c: fused_decode.step_state(cfg, w, t, c, plan=plan,
                                                             one_launch=True)["trace"])
    token = tokens[0, -1:]
    for _ in range(steps):
        trace = traced(weights, token, cache)
    return {"trace": name, **plan_options, **timeline(plan, jax.device_get(trace))}


def parse_field(item: str) -> tuple:
    """'name=value' -> (name, value) with ints and booleans converted."""
    name, sep, value = item.partition("=")
    fields = {f.name for f in dataclasses.fields(fused_decode.Plan)}
    if not sep or name not in fields:
        raise SystemExit(f"--plan {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
    if name == "skip":  # stages to leave out, comma-separated
        return name, tuple(value.split(","))
    if name == "stage_tiles":  # e.g. down:8192,head:32768
        try:
            return name, tuple((w, int(n)) for w, n in (pair.split(":") for pair in value.split(",")))
        except ValueError:
            raise SystemExit(f"--plan {item!r}: expected stage_tiles=WEIGHT:ELEMENTS[,...]")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    if name in ("lookahead", "data_waits"):  # stage names, e.g. qkv,gate_up
        return name, tuple(value.split(","))
    try:
        return name, int(value)
    except ValueError:
        return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", help="preset(s) (default 125m)")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--check-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-float32", action="store_true", help="skip the float32 check")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--num-warps", type=int, default=8, help="warps per program")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time one-launch variants without barriers / stages (BREAKDOWN)")
    parser.add_argument("--trace", action="store_true",
                        help="also print where one one-launch step's time goes (timeline)")
    parser.add_argument("--plan", action="append", default=[], metavar="FIELD=VALUE",
                        help="a fused_decode.Plan field for every Pallas run, e.g. lookahead=true "
                             "(ints and true/false are converted)")
    args = parser.parse_args()
    plan_options = dict(parse_field(item) for item in args.plan)
    plan_options.setdefault("num_warps", args.num_warps)
    print(json.dumps({"device": str(jax.devices()[0]),
                      "core_count": getattr(jax.devices()[0], "core_count", None)}), flush=True)
    bandwidth = copy_bandwidth(1 << 30)
    print(json.dumps({"copy_bandwidth_GBps": round(bandwidth / 1e9, 1)}), flush=True)
    for name in args.config or ["125m"]:
        dtypes = ["bfloat16"] + ([] if args.no_float32 else ["float32"])
        for dtype in dtypes:
            for one_launch in (False, True):
                print(json.dumps(check(name, dtype, args.check_steps, one_launch,
                                       **plan_options)), flush=True)
        if args.trace:
            print(json.dumps(trace_step(name, 8, **plan_options)), flush=True)
        if not args.no_bench:
            bench(name, args.steps, args.repeats, bandwidth, args.breakdown, **plan_options)


if __name__ == "__main__":
    main()
