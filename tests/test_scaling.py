"""Scaling-law fits on synthetic runs drawn from a known L(N, D), bootstrap coverage, bad input.

The truth is Chinchilla's published fit (Hoffmann et al. 2022, eq. 10): E = 1.69, A = 406.4,
B = 410.7, alpha = 0.34, beta = 0.28; its compute-optimal exponent is a = beta / (alpha + beta)
and N_opt(C) = G (C/6)^a in closed form (parametric.py's docstring), the oracle for both fits.
"""

import json
import os

import numpy as np
import pytest

from jaxlm.scaling import ScalingError, bootstrap, isoflop_fit, load_runs, parametric_fit
from jaxlm.scaling.cli import main as scaling_main
from jaxlm.scaling.isoflop import fit_parabola

TRUTH = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
A_TRUE = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
G_TRUE = (TRUTH["alpha"] * TRUTH["A"] / (TRUTH["beta"] * TRUTH["B"])) ** (1 / (TRUTH["alpha"] + TRUTH["beta"]))
SHARED_RUNS = os.path.join(os.path.dirname(__file__), "..", "docs", "data", "isoflops_curves.json")


def true_loss(n, d):
    return TRUTH["E"] + TRUTH["A"] * n ** -TRUTH["alpha"] + TRUTH["B"] * d ** -TRUTH["beta"]


def true_n_opt(compute):
    return G_TRUE * (compute / 6) ** A_TRUE


def synthetic_runs(rng, noise, budgets=np.logspace(18, 21, 5), sizes=7, spread_decades=1.0):
    """IsoFLOP runs around each budget's true optimum, loss times exp(noise * normal)."""
    runs = []
    for compute in budgets:
        for n in true_n_opt(compute) * np.logspace(-spread_decades, spread_decades, sizes):
            loss = true_loss(n, compute / (6 * n)) * np.exp(noise * rng.standard_normal())
            runs.append({"parameters": n, "compute_budget": compute, "final_loss": loss})
    return runs


def test_fit_parabola_finds_the_vertex_of_an_exact_parabola():
    x = np.array([-1.3, 0.2, 0.9, 2.5, 3.1])
    p0, p1, p2 = fit_parabola(x, 0.7 * (x - 1.1) ** 2 + 2.0, "test")
    assert -p1 / (2 * p2) == pytest.approx(1.1, abs=1e-9)
    assert p2 == pytest.approx(0.7, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_isoflop_fit_recovers_the_exponent_within_0_02(seed):
    fit = isoflop_fit(synthetic_runs(np.random.default_rng(seed), noise=0.005))
    assert abs(fit.a - A_TRUE) < 0.02
    # Without per-run tokens D_opt = C / (6 N_opt), so the exponents add up to 1 exactly.
    assert fit.a + fit.b == pytest.approx(1.0, abs=1e-9)
    compute = np.array([1e19, 1e22])
    np.testing.assert_allclose(fit.n_opt(compute) * fit.d_opt(compute) * 6, compute, rtol=1e-9)


def test_isoflop_fit_uses_token_counts_when_given():
    rng = np.random.default_rng(3)
    runs = synthetic_runs(rng, noise=0.0)
    for run in runs:
        run["tokens"] = run["compute_budget"] / (6 * run["parameters"])
    fit = isoflop_fit(runs)
    assert abs(fit.b - (1 - A_TRUE)) < 0.02
    for minimum in fit.minima:
        assert minimum.inside
        # On the exact law, the vertex of the D parabola sits where that of the N parabola does.
        assert minimum.n_opt * minimum.d_opt * 6 == pytest.approx(minimum.compute, rel=0.02)


@pytest.mark.parametrize("seed", [0, 1])
def test_parametric_fit_recovers_the_law(seed):
    fit = parametric_fit(synthetic_runs(np.random.default_rng(seed), noise=0.005))
    assert abs(fit.E - TRUTH["E"]) < 0.05
    assert abs(fit.alpha - TRUTH["alpha"]) < 0.03 and abs(fit.beta - TRUTH["beta"]) < 0.03
    assert 1 / 1.5 < fit.A / TRUTH["A"] < 1.5 and 1 / 1.5 < fit.B / TRUTH["B"] < 1.5
    assert abs(fit.a - A_TRUE) < 0.02


def test_parametric_fit_is_exact_on_noiseless_runs_with_free_token_counts():
    rng = np.random.default_rng(4)
    n = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 40))
    d = np.exp(rng.uniform(np.log(1e8), np.log(1e11), 40))
    runs = [{"parameters": a, "tokens": b, "compute_budget": 6 * a * b, "final_loss": true_loss(a, b)}
            for a, b in zip(n, d)]
    fit = parametric_fit(runs)
    for name, value in TRUTH.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-3), name
    np.testing.assert_allclose(fit.loss(n, d), true_loss(n, d), rtol=1e-6)
    compute = 1e23
    assert fit.n_opt(compute) == pytest.approx(true_n_opt(compute), rel=1e-2)
    # The allocation minimizes the fitted loss along C = 6 N D (a brute-force check).
    grid = true_n_opt(compute) * np.logspace(-1, 1, 2001)
    best = grid[np.argmin(fit.loss(grid, compute / (6 * grid)))]
    assert fit.n_opt(compute) == pytest.approx(best, rel=2e-3)


