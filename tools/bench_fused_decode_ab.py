"""Two versions of the Pallas batch-1 decode step (pallas_kernels/fused_decode.py) timed in one
process, one launch each, interleaved: a change to the kernel against the code before it, or a
Plan option against the default, on the same card and with the same copy bandwidth (processes
differ by a few percent).

    git show HEAD~1:pallas_kernels/fused_decode.py > /tmp/fused_decode_before.py
    python tools/bench_fused_decode_ab.py --baseline /tmp/fused_decode_before.py --config 1b
    python tools/bench_fused_decode_ab.py --config 1b --candidate-plan lookahead=qkv,o_proj

Each round times the baseline (a file, default the package's module), then the candidate (the
package's fused_decode.py or `--candidate`, with `--candidate-plan` fields on top): a
jitted loop of `--steps` greedy steps, median of `--repeats` per step, with the roofline
fraction (weight + KV bytes of a step over the copy bandwidth measured here). Both versions
must take the same `make_plan` / `prepare` / `decode_token` arguments. GPU only (the
one-launch form spins on a grid barrier). One JSON object per line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys

import jax

from bench_decode import copy_bandwidth  # tools/, next to this script
from bench_forward import time_step
from check_fused_decode import greedy_loop, parse_field, setup
from jaxlm import accounting

PACKAGE_FILE = pathlib.Path(__file__).resolve().parents[1] / "pallas_kernels" / "fused_decode.py"


def load_version(path: str, label: str):
    """A fused_decode.py file as its own module (registered: its dataclasses need that)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise SystemExit(f"{label}: {path} is not a file (write one with `git show "
                         "REV:pallas_kernels/fused_decode.py > FILE`)")
    name = f"fused_decode_{label}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def step_time(module, name: str, steps: int, repeats: int, plan_options: dict) -> tuple:
    """(seconds per step of `steps` greedy one-launch steps (median of `repeats`), the weight +
    KV bytes of a step)."""
    cfg, params, tokens, cache = setup(name, "bfloat16", 512, steps)
    plan = module.make_plan(cfg, cache, **plan_options)
    weights = jax.jit(lambda p: module.prepare(cfg, p))(params)

    loop = greedy_loop(lambda w, t, c: module.decode_token(cfg, w, t, c, plan=plan,
                                                           one_launch=True),
                       steps, tokens[0, -1:])
    times = time_step(jax.jit(loop), weights, cache, warmup=1, repeats=repeats)
    return statistics.median(times) / steps, accounting.decode_step_bytes(cfg, 1, 512 + steps // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=str(PACKAGE_FILE),
                        help="the fused_decode.py to compare with (default: the package's)")
    parser.add_argument("--candidate", default=str(PACKAGE_FILE),
                        help="the version under test (default: the package's)")
    parser.add_argument("--config", action="append", help="preset(s) (default 125m and 1b)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="baseline/candidate pairs")
    parser.add_argument("--plan", action="append", default=[], metavar="FIELD=VALUE",
                        help="a Plan field for both versions (as in check_fused_decode.py)")
    parser.add_argument("--candidate-plan", action="append", default=[], metavar="FIELD=VALUE",
                        help="a Plan field for the candidate only, e.g. lookahead=qkv,o_proj")
    args = parser.parse_args()
    versions = {"baseline": load_version(args.baseline, "baseline"),
                "candidate": load_version(args.candidate, "candidate")}
    if args.baseline == args.candidate and not args.candidate_plan:
        raise SystemExit("the baseline and the candidate are the same code with the same plan: "
                         "give --baseline FILE, --candidate FILE or --candidate-plan FIELD=VALUE")
    common = dict(parse_field(item) for item in args.plan)
    plans = {"baseline": common,
             "candidate": {**common, **dict(parse_field(item) for item in args.candidate_plan)}}
    print(json.dumps({"device": jax.devices()[0].device_kind, "baseline": args.baseline,
                      "candidate": args.candidate, "plans": plans}), flush=True)
    bandwidth = copy_bandwidth(1 << 30)
    print(json.dumps({"copy_bandwidth_GBps": round(bandwidth / 1e9, 1)}), flush=True)
    for name in args.config or ["125m", "1b"]:
        for round_ in range(args.rounds):
            for label, module in versions.items():
                seconds, step_bytes = step_time(module, name, args.steps, args.repeats,
                                                plans[label])
                print(json.dumps({"config": name, "round": round_, "version": label,
                                  "step_us": round(seconds * 1e6, 1),
                                  "roofline_fraction": round(step_bytes / bandwidth / seconds, 3)}),
                      flush=True)


if __name__ == "__main__":
    main()
