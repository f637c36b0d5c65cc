"""Plot a run's metrics.jsonl: loss (train and eval), learning rate and MFU curves as PNG.

    python -m jaxlm.plot RUN_DIR [--out DIR]

Writes loss.png, lr.png and mfu.png (skipped when MFU is unknown, e.g. on CPU) into RUN_DIR or
--out. matplotlib is an optional dependency: `pip install jaxlm[plot]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; is {run_dir!r} a run directory of jaxlm.train?")
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(run_dir: str, out_dir: Optional[str] = None) -> list[str]:
    """Write the PNGs; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install jaxlm[plot]") from None
    records = read_metrics(run_dir)
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    charts = [("loss.png", "loss", [("loss", "train"), ("eval_loss", "eval")], True),
              ("lr.png", "learning rate", [("lr", "lr")], False),
              ("mfu.png", "MFU", [("mfu", "mfu")], False)]
    written = []
    for name, title, keys, log_scale in charts:
        series = [(label, *_series(records, key)) for key, label in keys]
        if not any(steps for _, steps, _ in series):
            continue
        figure, axes = plt.subplots(figsize=(7, 4))
        for label, steps, values in series:
            if steps:
                axes.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None)
        axes.set_xlabel("step")
        axes.set_ylabel(title)
        if log_scale:
            axes.set_yscale("log")
        axes.set_title(f"{title}: {os.path.basename(os.path.abspath(run_dir))}")
        axes.grid(alpha=0.3)
        axes.legend()
        path = os.path.join(out_dir, name)
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a --run-dir of jaxlm.train")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (ImportError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(f"wrote {path}" for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
