"""PNG plots of the scaling fits (matplotlib, an optional dependency: `pip install jaxlm[plot]`).

- `plot_isoflop_curves`: final loss against N at each budget, with the fitted parabolas and their
  vertices (approach 2).
- `plot_optimal_allocation`: N_opt and D_opt against C: the per-budget vertices, each approach's
  power law extended to the target budgets, and its bootstrap band (the central `confidence`
  share of the refitted samples at every C).
- `plot_parametric_contours`: approach 3's L(N, D) as contours over (N, D), IsoFLOP lines
  C = 6 N D, the compute-optimal frontier and the runs.
Every function writes one PNG and returns its path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jaxlm.scaling.bootstrap import BootstrapResult
from jaxlm.scaling.isoflop import IsoFlopFit
from jaxlm.scaling.parametric import ParametricFit
from jaxlm.scaling.runs import RunTable, to_table


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install jaxlm[plot]") from None
    return plt


def _save(plt, figure, path: str) -> str:
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_isoflop_curves(runs, fit: Optional[IsoFlopFit], path: str) -> str:
    """The runs' losses per budget; with a fit also its parabolas and vertices."""
    plt = _pyplot()
    table = to_table(runs)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    budgets = table.budgets()
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    for compute, color in zip(budgets, colors):
        rows = table.compute == compute
        order = np.argsort(table.parameters[rows])
        axes.plot(table.parameters[rows][order], table.loss[rows][order], color=color, marker="o", ms=4,
                  lw=0.5 if fit else 1, label=f"C = {compute:.0e}")
    for minimum, color in zip(fit.minima if fit else (), colors):
        x = np.log(table.parameters[table.compute == minimum.compute])
        grid = np.linspace(x.min(), x.max(), 100)
        p0, p1, p2 = minimum.coefficients
        axes.plot(np.exp(grid), p0 + p1 * grid + p2 * grid**2, color=color, lw=1)
        axes.scatter([minimum.n_opt], [minimum.loss_opt], color=color, marker="*", s=90, edgecolor="k", lw=0.5)
    axes.set_xscale("log")
    axes.set_xlabel("parameters N")
    axes.set_ylabel("final loss")
    axes.set_title("IsoFLOP profiles: parabolas in ln N, vertices starred" if fit else "IsoFLOP profiles (no fit)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    return _save(plt, figure, path)


def _band(result: BootstrapResult, quantity: str, compute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([getattr(sample, quantity)(compute) for sample in result.samples])
    tail = 100 * (1 - result.confidence) / 2
    return np.percentile(values, tail, axis=0), np.percentile(values, 100 - tail, axis=0)


def plot_optimal_allocation(isoflop: BootstrapResult, path: str, targets: Sequence[float] = (),
                            parametric: Optional[BootstrapResult] = None) -> str:
    """N_opt(C) and D_opt(C) of approach 2 (and approach 3 when given) with bootstrap bands."""
    plt = _pyplot()
    minima = isoflop.fit.minima
    low = min(m.compute for m in minima) / 2
    high = max([m.compute for m in minima] + list(targets)) * 2
    compute = np.logspace(np.log10(low), np.log10(high), 60)
    figure, panels = plt.subplots(1, 2, figsize=(12, 4.5))
    for axes, quantity, label in zip(panels, ("n_opt", "d_opt"), ("parameters N_opt", "tokens D_opt")):
        axes.scatter([m.compute for m in minima], [getattr(m, quantity) for m in minima], color="k",
                     s=16, zorder=3, label="IsoFLOP vertices")
        for result, color, name in ((isoflop, "C0", "approach 2"), (parametric, "C3", "approach 3")):
            if result is None:
                continue
            exponent = result.fit.a if quantity == "n_opt" else result.fit.b
            axes.plot(compute, getattr(result.fit, quantity)(compute), color=color,
                      label=f"{name}: exponent {exponent:.3f}")
            axes.fill_between(compute, *_band(result, quantity, compute), color=color, alpha=0.2,
                              label=f"{name}: {result.confidence:.0%} bootstrap band")
        for target in targets:
            axes.axvline(target, color="gray", ls=":", lw=1)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("compute C (FLOPs)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=7)
    figure.suptitle("Compute-optimal allocation (dotted: target budgets)")
    return _save(plt, figure, path)


def plot_parametric_contours(runs, fit: ParametricFit, path: str, targets: Sequence[float] = ()) -> str:
    plt = _pyplot()
    table: RunTable = to_table(runs)
    compute_high = max([table.compute.max()] + list(targets))
    n_range = np.logspace(np.log10(table.parameters.min() / 3), np.log10(fit.n_opt(compute_high) * 3), 120)
    d_range = np.logspace(np.log10(table.tokens.min() / 3), np.log10(fit.d_opt(compute_high) * 3), 120)
    n_grid, d_grid = np.meshgrid(n_range, d_range)
    figure, axes = plt.subplots(figsize=(7, 5.5))
    levels = np.quantile(fit.loss(n_grid, d_grid), np.linspace(0.02, 0.9, 14))
    contour = axes.contour(n_grid, d_grid, fit.loss(n_grid, d_grid), levels=np.unique(levels),
                           cmap="viridis", linewidths=0.8)
    axes.clabel(contour, fontsize=6, fmt="%.2f")
    for compute in np.unique(np.concatenate([table.budgets(), list(targets)])):
        axes.plot(n_range, compute / (6 * n_range), color="gray", lw=0.5, ls="--")
    frontier = np.logspace(np.log10(table.compute.min()), np.log10(compute_high), 50)
    axes.plot(fit.n_opt(frontier), fit.d_opt(frontier), color="C3", lw=2, label="compute-optimal N, D")
    axes.scatter(table.parameters, table.tokens, c=np.log10(table.compute), s=10, cmap="plasma", label="runs")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(n_range[0], n_range[-1])
    axes.set_ylim(d_range[0], d_range[-1])
    axes.set_xlabel("parameters N")
    axes.set_ylabel("tokens D")
    axes.set_title(f"L = {fit.E:.3f} + {fit.A:.4g}/N^{fit.alpha:.3f} + {fit.B:.4g}/D^{fit.beta:.3f}"
                   "\n(dashed: C = 6ND at the run budgets and targets)", fontsize=9)
    axes.legend(fontsize=7)
    return _save(plt, figure, path)
