"""The alignment pipeline on one GPU: pretrain -> SFT -> GRPO -> eval, with JSON results and PNG curves.

    python3 tools/align_gpu.py --gsm8k DIR_WITH_train.jsonl_AND_test.jsonl --out results/align

Steps (each a CLI of the project, run as a subprocess so this is exactly what a user runs):
1. pretrain a 125m-shaped model with `python -m jaxlm.train` on GSM8K train solutions, with the
   byte tokenizer (`tasks.byte_tokenizer`, vocab 257: one token per digit, as in the CPU run);
2. SFT on the arithmetic task (`python -m jaxlm.sft --task arithmetic`, 100 steps: a start with
   room above it) and on GSM8K train solutions (`python -m jaxlm.sft --data train.jsonl`);
3. GRPO on arithmetic from the arithmetic SFT model (`python -m jaxlm.grpo --init ...`, 60 steps
   of 512 prompts x 8 samples, lr 2e-5 decayed to 0);
4. `python -m jaxlm.eval gsm8k` of the GSM8K SFT model on the test set, `eval arithmetic` of both
   arithmetic models (accuracy with 95% Wilson intervals; sampled accuracy and pass@1..8 at
   temperature 1: the room GRPO has above greedy);
5. rollout throughput: `rollout.sample_responses` (log-probs, eos, host stop handling) against
   plain `decode.generate` at the same batch and length, tokens/s of batch slots.
Writes <out>/results.json and <out>/*.png. Budget: about 4-5 minutes on one H100 (--quick: less).

Why this recipe (docs/benchmarks.md, GPU alignment): with a vocab-8192 BPE every two- and
three-digit answer was one token, and GRPO lowered held-out accuracy at every lr tried (the
per-problem answer tokens do not generalize the way digits and carries do); pretraining on
200k arithmetic lines made the byte-level SFT start perfect (1.000: nothing to gain); 128
prompts a step left the update mostly noise at this model size, where 512 raise the sampled
reward steadily.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time


def run(command: list[str], log_dir: str, name: str) -> float:
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(os.path.join(log_dir, f"{name}.log"), "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{name} failed (exit {result.returncode}); see {log_dir}/{name}.log")
    return seconds


def write_pretraining_text(gsm8k_dir: str, path: str, arithmetic_lines: int) -> None:
    from jaxlm.align import tasks

    with open(path, "w", encoding="utf-8") as out:
        for line in open(os.path.join(gsm8k_dir, "train.jsonl"), encoding="utf-8"):
            record = json.loads(line)
            example = tasks.gsm8k_example(record["question"], record["answer"])
            out.write(example.prompt + example.solution + "<|endoftext|>")
        for example in tasks.arithmetic_examples(arithmetic_lines, "train", seed=7):
            out.write(example.prompt + example.solution + "<|endoftext|>")


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def rollout_throughput(run_dir: str, batch: int, new_tokens: int) -> dict:
    """Tokens/s of batch slots: rollouts (log-probs + host stop handling) vs plain generate."""
    import jax

    from jaxlm import decode, sharding
    from jaxlm.align import common, rollout, tasks

    mesh = sharding.make_mesh("")
    cfg, params, tokenizer = common.load_policy(run_dir, mesh=mesh)
    examples = tasks.arithmetic_examples(batch, "test")
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    timings = {}
    for name in ("generate", "rollout"):
        for attempt in range(2):  # the first call compiles
            start = time.perf_counter()
            if name == "generate":
                out = decode.generate(cfg, params, prompts, max_new_tokens=new_tokens, temperature=1.0, mesh=mesh)
                slots = batch * max(len(o) for o in out)
            else:
                out = rollout.sample_responses(cfg, params, _NoEos(tokenizer), [e.prompt for e in examples],
                                               max_new_tokens=new_tokens, temperature=1.0, mesh=mesh)
                slots = batch * max(len(r.response_ids) for r in out)
            jax.block_until_ready(params)
            timings[name] = slots / (time.perf_counter() - start)
    return {"batch": batch, "new_tokens": new_tokens, "generate_tokens_per_s": timings["generate"],
            "rollout_tokens_per_s": timings["rollout"],
            "rollout_over_generate": timings["rollout"] / timings["generate"]}


class _NoEos:
    """The tokenizer without an eos id, so both paths generate the same number of tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = {}
        self.vocab_size = tokenizer.vocab_size

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def plot(out: str, sft_records: dict, grpo_records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, records in sft_records.items():
        axis.plot([r["step"] for r in records], [r["loss"] for r in records], label=name)
    axis.set(xlabel="step", ylabel="response cross-entropy", title="SFT", yscale="log")
    axis.legend()
    figure.savefig(os.path.join(out, "sft_loss.png"), dpi=120, bbox_inches="tight")
    steps = [r for r in grpo_records if r["step"] > 0]
    evals = [r for r in grpo_records if "eval_accuracy" in r]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r["step"] for r in steps], [r["reward"] for r in steps], label="train reward (sampled)")
    axis.errorbar([r["step"] for r in evals], [r["eval_accuracy"] for r in evals],
                  yerr=[[r["eval_accuracy"] - r["eval_ci95"][0] for r in evals],
                        [r["eval_ci95"][1] - r["eval_accuracy"] for r in evals]],
                  marker="o", capsize=3, label="held-out accuracy (greedy, 95% CI)")
    axis.set(xlabel="GRPO step", ylabel="accuracy", title="GRPO on arithmetic")
    axis.legend()
    figure.savefig(os.path.join(out, "grpo_curves.png"), dpi=120, bbox_inches="tight")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gsm8k", required=True, help="folder with GSM8K train.jsonl and test.jsonl")
    parser.add_argument("--out", required=True, help="results.json, *.png and the runs go here")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, ~2 minutes)")
    parser.add_argument("--arith-only", action="store_true", help="skip GSM8K SFT and evaluation")
    parser.add_argument("--grpo-args", default="",
                        help='extra `python -m jaxlm.grpo` flags, later ones win, e.g. "--lr=1e-4 --steps=30"')
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out):
        # The CLIs resume from run folders they find: a second run into the same folder would
        # mix the two runs' checkpoints, metrics and evaluations.
        sys.exit(f"--out {out} is not empty; give a new folder (runs there would resume)")
    os.makedirs(out, exist_ok=True)
    scale = 0.25 if args.quick else 1.0
    py = [sys.executable, "-m"]
    text = os.path.join(out, "pretrain.txt")
    write_pretraining_text(args.gsm8k, text, arithmetic_lines=0)
    from jaxlm.align import tasks
    tokenizer_dir = os.path.join(out, "byte_tokenizer")
    tasks.byte_tokenizer().save(tokenizer_dir)
    runs = {name: os.path.join(out, name) for name in ("pretrain", "sft_arith", "sft_gsm8k", "grpo_arith")}
    seconds = {}
    seconds["pretrain"] = run(py + ["jaxlm.train", "--config", "125m", "--data", text, "--run-dir", runs["pretrain"],
                                    "--cache-dir", os.path.join(out, "cache"), "--no-progress",
                                    "--tokenizer", tokenizer_dir,
                                    "--model.vocab_size=257", "--model.compute_dtype=bfloat16",
                                    "--model.attention_impl=cudnn", f"--train.steps={int(600 * scale)}",
                                    "--train.batch_size=64", "--train.seq_len=512", "--train.lr=1e-3",
                                    "--train.warmup_steps=50", "--train.eval_every=100000",
                                    "--train.checkpoint_every=100000"], out, "pretrain")
    sft_common = ["--no-progress", "--train.warmup_steps=20", "--train.weight_decay=0.0", "--train.lr=1e-4"]
    seconds["sft_arith"] = run(py + ["jaxlm.sft", "--task", "arithmetic", "--init", runs["pretrain"], "--run-dir",
                                     runs["sft_arith"], f"--train.steps={int(100 * scale)}", "--train.batch_size=64",
                                     "--train.seq_len=128", *sft_common], out, "sft_arith")
    if not args.arith_only:
        seconds["sft_gsm8k"] = run(py + ["jaxlm.sft", "--data", os.path.join(args.gsm8k, "train.jsonl"),
                                         "--init", runs["pretrain"], "--run-dir", runs["sft_gsm8k"],
                                         f"--train.steps={int(200 * scale)}", "--train.batch_size=32",
                                         "--train.seq_len=1024", *sft_common], out, "sft_gsm8k")
    seconds["grpo_arith"] = run(py + ["jaxlm.grpo", "--init", runs["sft_arith"], "--run-dir", runs["grpo_arith"],
                                      "--no-progress", f"--steps={int(60 * scale)}", "--prompts_per_step=512",
                                      "--group_size=8", "--lr=2e-5", "--eval_every=20", "--eval_examples=1000",
                                      "--max_new_tokens=8", *shlex.split(args.grpo_args)], out, "grpo_arith")
    reports = {}
    evals = [("arith_sft", "arithmetic", runs["sft_arith"], ["--limit", "1000", "--pass-at", "8"]),
             ("arith_grpo", "arithmetic", runs["grpo_arith"], ["--limit", "1000", "--pass-at", "8"])]
    if not args.arith_only:
        evals.insert(0, ("gsm8k_test_sft", "gsm8k", runs["sft_gsm8k"],
                         ["--data", os.path.join(args.gsm8k, "test.jsonl"), "--max-new-tokens", "400"]))
    for name, what, run_dir, extra in evals:
        report = os.path.join(out, f"eval_{name}.json")
        seconds[f"eval_{name}"] = run(py + ["jaxlm.eval", what, "--run-dir", run_dir, "--report", report, *extra],
                                      out, f"eval_{name}")
        reports[name] = {k: v for k, v in json.load(open(report)).items() if k != "samples"}
    grpo_records = read_jsonl(os.path.join(runs["grpo_arith"], "metrics.jsonl"))
    summary = json.load(open(os.path.join(runs["grpo_arith"], "summary.json")))
    results = {"seconds": seconds, "evals": reports, "grpo_summary": summary,
               "rollout_throughput": rollout_throughput(runs["grpo_arith"], 64 * 8, 64)}
    sft_curves = {"arithmetic": read_jsonl(os.path.join(runs["sft_arith"], "metrics.jsonl"))}
    if not args.arith_only:
        sft_curves["gsm8k"] = read_jsonl(os.path.join(runs["sft_gsm8k"], "metrics.jsonl"))
    plot(out, sft_curves, grpo_records)
    with open(os.path.join(out, "results.json"), "w") as file:
        json.dump(results, file, indent=1)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
