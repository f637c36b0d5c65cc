"""Command line of jaxlm.scaling: `fit` runs, or `sweep` (plan, train, fit).

    python -m jaxlm.scaling fit --runs isoflops_curves.json --budgets 1e23,1e24 --plots out/
    python -m jaxlm.scaling sweep --config tiny --budgets 1e13,3e13,1e14 --sizes-per-budget 5 \\
        --out sweeps/tiny --predict 1e15,1e16 [--train.batch_size=32 ...]

`fit` prints, for approach 2 (IsoFLOP parabolas) and approach 3 (parametric L(N, D)), the
exponents of N_opt and D_opt and their values at each budget, each with a bootstrap interval,
and writes `fit.json` and the PNGs when --plots is given. `sweep` plans shapes, trains what
runs.jsonl in --out lacks (resumable), then fits into the same folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from jaxlm.config import ConfigError
from jaxlm.scaling import plots
from jaxlm.scaling.bootstrap import METHODS, bootstrap
from jaxlm.scaling.parametric import ParametricFit
from jaxlm.scaling.runs import ScalingError, load_runs, to_table
from jaxlm.scaling.sweep import plan_sweep, run_sweep


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ScalingError(f"budgets {text!r} must be comma-separated numbers, e.g. 1e23,1e24") from None
    if not budgets or min(budgets) <= 0:
        raise ScalingError(f"budgets {text!r} must be positive FLOP counts, e.g. 1e23,1e24")
    return budgets


def _format(interval: dict, digits: int = 3) -> str:
    return f"{interval['estimate']:.{digits}g} [{interval['low']:.{digits}g}, {interval['high']:.{digits}g}]"


def format_report(report: dict) -> str:
    lines = [f"{method} fit failed: {error}" for method, error in report.get("errors", {}).items()]
    for method, result in report["methods"].items():
        title = "approach 2, IsoFLOP parabolas" if method == "isoflop" else "approach 3, parametric L(N, D)"
        lines.append(f"{title} ({result['confidence']:.0%} intervals, {result['num_samples']} bootstrap samples)")
        if "law" in result:
            law = result["law"]
            lines.append(f"  L(N, D) = {law['E']:.4g} + {law['A']:.4g} / N^{law['alpha']:.4g} + "
                         f"{law['B']:.4g} / D^{law['beta']:.4g}")
        lines.append(f"  N_opt ~ C^a, a = {_format(result['a'])};  D_opt ~ C^b, b = {_format(result['b'])}")
        for budget, values in result["budgets"].items():
            lines.append(f"  C = {budget}: N_opt = {_format(values['n_opt'])}, D_opt = {_format(values['d_opt'])}")
    return "\n".join(lines)


def fit_report(runs, budgets: Sequence[float], methods: Sequence[str] = METHODS, num_samples: int = 200,
               confidence: float = 0.9, seed: int = 0, plots_dir: Optional[str] = None) -> dict:
    """Fits, bootstrap intervals at `budgets` and (with `plots_dir`) fit.json and the PNGs."""
    table = to_table(runs)
    report = {"num_runs": len(table), "budgets_of_runs": [float(c) for c in table.budgets()], "methods": {},
              "errors": {}}
    results = {}
    for method in methods:
        try:
            results[method] = bootstrap(table, method, num_samples, confidence, seed, progress=True)
        except ScalingError as error:  # one approach failing must not hide the other
            report["errors"][method] = str(error)
    if not results:
        raise ScalingError("; ".join(f"{method}: {error}" for method, error in report["errors"].items()))
    for method, result in results.items():
        report["methods"][method] = result.predictions(budgets)
        if isinstance(result.fit, ParametricFit):
            fit = result.fit
            report["methods"][method]["law"] = {"E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha,
                                                "beta": fit.beta}
    if plots_dir is not None:
        os.makedirs(plots_dir, exist_ok=True)
        report["plots"] = write_plots(table, results, budgets, plots_dir)
        with open(os.path.join(plots_dir, "fit.json"), "w", encoding="utf-8") as file:
            json.dump(report, file, indent=1)
    return report


def write_plots(table, results: dict, budgets: Sequence[float], out_dir: str) -> list[str]:
    paths = [plots.plot_isoflop_curves(table, results["isoflop"].fit if "isoflop" in results else None,
                                       os.path.join(out_dir, "isoflop_curves.png"))]
    if "isoflop" in results:
        paths.append(plots.plot_optimal_allocation(results["isoflop"], os.path.join(out_dir, "optimal_allocation.png"),
                                                   budgets, results.get("parametric")))
    if "parametric" in results:
        paths.append(plots.plot_parametric_contours(table, results["parametric"].fit,
                                                    os.path.join(out_dir, "parametric_contours.png"), budgets))
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.scaling", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="fit runs and predict compute-optimal N and D")
    fit.add_argument("--runs", nargs="+", required=True, metavar="FILE_OR_DIR",
                     help=".json/.jsonl run lists, sweep folders or training run folders")
    fit.add_argument("--budgets", default="1e23,1e24", help="FLOP budgets to predict for (default 1e23,1e24)")
    sweep = commands.add_parser("sweep", help="plan, train and fit an IsoFLOP sweep (extra "
                                "--model.KEY=V / --train.KEY=V go to every run)")
    sweep.add_argument("--budgets", required=True, help="FLOP budgets of the sweep, e.g. 1e13,3e13,1e14")
    sweep.add_argument("--sizes-per-budget", type=int, default=5, help="model sizes per budget (default 5)")
    sweep.add_argument("--size-spread", type=float, default=16.0,
                       help="largest / smallest N at a budget (default 16)")
    sweep.add_argument("--aspect-ratio", type=float, default=32.0, help="width / depth (default 32)")
    sweep.add_argument("--config", default="tiny", help="base preset (default tiny)")
    sweep.add_argument("--out", required=True, help="folder for runs.jsonl, the run folders and the fit")
    sweep.add_argument("--predict", default=None, help="FLOP budgets to predict for (default 10x and 100x "
                       "the largest sweep budget)")
    sweep.add_argument("--data", nargs="*", default=[], help="training data (default: the built-in corpus)")
    sweep.add_argument("--cache-dir", default=None, help="tokenizer and data cache of the training CLI")
    sweep.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    for command in (fit, sweep):
        command.add_argument("--methods", default="isoflop,parametric", help="isoflop and/or parametric")
        command.add_argument("--samples", type=int, default=200, help="bootstrap samples (default 200)")
        command.add_argument("--confidence", type=float, default=0.9, help="interval level (default 0.9)")
        command.add_argument("--seed", type=int, default=0, help="bootstrap seed")
        command.add_argument("--plots", default=None, help="folder for the PNGs and fit.json (sweep: --out)")
    return parser


def _methods(text: str) -> list[str]:
    methods = [m for m in text.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ScalingError(f"--methods {text!r}: choose from {', '.join(METHODS)}")
    return methods


def run_fit(args: argparse.Namespace) -> int:
    report = fit_report(load_runs(args.runs), parse_budgets(args.budgets), _methods(args.methods),
                        args.samples, args.confidence, args.seed, args.plots)
    print(format_report(report))
    return 0


def run_sweep_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxlm.config import load_config

    base = load_config(args.config, overrides)
    budgets = parse_budgets(args.budgets)
    plans = plan_sweep(base, budgets, args.sizes_per_budget, args.size_spread, args.aspect_ratio)
    for plan in plans:
        print(f"{plan.name}: N={plan.parameters} (w={plan.embed_dim}, L={plan.num_layers}), "
              f"{plan.steps} steps, D={plan.tokens}, FLOPs {plan.flops:.4g} ({plan.flops / plan.compute_budget - 1:+.1%})")
    if args.dry_run:
        return 0
    runs = run_sweep(plans, args.out, args.config, base, overrides, args.data, args.cache_dir)
    predict = parse_budgets(args.predict) if args.predict else [10 * max(budgets), 100 * max(budgets)]
    report = fit_report(runs, predict, _methods(args.methods), args.samples, args.confidence, args.seed,
                        args.plots or args.out)
    print(format_report(report))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    try:
        if args.command == "fit":
            if overrides:
                raise ScalingError(f"unrecognized arguments {overrides}; see --help")
            return run_fit(args)
        return run_sweep_command(args, overrides)
    except (ScalingError, ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
