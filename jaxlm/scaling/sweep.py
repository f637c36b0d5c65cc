"""IsoFLOP sweeps: plan model shapes and token counts per compute budget, train them, record losses.

    plans = plan_sweep(load_config("tiny"), budgets=[1e13, 3e13, 1e14], sizes_per_budget=5)
    run_sweep(plans, "sweeps/tiny", preset="tiny")        # trains with the training CLI

Shapes. Models of one family grow with width w (a multiple of the base head_dim): num_heads =
w / head_dim (as many kv heads), mlp_dim = 8/3 w rounded up to a multiple of 8 (SwiGLU's usual
ratio), num_layers = round(w / aspect_ratio), at least 1. Everything else (vocab, norms, RoPE,
dtypes, batch, sequence length, optimizer) comes from the base config.

Sizes. N is accounting's `matmul_params` (the N of 6N: layer projections + lm head; the
embedding lookup is free). For budget C the targets are `sizes_per_budget` values log-uniform
over a factor `size_spread` centred on sqrt(C / 120), the size that trains on 20 tokens per
parameter (Chinchilla's rule of thumb); each target takes the nearest shape of the family not yet
used at that budget.

Tokens and FLOPs. A run's FLOPs per trained token are accounting's `training_flops_per_token`:
6N plus the causal attention term 6 L T n_heads head_dim (QK^T and AV, forward and backward,
half of the T x T scores). NOTE: at small widths the attention term is not small (it is about
T / (2 w) of the 6N term per layer), so D = C / (6N) would overshoot the budget; the planner uses
D = C / flops_per_token instead, rounded to whole steps of batch_size x seq_len tokens. A plan
needing fewer than `min_steps` steps is an error, so rounding moves the budget by at most
1 / (2 min_steps) (2.5% at the default 20).

Running. Each planned run trains with the training CLI (`jaxlm.train.main`, in this process) in
`<out>/<name>`, evaluating and checkpointing once, at the end. Its final held-out loss goes to
`<out>/runs.jsonl` with N, C, D and the shape. A run already in runs.jsonl is skipped, and an
interrupted run resumes from its checkpoint, so rerunning the same command continues a sweep.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from jaxlm import accounting
from jaxlm.config import Config
from jaxlm.scaling.runs import RUNS_FILE, ScalingError, final_losses, load_runs

TOKENS_PER_PARAMETER = 20.0


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One (budget, shape) of a sweep and the CLI overrides that train it."""

    name: str
    compute_budget: float
    embed_dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    parameters: int
    steps: int
    tokens: int
    flops_per_token: float

    @property
    def flops(self) -> float:
        """The FLOPs this run actually trains with (whole steps)."""
        return self.tokens * self.flops_per_token

    def overrides(self, head_dim: int, warmup_steps: int) -> list[str]:
        # NOTE: overrides apply one at a time and each intermediate config is validated: one kv
        # head first divides any head count.
        return [f"--model.head_dim={head_dim}", "--model.num_kv_heads=1",
                f"--model.num_heads={self.num_heads}", f"--model.num_kv_heads={self.num_heads}",
                f"--model.embed_dim={self.embed_dim}", f"--model.num_layers={self.num_layers}",
                f"--model.mlp_dim={self.mlp_dim}",
                f"--train.steps={self.steps}", f"--train.warmup_steps={min(warmup_steps, self.steps // 5)}",
                f"--train.eval_every={self.steps}", f"--train.checkpoint_every={self.steps}"]


def shape_for_width(base: Config, width: int, aspect_ratio: float) -> Config:
    """The base config with the family's shape at `width` (see the module docstring)."""
    head_dim = base.model.resolved_head_dim
    heads = width // head_dim
    model = dataclasses.replace(
        base.model, embed_dim=width, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        mlp_dim=8 * math.ceil(8 * width / 3 / 8), num_layers=max(1, round(width / aspect_ratio)))
    return dataclasses.replace(base, model=model)


def shape_ladder(base: Config, aspect_ratio: float, max_width_multiple: int = 128) -> list[Config]:
    head_dim = base.model.resolved_head_dim
    return [shape_for_width(base, head_dim * k, aspect_ratio) for k in range(1, max_width_multiple + 1)]


