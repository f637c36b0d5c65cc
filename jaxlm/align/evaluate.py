"""Evaluation of a policy: accuracy on a task with verifiable answers, and perplexity.

    python -m jaxlm.eval gsm8k --data test.jsonl --run-dir runs/125m-grpo --report report.json
    python -m jaxlm.eval arithmetic --run-dir runs/arith-grpo
    python -m jaxlm.eval perplexity --text held_out.txt --run-dir runs/125m

Accuracy: batched greedy generation through `jaxlm.decode` (rollout.sample_responses at
temperature 0), each response scored by the task's reward function; `accuracy` is the mean answer
reward, `format_rate` the mean format reward, with a 95% Wilson score interval on the accuracy
(Wilson 1927; it stays inside [0, 1] and is sensible at 0% and 100%, unlike p +- 1.96 sigma).
Two policies on the same problems are compared with McNemar's exact test (`mcnemar_test`): only
the problems one policy solves and the other does not carry information, and under "no
difference" each of those n discordant problems is equally likely to go either way, so the
two-sided p-value is 2 * P(Binomial(n, 1/2) <= min(fixed, broken)), capped at 1. Paired on the
same problems it detects a smaller change than two independent intervals that must not overlap.

Sampled accuracy (`--pass-at N`): N responses per problem at `--temperature`; the mean answer
reward over all of them, and pass@k for k = 1, 2, 4, ... <= N with the unbiased estimator of Chen
et al. 2021 (eq. 1), mean over problems of 1 - C(n - c, k) / C(n, k) for c correct of n samples.
It says how much room sampling leaves above greedy: what GRPO can turn into greedy accuracy.

Perplexity: exp of the mean next-token cross-entropy over non-overlapping windows of
`seq_len` + 1 tokens of the encoded text (the last partial window included), via `model.forward`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import loss, model, sharding
from jaxlm.align import common, rollout, tasks


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for z = 1.96)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_test(before: Sequence[int], after: Sequence[int]) -> dict:
    """McNemar's exact test of paired 0/1 outcomes: {"fixed", "broken", "p_value"} (module docstring)."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes need equal lengths, got {len(before)} and {len(after)}")
    fixed = sum(1 for b, a in zip(before, after) if not b and a)
    broken = sum(1 for b, a in zip(before, after) if b and not a)
    discordant = fixed + broken
    tail = sum(math.comb(discordant, k) for k in range(min(fixed, broken) + 1))
    return {"fixed": fixed, "broken": broken, "p_value": min(1.0, 2 * tail / 2**discordant)}


def evaluate_task(cfg, params, tokenizer, examples: Sequence[tasks.Example], task: tasks.Task, *,
                  max_new_tokens: int, mesh=None, batch_size: int = 256, samples: int = 0,
                  per_example: bool = False) -> dict:
    """Greedy accuracy and format rate on `examples`; `samples` responses kept in the report;
    `per_example`: also "correct", the 0/1 outcome of each example (for `mcnemar_test`)."""
    start = time.perf_counter()
    rollouts = rollout.sample_responses(cfg, params, tokenizer, [e.prompt for e in examples],
                                        max_new_tokens=max_new_tokens, temperature=0.0, stop=task.stop,
                                        mesh=mesh, batch_size=min(batch_size, len(examples)))
    scores = [task.reward_fn(r.text, e.answer) for r, e in zip(rollouts, examples)]
    correct = int(sum(s["answer_reward"] for s in scores))
    low, high = wilson_interval(correct, len(examples))
    outcomes = {"correct": [int(s["answer_reward"]) for s in scores]} if per_example else {}
    return {**outcomes, "task": task.name, "count": len(examples), "accuracy": correct / len(examples),
            "accuracy_ci95": [low, high], "format_rate": float(np.mean([s["format_reward"] for s in scores])),
            "mean_response_tokens": float(np.mean([len(r.response_ids) for r in rollouts])),
            "seconds": time.perf_counter() - start,
            "samples": [{"prompt": e.prompt, "response": r.text, "answer": e.answer}
                        for r, e in zip(rollouts[:samples], examples[:samples])]}


def pass_at_k(num_samples: int, num_correct: Sequence[int], k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, eq. 1) over problems with `num_correct` of `num_samples`."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= samples per problem ({num_samples}), got k={k}")
    total = math.comb(num_samples, k)
    return float(np.mean([1.0 - math.comb(num_samples - c, k) / total for c in num_correct]))


