"""Two versions of the Pallas batch-1 decode step (pallas_kernels/fused_decode.py) timed in one
process, one launch each, interleaved: a change to the kernel against the code before it, or a
Plan option against the default, on the same card and with the same copy bandwidth (processes
differ by a few percent).

    mkdir /tmp/before && git archive HEAD~1 pallas_kernels | tar -x -C /tmp/before
    python tools/bench_fused_decode_ab.py --baseline /tmp/before/pallas_kernels --config 1b
    python tools/bench_fused_decode_ab.py --config 1b --candidate-plan lookahead=qkv,o_proj

A version is a directory holding fused_decode.py and the fused_decode_kernel.py it imports
(its own copy of both is loaded), or a single fused_decode.py from before the kernel had a
file of its own. Each round times the baseline (default the package's), then the candidate
(the package's or `--candidate`, with `--candidate-plan` fields on top): a
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

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "pallas_kernels"
KERNEL = "pallas_kernels.fused_decode_kernel"


def _load(file: pathlib.Path, name: str):
    """A file as a module of its own (registered: its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_version(path: str, label: str):
    """A version of the step (module docstring) as modules of its own: its kernel file, if it
    has one, stands in for the package's while its fused_decode.py is imported."""
    where = pathlib.Path(path)
    step = where / "fused_decode.py" if where.is_dir() else where
    if not step.is_file():
        raise SystemExit(f"{label}: {path} is neither fused_decode.py nor a directory with one "
                         "(write one with `git archive REV pallas_kernels | tar -x -C DIR`)")
    kernel = step.with_name("fused_decode_kernel.py")
    saved = sys.modules.get(KERNEL)
    if kernel.is_file():
        sys.modules[KERNEL] = _load(kernel, f"fused_decode_kernel_{label}")
    try:
        return _load(step, f"fused_decode_{label}")
    finally:
        if saved is None:
            sys.modules.pop(KERNEL, None)
        else:
            sys.modules[KERNEL] = saved


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
    parser.add_argument("--baseline", default=str(PACKAGE_DIR),
                        help="the version to compare with: a directory with fused_decode.py "
                             "and fused_decode_kernel.py, or an older single fused_decode.py "
                             "(default: the package's)")
    parser.add_argument("--candidate", default=str(PACKAGE_DIR),
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
