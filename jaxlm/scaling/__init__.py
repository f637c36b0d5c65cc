"""Scaling laws: Chinchilla fits with bootstrap intervals, plots, and IsoFLOP sweeps.

    from jaxlm.scaling import isoflop_fit, parametric_fit, bootstrap, load_runs
    runs = load_runs("isoflops_curves.json")     # [{parameters, compute_budget, final_loss}, ...]
    fit = isoflop_fit(runs);     fit.n_opt(1e23), fit.d_opt(1e23), fit.a, fit.b      (approach 2)
    law = parametric_fit(runs);  law.E, law.A, law.B, law.alpha, law.beta, law.loss(n, d) (approach 3)
    bootstrap(runs, "isoflop").predictions([1e23, 1e24])   # intervals for every prediction

Modules: runs.py (the run format and its sources), isoflop.py (approach 2), parametric.py
(approach 3), bootstrap.py (intervals), plots.py (PNGs), sweep.py (planning and training a sweep
with the training CLI), cli.py (`python -m jaxlm.scaling fit|sweep`). Hoffmann et al. 2022,
"Training Compute-Optimal Large Language Models", is the reference for both approaches.
"""

from jaxlm.scaling.bootstrap import BootstrapResult, Interval, bootstrap
from jaxlm.scaling.isoflop import IsoFlopFit, isoflop_fit
from jaxlm.scaling.parametric import ParametricFit, parametric_fit
from jaxlm.scaling.runs import RunTable, ScalingError, load_runs, to_table

__all__ = ["BootstrapResult", "Interval", "IsoFlopFit", "ParametricFit", "RunTable", "ScalingError",
           "bootstrap", "isoflop_fit", "load_runs", "parametric_fit", "to_table"]
