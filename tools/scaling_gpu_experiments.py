"""The GPU experiments of the scaling issue, in one program: an IsoFLOP sweep and muP LR transfer.

    python3 tools/scaling_gpu_experiments.py OUT          # one H100/H200, about 5 minutes
    python3 tools/scaling_gpu_experiments.py OUT --tiny   # CPU smoke test of the same steps

1. IsoFLOP sweep with the training CLI (`python -m jaxlm.scaling sweep`): 3 budgets (1e13, 3e13,
   1e14 FLOPs) x 5 sizes of the tiny preset's family on the built-in corpus (20 MB of it, 512-token
   BPE), batch 128 x 128 tokens, then approaches 2 and 3 with bootstrap intervals, predicting
   N_opt and D_opt at 1e15 and 1e16. Run folders (checkpoints) go to --work, outside OUT; OUT/isoflop
   gets runs.jsonl, fit.json and the PNGs.
2. muP LR transfer (tools/mup_lr_transfer.py): widths 128..1024, 8 learning rates, standard vs
   muP; OUT/mup gets lr_transfer.json and lr_transfer.png.
OUT/summary.json records each part's wall time and exit status. A failed fit (for example a
budget whose losses have no minimum over the sizes tried) is recorded and the next part runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mup_lr_transfer  # noqa: E402  (tools/ is not a package)

from jaxlm.scaling.cli import main as scaling_main  # noqa: E402

FULL = {
    "sweep": ["--budgets", "1e13,3e13,1e14", "--sizes-per-budget", "5", "--size-spread", "8",
              "--predict", "1e15,1e16", "--samples", "100",
              "--train.batch_size=128", "--train.seq_len=128", "--train.default_corpus_bytes=20000000",
              "--train.eval_batches=8"],
    "lr_transfer": ["--corpus-bytes", "20000000"],
}
TINY = {
    "sweep": ["--budgets", "1e9,2e9", "--sizes-per-budget", "3", "--size-spread", "2", "--aspect-ratio", "48",
              "--predict", "1e11", "--samples", "10", "--methods", "isoflop",
              "--train.batch_size=8", "--train.seq_len=32", "--train.default_corpus_bytes=300000",
              "--train.eval_batches=2", "--train.eval_fraction=0.1"],
    "lr_transfer": ["--widths", "32,64", "--steps", "5", "--lrs", "3", "--batch", "4", "--seq", "32",
                    "--head-dim", "16", "--dtype", "float32", "--eval-batches", "2", "--corpus-bytes", "300000"],
}


def timed(name: str, function, summary: dict) -> None:
    start = time.perf_counter()
    try:
        status = function()
    except Exception as error:  # record and go on: the other part still runs
        status = f"{type(error).__name__}: {error}"
    summary[name] = {"status": status, "seconds": round(time.perf_counter() - start, 1)}
    print(f"== {name}: {summary[name]}", flush=True)


def run_sweep(out: str, work: str, settings: dict) -> int:
    plots = os.path.join(out, "isoflop")
    code = scaling_main(["sweep", "--config", "tiny", "--out", work, "--plots", plots, *settings["sweep"]])
    os.makedirs(plots, exist_ok=True)
    if os.path.isfile(os.path.join(work, "runs.jsonl")):
        shutil.copy(os.path.join(work, "runs.jsonl"), os.path.join(plots, "runs.jsonl"))
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder for the results (JSON and PNG only)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "jaxlm_scaling_sweep"),
                        help="folder for the sweep's run folders and checkpoints (resumable)")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized smoke test of every step")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: sweep, lr_transfer")
    args = parser.parse_args(argv)
    settings = TINY if args.tiny else FULL
    os.makedirs(args.out, exist_ok=True)
    summary: dict = {"tiny": args.tiny}
    if "sweep" not in args.skip:
        timed("sweep", lambda: run_sweep(args.out, args.work, settings), summary)
    if "lr_transfer" not in args.skip:
        argv = ["--out", os.path.join(args.out, "mup"), *settings["lr_transfer"]]
        timed("lr_transfer", lambda: mup_lr_transfer.main(argv), summary)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=1)
    print(json.dumps(summary, indent=1))
    return 0 if all(part["status"] == 0 for part in summary.values() if isinstance(part, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
