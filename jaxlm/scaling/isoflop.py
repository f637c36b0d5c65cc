"""Chinchilla approach 2: IsoFLOP profiles (Hoffmann et al. 2022, sec. 3.2).

    fit = isoflop_fit(runs)
    fit.n_opt(1e23), fit.d_opt(1e23), fit.a, fit.b

For each compute budget C, the final losses of runs of different sizes at that budget are fitted
with a parabola in x = ln N, loss = p0 + p1 x + p2 x^2; its vertex x* = -p1 / (2 p2) is that
budget's loss-optimal size N*(C). With per-run token counts a second parabola in ln D gives
D*(C); without them D*(C) = C / (6 N*(C)). Then two power laws are fitted by least squares in
log-log space: N_opt(C) = k_n C^a and D_opt(C) = k_d C^b.

Conventions: logs are natural; a budget needs runs of at least 3 distinct sizes and a parabola
that opens upwards (p2 > 0), and the fit needs at least 2 budgets. NOTE: a vertex outside the
sizes tried is an extrapolation; `BudgetMinimum.inside` says whether it fell inside.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlm.scaling.runs import RunTable, ScalingError, to_table

MIN_SIZES_PER_BUDGET = 3


@dataclasses.dataclass(frozen=True)
class BudgetMinimum:
    """One IsoFLOP profile: its parabola (coefficients p0, p1, p2 in ln N) and its vertex."""

    compute: float
    n_opt: float
    d_opt: float
    loss_opt: float
    coefficients: tuple[float, float, float]
    inside: bool  # the vertex lies within the sizes tried


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
    """Power laws N_opt = k_n C^a and D_opt = k_d C^b through the per-budget minima."""

    a: float
    b: float
    log_k_n: float
    log_k_d: float
    minima: tuple[BudgetMinimum, ...]

    def n_opt(self, compute):
        return np.exp(self.log_k_n) * np.asarray(compute, np.float64) ** self.a

    def d_opt(self, compute):
        return np.exp(self.log_k_d) * np.asarray(compute, np.float64) ** self.b


def fit_parabola(x: np.ndarray, y: np.ndarray, where: str) -> tuple[float, float, float]:
    """(p0, p1, p2) of y = p0 + p1 x + p2 x^2 by least squares; p2 must be positive."""
    if len(np.unique(x)) < MIN_SIZES_PER_BUDGET:
        raise ScalingError(f"{where}: {len(np.unique(x))} distinct sizes; a parabola needs at least "
                           f"{MIN_SIZES_PER_BUDGET} runs of different sizes per compute budget")
    p2, p1, p0 = np.polyfit(x, y, 2)
    if not p2 > 0:
        raise ScalingError(f"{where}: the loss has no minimum over the sizes tried (the parabola opens "
                           "downwards); add runs on both sides of the best size")
    return float(p0), float(p1), float(p2)


def _vertex(x: np.ndarray, y: np.ndarray, where: str) -> tuple[float, float, tuple, bool]:
    coefficients = fit_parabola(x, y, where)
    p0, p1, p2 = coefficients
    vertex = -p1 / (2 * p2)
    return vertex, p0 + p1 * vertex + p2 * vertex**2, coefficients, bool(x.min() <= vertex <= x.max())


def budget_minima(table: RunTable) -> list[BudgetMinimum]:
    """The vertex of every budget's parabola, budgets ascending."""
    minima = []
    for compute in table.budgets():
        rows = table.compute == compute
        where = f"compute budget {compute:.3g}"
        log_n, loss_opt, coefficients, inside = _vertex(np.log(table.parameters[rows]), table.loss[rows], where)
        if table.has_tokens:
            log_d = _vertex(np.log(table.tokens[rows]), table.loss[rows], where)[0]
        else:
            log_d = np.log(compute / 6) - log_n
        minima.append(BudgetMinimum(float(compute), float(np.exp(log_n)), float(np.exp(log_d)),
                                    float(loss_opt), coefficients, inside))
    return minima


def fit_power_law(compute: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(exponent, ln k) of values = k C^exponent by least squares on logs."""
    exponent, log_k = np.polyfit(np.log(compute), np.log(values), 1)
    return float(exponent), float(log_k)


def isoflop_fit(runs) -> IsoFlopFit:
    """Approach 2 on run dicts (or a RunTable); see the module docstring."""
    table = to_table(runs)
    if len(table.budgets()) < 2:
        raise ScalingError(f"runs at {len(table.budgets())} compute budget(s); a power law in C needs "
                           "at least 2 budgets (3 or more for a meaningful one)")
    minima = budget_minima(table)
    compute = np.array([m.compute for m in minima])
    a, log_k_n = fit_power_law(compute, np.array([m.n_opt for m in minima]))
    b, log_k_d = fit_power_law(compute, np.array([m.d_opt for m in minima]))
    return IsoFlopFit(a, b, log_k_n, log_k_d, tuple(minima))
