"""Training runs as the scaling fits see them: (N, C, loss[, D]) rows, validated, from any source.

A run is a dict `{"parameters": N, "compute_budget": C, "final_loss": L}` with optional
`"tokens": D` (the format of CS336 assignment 3's isoflops_curves.json). Without tokens the fits
use D = C / (6 N) (Kaplan et al. 2020, sec. 2.1).

Sources `load_runs` reads:
- a `.json` file holding a list of run dicts, or a `.jsonl` file with one run dict per line;
- a sweep directory of `python -m jaxlm.scaling sweep` (its `runs.jsonl`);
- a run directory of the training CLI (`metrics.jsonl` + checkpoints): N = accounting's
  `matmul_params` (the N of 6N), D = steps x batch x seq_len, C = D x accounting's
  `training_flops_per_token` (6N plus causal attention), loss = the last eval loss (else the
  last training loss).

Every value must be finite and positive; a run that is not gives a `ScalingError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterable, Sequence, Union

import numpy as np

RUNS_FILE = "runs.jsonl"
METRICS_FILE = "metrics.jsonl"
REQUIRED_KEYS = ("parameters", "compute_budget", "final_loss")


class ScalingError(ValueError):
    """Runs or budgets a fit cannot use; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class RunTable:
    """Runs as float64 columns; `tokens` is C / (6 N) where a run did not give its D."""

    parameters: np.ndarray
    compute: np.ndarray
    loss: np.ndarray
    tokens: np.ndarray
    has_tokens: bool  # True when every run gave its own token count

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, index: np.ndarray) -> "RunTable":
        """The rows at `index` (bootstrap resampling)."""
        return RunTable(self.parameters[index], self.compute[index], self.loss[index],
                        self.tokens[index], self.has_tokens)

    def budgets(self) -> np.ndarray:
        """The distinct compute budgets, ascending."""
        return np.unique(self.compute)


def _positive(run: dict, key: str, where: str) -> float:
    value = run[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ScalingError(f"{where}: {key}={value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise ScalingError(f"{where}: {key}={value!r} must be finite and positive "
                           "(parameters, compute_budget, tokens and final_loss all are)")
    return number


def to_table(runs: Union[RunTable, Sequence[dict]]) -> RunTable:
    """Validate run dicts into a `RunTable` (a RunTable passes through)."""
    if isinstance(runs, RunTable):
        return runs
    if not runs:
        raise ScalingError("no runs given; pass run dicts {parameters, compute_budget, final_loss}")
    rows = []
    for i, run in enumerate(runs):
        where = f"run {i} ({run!r:.120})"
        if not isinstance(run, dict):
            raise ScalingError(f"{where} is not a dict with keys {', '.join(REQUIRED_KEYS)}")
        missing = [key for key in REQUIRED_KEYS if key not in run]
        if missing:
            raise ScalingError(f"{where} lacks {', '.join(missing)}; every run needs "
                               f"{', '.join(REQUIRED_KEYS)} (and optionally tokens)")
        values = [_positive(run, key, where) for key in REQUIRED_KEYS]
        tokens = _positive(run, "tokens", where) if run.get("tokens") is not None else math.nan
        rows.append((*values, tokens))
    parameters, compute, loss, tokens = (np.array(column, np.float64) for column in zip(*rows))
    given = ~np.isnan(tokens)
    tokens = np.where(given, tokens, compute / (6 * parameters))
    return RunTable(parameters, compute, loss, tokens, bool(given.all()))


# ---------------------------------------------------------------------------------------------
# Reading runs from files and directories


def _read_json_lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _read_file(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        return _read_json_lines(path)
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    if isinstance(data, dict) and "runs" in data:
        data = data["runs"]
    if not isinstance(data, list):
        raise ScalingError(f"{path}: expected a JSON list of run dicts (or {{\"runs\": [...]}})")
    return data


def final_losses(run_dir: str) -> dict:
    """{"final_loss": last eval loss (else last training loss), "train_loss", "step"} of a run."""
    records = _read_json_lines(os.path.join(run_dir, METRICS_FILE))
    if not records:
        raise ScalingError(f"{run_dir}: metrics.jsonl is empty; the run has not trained a step")
    evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    last = records[-1]
    return {"final_loss": evals[-1] if evals else last["loss"], "train_loss": last["loss"], "step": last["step"]}


def read_training_run(run_dir: str) -> dict:
    """One run dict from a training-CLI run directory (see the module docstring)."""
    from jaxlm import accounting
    from jaxlm.checkpoint import CheckpointManager

    losses = final_losses(run_dir)
    manager = CheckpointManager(run_dir)
    step = manager.latest_step()
    if step is None:
        raise ScalingError(f"{run_dir}: no checkpoint to read the config from; train it further")
    cfg = manager.restore_config(step)
    manager.close()
    tokens = losses["step"] * cfg.train.batch_size * cfg.train.seq_len
    flops_per_token = accounting.training_flops_per_token(cfg.model, cfg.train.seq_len)
    return {"parameters": accounting.matmul_params(cfg.model), "tokens": tokens,
            "compute_budget": tokens * flops_per_token,
            "final_loss": losses["final_loss"], "run_dir": run_dir}


def load_runs(paths: Union[str, Iterable[str]]) -> list[dict]:
    """Run dicts from files and directories (see the module docstring), in the order given."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    runs = []
    for path in paths:
        if os.path.isfile(path):
            runs += _read_file(path)
        elif os.path.isfile(os.path.join(path, RUNS_FILE)):
            runs += _read_json_lines(os.path.join(path, RUNS_FILE))
        elif os.path.isfile(os.path.join(path, METRICS_FILE)):
            runs.append(read_training_run(path))
        else:
            raise ScalingError(f"{path!r} is neither a runs file (.json/.jsonl), a sweep directory "
                               f"(with {RUNS_FILE}) nor a training run directory (with {METRICS_FILE})")
    return runs