def test_isoflop_bootstrap_intervals_cover_the_truth_in_most_trials():
    """20 trials of fresh noisy runs; 90% intervals for a and N_opt(1e23) (an extrapolation of
    two decades). Measured: both covered in 20 of 20 trials; we require 16."""
    rng = np.random.default_rng(5)
    covered_a = covered_n = 0
    for trial in range(20):
        result = bootstrap(synthetic_runs(rng, noise=0.005), "isoflop", num_samples=60, seed=trial)
        interval = result.interval(lambda fit: fit.a)
        covered_a += interval.covers(A_TRUE)
        assert interval.low < interval.estimate < interval.high
        covered_n += result.interval(lambda fit: fit.n_opt(1e23)).covers(true_n_opt(1e23))
    assert covered_a >= 16 and covered_n >= 16


def test_parametric_bootstrap_interval_contains_the_truth():
    runs = synthetic_runs(np.random.default_rng(6), noise=0.005, budgets=np.logspace(18, 21, 4), sizes=5)
    result = bootstrap(runs, "parametric", num_samples=12, seed=0)
    predictions = result.predictions([1e23])
    interval = predictions["budgets"]["1e+23"]["n_opt"]
    assert interval["low"] <= interval["estimate"] <= interval["high"]
    assert interval["low"] / 1.5 < true_n_opt(1e23) < interval["high"] * 1.5
    assert len(result.samples) == 12


def _runs_at(budget_sizes):
    return [{"parameters": n, "compute_budget": c, "final_loss": 3.0 + (np.log(n) - 10) ** 2 / 100}
            for c, sizes in budget_sizes.items() for n in sizes]


@pytest.mark.parametrize("runs, message", [
    (_runs_at({1e18: [1e8, 2e8], 1e19: [1e8, 2e8, 4e8]}), "at least 3 runs of different sizes"),
    (_runs_at({1e18: [1e8, 2e8, 4e8]}), "at least 2 budgets"),
    ([{"parameters": 0, "compute_budget": 1e18, "final_loss": 3.0}], "parameters=0 must be finite and positive"),
    ([{"parameters": 1e8, "compute_budget": -1.0, "final_loss": 3.0}], "compute_budget=-1.0"),
    ([{"parameters": 1e8, "compute_budget": 1e18, "final_loss": float("nan")}], "final_loss=nan"),
    ([{"parameters": 1e8, "final_loss": 3.0}], "lacks compute_budget"),
    ([], "no runs given"),
])
def test_bad_runs_give_clear_errors(runs, message):
    with pytest.raises(ScalingError, match=message):
        isoflop_fit(runs)


def test_a_profile_without_a_minimum_is_an_error():
    runs = [{"parameters": n, "compute_budget": c, "final_loss": 5.0 - (np.log(n) - 19) ** 2 / 50}
            for c in (1e18, 1e19) for n in (1e8, 2e8, 4e8, 8e8)]
    with pytest.raises(ScalingError, match="no minimum"):
        isoflop_fit(runs)
    with pytest.raises(ScalingError, match="at least 6"):
        parametric_fit(runs[:5])
    with pytest.raises(ScalingError, match="unknown method"):
        bootstrap(runs, "approach4")


def test_load_runs_reads_json_jsonl_and_sweep_folders(tmp_path):
    runs = synthetic_runs(np.random.default_rng(7), noise=0.0, budgets=[1e18, 1e19], sizes=3)
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert load_runs(str(tmp_path / "runs.json")) == runs
    assert load_runs([str(sweep), str(sweep / "runs.jsonl")]) == runs + runs
    with pytest.raises(ScalingError, match="neither a runs file"):
        load_runs(str(tmp_path))


def test_cli_fit_prints_predictions_with_intervals(tmp_path, capsys):
    code = scaling_main(["fit", "--runs", SHARED_RUNS, "--budgets", "1e23,1e24", "--methods", "isoflop",
                         "--samples", "20", "--plots", str(tmp_path)])
    out = capsys.readouterr().out
    fit = isoflop_fit(load_runs(SHARED_RUNS))
    assert code == 0
    assert f"C = 1e+23: N_opt = {fit.n_opt(1e23):.3g} [" in out
    assert f"a = {fit.a:.3g} [" in out
    report = json.loads((tmp_path / "fit.json").read_text())
    assert report["methods"]["isoflop"]["budgets"]["1e+24"]["d_opt"]["estimate"] == pytest.approx(fit.d_opt(1e24))
    assert sorted(os.listdir(tmp_path)) == ["fit.json", "isoflop_curves.png", "optimal_allocation.png"]
    assert scaling_main(["fit", "--runs", SHARED_RUNS, "--budgets", "1e23,-5"]) == 2
    assert "must be positive" in capsys.readouterr().err
