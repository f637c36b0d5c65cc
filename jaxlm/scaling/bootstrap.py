"""Bootstrap confidence intervals for the scaling fits' predictions and exponents.

    result = bootstrap(runs, "isoflop", num_samples=200, confidence=0.9, seed=0)
    result.interval(lambda fit: fit.n_opt(1e23))      # Interval(estimate, low, high)
    result.predictions([1e23, 1e24])                  # n_opt, d_opt per budget, a and b

Resampling is stratified by compute budget: each sample draws, within every budget, as many runs
as it has, with replacement, so every sample keeps the sweep's design (the same budgets, runs
per budget). Each sample is refitted; intervals are percentile intervals of the refitted
quantity (Efron & Tibshirani 1993, ch. 13), the estimate is the full-data fit's. A resample
the fit rejects (fewer than 3 distinct sizes at a budget, a parabola without a minimum) is
drawn again; `redrawn` counts them. Parametric refits start L-BFGS from the full-data fit only
(not from the grid, see parametric.py), which keeps hundreds of refits cheap.

NOTE: the bootstrap sees the scatter of the runs around the fit, not a bias of the model
(a parabola that is not the true profile shape, a power law that bends). Intervals for budgets
far beyond the runs are intervals for the extrapolated power law.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence, Union

import numpy as np
from tqdm import tqdm

from jaxlm.scaling.isoflop import IsoFlopFit, isoflop_fit
from jaxlm.scaling.parametric import ParametricFit, parametric_fit
from jaxlm.scaling.runs import RunTable, ScalingError, to_table

METHODS = ("isoflop", "parametric")
Fit = Union[IsoFlopFit, ParametricFit]


@dataclasses.dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """The full-data fit, the refitted samples and the confidence level of the intervals."""

    method: str
    fit: Fit
    samples: tuple
    confidence: float
    redrawn: int

    def interval(self, quantity: Callable[[Fit], float]) -> Interval:
        values = np.array([float(quantity(sample)) for sample in self.samples])
        tail = 100 * (1 - self.confidence) / 2
        low, high = np.percentile(values, [tail, 100 - tail])
        return Interval(float(quantity(self.fit)), float(low), float(high))

    def predictions(self, budgets: Sequence[float]) -> dict:
        """{"a", "b": Interval, "budgets": {C: {"n_opt", "d_opt": Interval}}}, JSON-ready."""
        out = {"method": self.method, "confidence": self.confidence, "num_samples": len(self.samples),
               "a": self.interval(lambda f: f.a).as_dict(), "b": self.interval(lambda f: f.b).as_dict()}
        out["budgets"] = {f"{c:.3g}": {"n_opt": self.interval(lambda f: f.n_opt(c)).as_dict(),
                                       "d_opt": self.interval(lambda f: f.d_opt(c)).as_dict()}
                          for c in budgets}
        return out


def stratified_indices(table: RunTable, rng: np.random.Generator) -> np.ndarray:
    """Row indices drawn with replacement within each compute budget."""
    parts = [rng.choice(np.flatnonzero(table.compute == c), size=int(np.sum(table.compute == c)))
             for c in table.budgets()]
    return np.concatenate(parts)


def _fitter(method: str, fit: Fit) -> Callable[[RunTable], Fit]:
    if method == "isoflop":
        return isoflop_fit
    return lambda table: parametric_fit(table, starts=0, initial=fit)


def bootstrap(runs, method: str = "isoflop", num_samples: int = 200, confidence: float = 0.9,
              seed: int = 0, progress: bool = False) -> BootstrapResult:
    """Refit `num_samples` stratified resamples of `runs` with approach 2 or 3 (`method`)."""
    if method not in METHODS:
        raise ScalingError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if num_samples < 10 or not 0 < confidence < 1:
        raise ScalingError(f"num_samples={num_samples} must be >= 10 and confidence={confidence} in (0, 1)")
    table = to_table(runs)
    fit = isoflop_fit(table) if method == "isoflop" else parametric_fit(table)
    refit = _fitter(method, fit)
    rng = np.random.default_rng(seed)
    samples, redrawn = [], 0
    with tqdm(total=num_samples, desc=f"bootstrap {method}", disable=not progress) as bar:
        while len(samples) < num_samples:
            try:
                samples.append(refit(table.take(stratified_indices(table, rng))))
                bar.update(1)
            except ScalingError:
                redrawn += 1
                if redrawn > 10 * num_samples:
                    raise ScalingError("almost every resample was rejected by the fit; add runs per "
                                       "budget (5 or more) spanning both sides of the best size") from None
    return BootstrapResult(method, fit, tuple(samples), confidence, redrawn)
