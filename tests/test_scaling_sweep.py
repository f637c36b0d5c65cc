"""The IsoFLOP sweep planner hits its budgets; the sweep records runs and resumes."""

import json

import numpy as np
import pytest

from jaxlm import accounting
from jaxlm.config import load_config
from jaxlm.scaling import ScalingError, load_runs
from jaxlm.scaling import sweep

BUDGETS = [1e12, 3e12, 1e13]


def test_planned_runs_hit_their_budgets_within_5_percent():
    base = load_config("tiny")
    plans = sweep.plan_sweep(base, BUDGETS, sizes_per_budget=5, size_spread=16)
    assert len(plans) == 15
    for plan in plans:
        # Rebuild the run's config the way the training CLI will, from the plan's overrides.
        cfg = load_config("tiny", plan.overrides(base.model.resolved_head_dim, base.train.warmup_steps))
        per_token = 6 * accounting.matmul_params(cfg.model) + accounting.attention_flops_per_token(
            cfg.model, cfg.train.seq_len)
        flops = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len * per_token
        assert abs(flops / plan.compute_budget - 1) <= 0.05, plan
        assert cfg.model.embed_dim == cfg.model.num_heads * cfg.model.resolved_head_dim
        assert cfg.train.eval_every == cfg.train.steps == plan.steps
    for budget in BUDGETS:
        sizes = [p.parameters for p in plans if p.compute_budget == budget]
        assert sizes == sorted(set(sizes)) and len(sizes) == 5
        # The sizes straddle sqrt(C / 120), the 20-tokens-per-parameter size.
        center = np.sqrt(budget / 120)
        assert sizes[0] < center < sizes[-1]


def test_planner_rejects_budgets_too_small_for_the_batch():
    with pytest.raises(ScalingError, match="raise the budget"):
        sweep.plan_sweep(load_config("tiny"), [1e9, 1e10])
    with pytest.raises(ScalingError, match="at least 3"):
        sweep.plan_sweep(load_config("tiny"), BUDGETS, sizes_per_budget=2)


def test_run_sweep_records_final_losses_and_skips_finished_runs(tmp_path, monkeypatch):
    """The training CLI replaced by a stub that writes metrics.jsonl like it does."""
    from jaxlm import train

    base = load_config("tiny")
    plans = sweep.plan_sweep(base, [1e12, 3e12], sizes_per_budget=3, size_spread=4)
    calls = []

    def fake_main(argv):
        run_dir = argv[argv.index("--run-dir") + 1]
        steps = int(next(a for a in argv if a.startswith("--train.steps=")).split("=")[1])
        calls.append(run_dir)
        import os
        os.makedirs(run_dir, exist_ok=True)
        with open(f"{run_dir}/metrics.jsonl", "w") as file:
            file.write(json.dumps({"step": steps - 1, "loss": 4.0}) + "\n")
            file.write(json.dumps({"step": steps, "loss": 3.5, "eval_loss": 1000.0 / steps}) + "\n")
        return 0

    monkeypatch.setattr(train, "main", fake_main)
    runs = sweep.run_sweep(plans[:4], str(tmp_path), "tiny", base)
    assert len(calls) == 4 and [r["name"] for r in runs] == [p.name for p in plans[:4]]
    assert runs[0]["final_loss"] == pytest.approx(1000.0 / plans[0].steps)
    assert runs[0]["train_loss"] == 3.5 and runs[0]["tokens"] == plans[0].tokens
    runs = sweep.run_sweep(plans, str(tmp_path), "tiny", base)  # resumes: only the 2 new runs
    assert len(calls) == 6 and len(runs) == 6
    assert load_runs(str(tmp_path)) == runs