def sampled_accuracy(cfg, params, tokenizer, examples: Sequence[tasks.Example], task: tasks.Task, *,
                     samples_per_problem: int, temperature: float, max_new_tokens: int, mesh=None,
                     batch_size: int = 256, seed: int = 0) -> dict:
    """Mean sampled accuracy and pass@k (k = 1, 2, 4, ... <= samples_per_problem), see above."""
    n = samples_per_problem
    prompts = [e.prompt for e in examples for _ in range(n)]
    rollouts = rollout.sample_responses(cfg, params, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        temperature=temperature, stop=task.stop, mesh=mesh, seed=seed,
                                        batch_size=min(batch_size, len(prompts)))
    rewards = [task.reward_fn(r.text, e.answer)["answer_reward"]
               for r, e in zip(rollouts, (e for e in examples for _ in range(n)))]
    correct = np.asarray(rewards, np.float64).reshape(len(examples), n).sum(1).astype(int)
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return {"temperature": temperature, "samples_per_problem": n,
            "sampled_accuracy": float(correct.sum() / (n * len(examples))),
            "pass_at": {str(k): pass_at_k(n, correct, k) for k in ks}}


@jax.jit
def _cross_entropy_sum(logits, targets):
    return jnp.sum(loss.cross_entropy(logits, targets)[0])


def perplexity(cfg, params, token_ids: Sequence[int], seq_len: int) -> dict:
    """{"perplexity", "cross_entropy", "tokens"} of `token_ids` in windows of seq_len + 1."""
    ids = np.asarray(token_ids, np.int32)
    if len(ids) < 2:
        raise ValueError("perplexity needs a text of at least 2 tokens")
    total, count = 0.0, 0
    forward = jax.jit(model.forward, static_argnums=0)
    for start in range(0, len(ids) - 1, seq_len):
        window = ids[start:start + seq_len + 1]
        logits, _ = forward(cfg, params, jnp.asarray(window[None, :-1]))
        total += float(_cross_entropy_sum(logits, jnp.asarray(window[None, 1:])))
        count += len(window) - 1
    return {"perplexity": math.exp(total / count), "cross_entropy": total / count, "tokens": count}


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlm.eval", allow_abbrev=False,
        description="Evaluate a run or a Hugging Face model: greedy accuracy on GSM8K-format JSONL "
                    "or the arithmetic task, or perplexity on a text file (jaxlm/align/evaluate.py).")
    parser.add_argument("what", choices=("gsm8k", "arithmetic", "perplexity"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="training / SFT / GRPO run directory (latest checkpoint)")
    source.add_argument("--hf", metavar="DIR", help="Hugging Face model folder")
    parser.add_argument("--data", help="gsm8k: GSM8K-format JSONL ({question, answer} lines)")
    parser.add_argument("--text", help="perplexity: a UTF-8 text file")
    parser.add_argument("--template", default="plain", choices=("plain", "r1"), help="gsm8k prompt format")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: 256 for gsm8k, 8 for arithmetic")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per generate call")
    parser.add_argument("--seq-len", type=int, default=512, help="perplexity window")
    parser.add_argument("--dtype", default=None, help="--hf: parameter/compute dtype, e.g. bfloat16")
    parser.add_argument("--report", default=None, help="write the JSON report here too")
    parser.add_argument("--samples", type=int, default=5, help="responses to include in the report")
    parser.add_argument("--pass-at", type=int, default=0, metavar="N",
                        help="also sample N responses per problem: sampled accuracy and pass@k")
    parser.add_argument("--temperature", type=float, default=1.0, help="for --pass-at")
    return parser


def run(args: argparse.Namespace) -> dict:
    if args.pass_at < 0 or (args.pass_at and args.temperature <= 0):
        raise ValueError(f"--pass-at N needs N >= 0 and --temperature > 0 (it samples); got "
                         f"--pass-at {args.pass_at} --temperature {args.temperature}")
    mesh = sharding.make_mesh("data=1", jax.devices()[:1])
    cfg, params, tokenizer = common.load_policy(args.run_dir, args.hf, mesh, dtype=args.dtype)
    tokenizer = common.require_tokenizer(tokenizer, args.run_dir or args.hf)
    if args.what == "perplexity":
        if not args.text:
            raise ValueError("perplexity needs --text FILE")
        with open(args.text, encoding="utf-8") as file:
            ids = tokenizer.encode(file.read())
        return {"what": "perplexity", "text": args.text, **perplexity(cfg, params, ids, args.seq_len)}
    if args.what == "gsm8k":
        if not args.data:
            raise ValueError("gsm8k needs --data FILE.jsonl (GSM8K format)")
        examples, task = tasks.load_gsm8k(args.data, args.template, args.limit), tasks.gsm8k_task(args.template)
        max_new_tokens = args.max_new_tokens or 256
    else:
        examples, task = tasks.arithmetic_examples(args.limit or 1000, "test"), tasks.ARITHMETIC
        max_new_tokens = args.max_new_tokens or 8
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - max(len(tokenizer.encode(e.prompt)) for e in examples))
    report = evaluate_task(cfg, params, tokenizer, examples, task, max_new_tokens=max_new_tokens,
                           batch_size=args.batch_size, samples=args.samples)
    if args.pass_at:
        report["sampled"] = sampled_accuracy(cfg, params, tokenizer, examples, task,
                                             samples_per_problem=args.pass_at,
                                             temperature=args.temperature,
                                             max_new_tokens=max_new_tokens, batch_size=args.batch_size)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=1)
    print(text)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as file:
            file.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
