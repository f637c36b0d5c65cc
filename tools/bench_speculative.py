"""Speculative decoding end to end: train a target and a small draft on the same data with the
training CLI, then compare `decode.generate` with `decode.speculative_generate`.

    python tools/bench_speculative.py --work runs/spec                  # GPU: 1b-shaped target
    python tools/bench_speculative.py --work runs/spec --tiny           # CPU smoke test

Both models train on the built-in corpus with the same cached BPE tokenizer (same vocab size and
corpus bytes, so the CLI trains it once). Prompts are random windows of the corpus's last 200 KB
(in-domain text, possibly seen in training: what matters is how often draft and target agree,
as on real in-domain requests). Batch 1, greedy and temperature 1, median of repeats after a
compile call; prints JSON lines: tokens/s of the target alone (generate's default step) and of
speculative decoding with the draft's default step and with XLA's, the speedups and the
acceptance rate. The training runs resume if their folders already hold checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import timed  # noqa: E402  (tools/ is not a package)

CORPUS_BYTES = 20_000_000
SHAPES = {  # (target overrides, draft overrides, steps, batch, seq)
    "gpu": (["--config", "1b", "--model.vocab_size=4096", "--model.max_seq_len=1024"],
            ["--config", "125m", "--model.vocab_size=4096", "--model.num_layers=4",
             "--model.max_seq_len=1024"], 400, 32, 512),
    "tiny": (["--config", "tiny", "--model.num_layers=3"], ["--config", "tiny",
                                                           "--model.num_layers=1"], 60, 8, 64),
}


def train(run_dir: str, overrides: list[str], steps: int, batch: int, seq: int) -> None:
    command = [sys.executable, "-m", "jaxlm.train", "--run-dir", run_dir, "--steps", str(steps),
               *overrides, f"--train.batch_size={batch}", f"--train.seq_len={seq}",
               f"--train.default_corpus_bytes={CORPUS_BYTES}", f"--train.checkpoint_every={steps}",
               f"--train.eval_every={steps}"]
    subprocess.run(command, check=True)


def in_domain_prompts(tokenizer, length: int, count: int) -> list[list[int]]:
    """count windows of `length` token ids from the built-in corpus's last 200 KB (seed 0)."""
    from jaxlm import data

    ids = tokenizer.encode(data.default_corpus(CORPUS_BYTES)[-200_000:])
    starts = np.random.default_rng(0).integers(0, len(ids) - length, count)
    return [[int(t) for t in ids[start:start + length]] for start in starts]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the two training runs")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized models and lengths")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--new", type=int, default=None, help="new tokens (default 256; tiny 24)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-train", action="store_true",
                        help="use the runs already in --work as they are (for repeated timings)")
    args = parser.parse_args(argv)
    target_overrides, draft_overrides, steps, batch, seq = SHAPES["tiny" if args.tiny else "gpu"]
    new_tokens = args.new or (24 if args.tiny else 256)
    runs = {name: os.path.join(args.work, name) for name in ("target", "draft")}
    if not args.no_train:
        train(runs["target"], target_overrides, steps, batch, seq)
        train(runs["draft"], draft_overrides, steps, batch, seq)

    import jax  # after the training subprocesses: they need the accelerator alone

    from jaxlm import checkpoint, decode

    target_cfg, target_params, tokenizer = checkpoint.load_run(runs["target"])
    draft_cfg, draft_params, _ = checkpoint.load_run(runs["draft"])
    prompts = in_domain_prompts(tokenizer, 32 if args.tiny else 128, 4)
    print(json.dumps({"device": jax.devices()[0].device_kind, "target_params": int(sum(
        x.size for x in jax.tree.leaves(target_params))), "draft_params": int(sum(
            x.size for x in jax.tree.leaves(draft_params))), "gamma": args.gamma,
        "new_tokens": new_tokens, "prompts": len(prompts)}), flush=True)
    speculative = {"speculative": None, "speculative_xla_draft": False}  # the draft's step
    for temperature in (0.0, 1.0):
        seconds = {"plain": [], "speculative": [], "speculative_xla_draft": []}
        rates = []
        for one in prompts:
            prompt = [one]
            common = dict(max_new_tokens=new_tokens, temperature=temperature)
            seconds["plain"].append(timed(lambda: decode.generate(
                target_cfg, target_params, prompt, **common), args.repeats))
            for name, step in speculative.items():
                seconds[name].append(timed(lambda: decode.speculative_generate(
                    target_cfg, target_params, draft_cfg, draft_params, prompt, gamma=args.gamma,
                    pallas_step=step, **common), args.repeats))
            _, stats = decode.speculative_generate(target_cfg, target_params, draft_cfg,
                                                   draft_params, prompt, gamma=args.gamma,
                                                   **common)
            rates.append(stats["acceptance_rate"])
        total = {name: sum(times) for name, times in seconds.items()}
        record = {"temperature": temperature}
        for name, time in total.items():
            record[f"{name}_tokens_per_s"] = round(len(prompts) * new_tokens / time, 1)
        record["speedup"] = round(total["plain"] / total["speculative"], 3)
        record["speedup_xla_draft"] = round(total["plain"] / total["speculative_xla_draft"], 3)
        record["acceptance_rate"] = round(float(np.mean(rates)), 3)
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