def _plan_one(cfg: Config, compute: float, min_steps: int) -> PlannedRun:
    model, train = cfg.model, cfg.train
    flops_per_token = accounting.training_flops_per_token(model, train.seq_len)
    tokens_per_step = train.batch_size * train.seq_len
    steps = round(compute / (flops_per_token * tokens_per_step))
    parameters = accounting.matmul_params(model)
    if steps < min_steps:
        raise ScalingError(
            f"budget {compute:.3g} trains N={parameters} (width {model.embed_dim}) for only {steps} steps "
            f"of {tokens_per_step} tokens (< {min_steps}); raise the budget, shrink --size-spread or "
            "lower --train.batch_size / --train.seq_len")
    return PlannedRun(f"c{compute:.0e}_w{model.embed_dim}".replace("+", ""), compute, model.embed_dim,
                      model.num_layers, model.num_heads, model.mlp_dim, parameters, steps,
                      steps * tokens_per_step, flops_per_token)


def plan_sweep(base: Config, budgets: Sequence[float], sizes_per_budget: int = 5,
               size_spread: float = 16.0, aspect_ratio: float = 32.0, min_steps: int = 20) -> list[PlannedRun]:
    """Planned runs for every budget, sizes ascending (see the module docstring)."""
    if sizes_per_budget < 3:
        raise ScalingError(f"sizes_per_budget={sizes_per_budget}: a parabola per budget needs at least 3")
    if not budgets or min(budgets) <= 0 or size_spread <= 1:
        raise ScalingError(f"budgets {list(budgets)} must be positive and non-empty, size_spread > 1")
    ladder = shape_ladder(base, aspect_ratio)
    log_sizes = np.log([accounting.matmul_params(cfg.model) for cfg in ladder])
    plans = []
    for compute in sorted(budgets):
        center = math.sqrt(compute / (6 * TOKENS_PER_PARAMETER))
        targets = np.log(center) + np.linspace(-0.5, 0.5, sizes_per_budget) * math.log(size_spread)
        chosen: list[int] = []
        for target in targets:
            order = [i for i in np.argsort(np.abs(log_sizes - target)) if i not in chosen]
            chosen.append(int(order[0]))
        plans += [_plan_one(ladder[i], compute, min_steps) for i in sorted(chosen)]
    return plans


def run_sweep(plans: Sequence[PlannedRun], out_dir: str, preset: str, base: Config,
              overrides: Sequence[str] = (), data: Sequence[str] = (), cache_dir: Optional[str] = None) -> list[dict]:
    """Train every plan not yet in `<out_dir>/runs.jsonl`; returns all recorded runs."""
    from jaxlm import train

    os.makedirs(out_dir, exist_ok=True)
    runs_path = os.path.join(out_dir, RUNS_FILE)
    done = {run["name"] for run in load_runs(runs_path)} if os.path.isfile(runs_path) else set()
    for index, plan in enumerate(plans):
        if plan.name in done:
            continue
        print(f"[sweep {index + 1}/{len(plans)}] {plan.name}: N={plan.parameters}, {plan.steps} steps, "
              f"D={plan.tokens}, C={plan.flops:.3g}", flush=True)
        run_dir = os.path.join(out_dir, plan.name)
        argv = ["--config", preset, "--run-dir", run_dir, "--no-progress", *list(overrides),
                *plan.overrides(base.model.resolved_head_dim, base.train.warmup_steps)]
        argv += ["--data", *data] if data else []
        argv += ["--cache-dir", cache_dir] if cache_dir else []
        if train.main(argv) != 0:
            raise ScalingError(f"training {plan.name} failed (see the error above); fix it and rerun "
                               "the same command to continue the sweep")
        losses = final_losses(run_dir)
        record = {**dataclasses.asdict(plan), "flops": plan.flops, "final_loss": losses["final_loss"],
                  "train_loss": losses["train_loss"], "run_dir": run_dir}
        with open(runs_path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
    return load_runs(runs_path)
