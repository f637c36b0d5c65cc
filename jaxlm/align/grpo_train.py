"""The GRPO loop: rollouts through `jaxlm.decode`, rewards, one jitted sharded update per epoch.

    python -m jaxlm.grpo                                  # arithmetic on CPU, a few minutes
    python -m jaxlm.grpo --data gsm8k_train.jsonl --test-data gsm8k_test.jsonl \\
        --init runs/125m-sft --run-dir runs/125m-grpo --max_new_tokens=256 --group_size=8

One GRPO step:
1. sample `prompts_per_step` training problems; G = `group_size` rollouts of each (rollout.py),
   from the train state's params as they are (no copy between trainer and sampler);
2. rewards and group-normalized advantages on the host, over the whole rollout batch (grpo.py);
3. old-policy log-probs (needed by grpo_clip and by several epochs) and reference log-probs (for
   the KL penalty) with one forward each, before any update;
4. `epochs_per_rollout` optimizer steps on the same rollouts: `train.make_train_step` with the
   GRPO loss, `grad_accum` microbatches, the state donated. With one epoch and old log-probs equal
   to the current ones this is on-policy; later epochs are off-policy and the clip matters.

The reference policy is the starting params (a separate pytree). When the start is a jaxlm run
(--init or the default SFT policy), its Adam second moment and count are carried over and the
first moment starts at zero (`carry_adam`, common.carry_second_moment): a fresh Adam's first
updates are lr * sign(g) on every weight, which wrecked the tiny policy at lr >= 3e-4. Every step appends a record to
`<run-dir>/metrics.jsonl` (reward, format and answer reward, accuracy, entropy, clip fraction,
response length, KL, rollout and update seconds); held-out greedy accuracy every `eval_every`
steps. With no --init/--hf the policy is the cached arithmetic SFT model (tasks.py, configs/
align_tiny.py), trained first if the cache lacks it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from jaxlm import pipeline, sharding, train
from jaxlm.align import common, evaluate, grpo, rewards, rollout, sft, tasks
from jaxlm.config import Config, ConfigError, TrainConfig, apply_overrides, load_preset, to_dict


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    """GRPO settings; the defaults are the CPU arithmetic run (docs/alignment_cpu.md): 1024
    rollouts a step (fewer left the update mostly noise at a sampled accuracy of 0.15) and the lr
    decayed to 0 by the last step (a constant lr lost the held-out gain as the gradient norm grew)."""

    steps: int = 30
    prompts_per_step: int = 128
    group_size: int = 8
    temperature: float = 1.0
    top_p: Optional[float] = None
    reward: Optional[str] = None  # train with this rewards.REWARDS entry instead of the task's (eval stays exact)
    max_new_tokens: int = 6
    loss_type: grpo.LossType = "grpo_clip"
    aggregation: grpo.Aggregation = "sequence"
    normalize_by_std: bool = True
    advantage_eps: float = 1e-6
    cliprange: float = 0.2
    kl_coef: float = 0.0
    epochs_per_rollout: int = 1
    lr: float = 1e-4
    carry_adam: bool = True  # start from the starting run's Adam second moment (common.carry_second_moment)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # < 1: cosine decay to lr * min_lr_ratio over the run (1: constant)
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    grad_accum: int = 1
    eval_every: int = 10
    eval_examples: int = 1000
    seed: int = 0
    # Compute the policy in this dtype instead of the start's (float32: the sampler's and the
    # trainer's log-probs agree to ~1e-6 instead of bf16 rounding; cudnn attention becomes xla).
    compute_dtype: Optional[str] = None

    def __post_init__(self):
        if self.compute_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "epochs_per_rollout",
                     "grad_accum", "eval_every", "eval_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def train_config(self) -> TrainConfig:
        """The optimizer settings as the train step reads them (warmup, then cosine to min_lr_ratio)."""
        return TrainConfig(steps=self.steps * self.epochs_per_rollout, batch_size=self.prompts_per_step * self.group_size,
                           seq_len=self.max_new_tokens, grad_accum=self.grad_accum, lr=self.lr, min_lr_ratio=self.min_lr_ratio,
                           warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                           clip_norm=self.clip_norm, seed=self.seed)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def rollout_batch(rollouts: list, advantages: np.ndarray, raw_rewards: np.ndarray, config: GrpoConfig) -> dict:
    """Host arrays [N, T] for the update (T rounded up to 8 so steps reuse one program)."""
    longest = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    packed = common.pack_prompt_and_response_ids([r.prompt_ids for r in rollouts],
                                                  [r.response_ids for r in rollouts], _round_up(longest, 8) + 1)
    mask = packed["response_mask"]
    weights = grpo.token_weights(mask, config.aggregation, config.max_new_tokens) * mask.sum()
    ones = np.ones_like(mask)
    return {"inputs": packed["input_ids"], "targets": packed["labels"], "loss_mask": mask,
            "token_weights": weights.astype(np.float32), "advantages": advantages[:, None] * ones,
            "raw_rewards": raw_rewards[:, None] * ones, "old_log_probs": np.zeros_like(mask),
            "ref_log_probs": np.zeros_like(mask)}


def rollout_log_probs(rollouts: list, shape: tuple) -> np.ndarray:
    """The sampler's log-probs laid out like the labels of `rollout_batch` (0 off the response)."""
    out = np.zeros(shape, np.float32)
    for i, r in enumerate(rollouts):
        start = len(r.prompt_ids) - 1
        out[i, start:start + len(r.log_probs)] = r.log_probs
    return out


class GrpoTrainer:
    """Policy state, reference params, task data and the compiled update of one GRPO run."""

    def __init__(self, model_cfg, params: dict, tokenizer, task: tasks.Task, train_examples: list,
                 config: GrpoConfig, mesh, run_dir: Optional[str] = None, start_opt_state=None):
        self.config, self.mesh, self.tokenizer, self.run_dir = config, mesh, tokenizer, run_dir
        self.eval_task = task  # held-out accuracy: the task's own (exact) reward
        self.task = dataclasses.replace(task, reward_fn=rewards.get_reward(config.reward)) if config.reward else task
        self.examples = train_examples
        self.cfg = common.policy_config(model_cfg, mesh, config.train_config())
        self.state = common.state_from_params(self.cfg, mesh, params)
        if start_opt_state is not None:
            self.state = common.carry_second_moment(self.state, start_opt_state)
        self.reference = params if config.kl_coef else None
        self.loss_fn = grpo.GrpoLoss(config.loss_type, config.cliprange, config.kl_coef)
        self.step_fn = train.make_train_step(self.cfg, mesh, self.loss_fn)
        self.rng = random.Random(config.seed)
        self.step = 0
        shards = sharding.batch_shards(mesh)
        if (config.prompts_per_step * config.group_size) % (config.grad_accum * shards):
            raise ConfigError(f"prompts_per_step x group_size = {config.prompts_per_step * config.group_size} "
                              f"must be divisible by grad_accum x data x fsdp x expert = {config.grad_accum * shards}")

    @property
    def params(self) -> dict:
        return self.state["params"]

    def sample(self) -> tuple[list, list]:
        """Rollouts of this step's prompts (group_size consecutive samples each) and their answers."""
        problems = [self.rng.choice(self.examples) for _ in range(self.config.prompts_per_step)]
        repeated = [p for p in problems for _ in range(self.config.group_size)]
        rollouts = rollout.sample_responses(
            self.cfg.model, self.params, self.tokenizer, [p.prompt for p in repeated],
            max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature,
            top_p=self.config.top_p, seed=self.config.seed * 100_003 + self.step, stop=self.task.stop,
            mesh=self.mesh)
        return rollouts, [p.answer for p in repeated]

    def _log_probs(self, params: dict, batch: dict) -> np.ndarray:
        with jax.set_mesh(self.mesh):
            out = common.response_log_probs_jit(self.cfg.model, params, batch["inputs"], batch["targets"])
        return np.asarray(out) * batch["loss_mask"]

    def grpo_step(self) -> dict:
        """One rollout batch and its `epochs_per_rollout` updates; returns the step's record."""
        config, start = self.config, time.perf_counter()
        rollouts, answers = self.sample()
        rollout_seconds = time.perf_counter() - start
        advantages, raw_rewards, reward_stats = grpo.compute_group_normalized_rewards(
            self.task.reward_fn, [r.text for r in rollouts], answers, config.group_size,
            config.advantage_eps, config.normalize_by_std)
        batch = rollout_batch(rollouts, advantages, raw_rewards, config)
        record = {"step": self.step + 1, **reward_stats}
        if config.loss_type == "grpo_clip" or config.epochs_per_rollout > 1:
            batch["old_log_probs"] = self._log_probs(self.params, batch)
            gap = np.abs(batch["old_log_probs"] - rollout_log_probs(rollouts, batch["loss_mask"].shape))
            record["rollout_log_prob_gap"] = float(gap.max())
        if self.reference is not None:
            batch["ref_log_probs"] = self._log_probs(self.reference, batch)
        update_start = time.perf_counter()
        for _ in range(config.epochs_per_rollout):
            self.state, metrics = common.run_update(self.step_fn, self.state, batch, self.mesh, config.grad_accum)
        self.step += 1
        tokens = float(batch["loss_mask"].sum())
        sums = metrics["sums"]
        record.update(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
                      entropy=float(sums["entropy"]) / tokens, clip_fraction=float(sums["clipped"]) / tokens,
                      response_length=tokens / len(rollouts), rollout_seconds=rollout_seconds,
                      update_seconds=time.perf_counter() - update_start, rollout_tokens=tokens)
        if config.kl_coef:
            record["kl"] = float(sums["kl"]) / tokens
        return record

    def evaluate(self, examples: list) -> dict:
        return evaluate.evaluate_task(self.cfg.model, self.params, self.tokenizer, examples, self.eval_task,
                                      max_new_tokens=self.config.max_new_tokens, mesh=self.mesh,
                                      batch_size=256, per_example=True)

    def train(self, test_examples: list, progress: bool = True) -> list[dict]:
        """`steps` GRPO steps with held-out evaluation at the start, every eval_every, and the end."""
        records = []
        before = self.evaluate(test_examples)
        self._log({"step": 0, "eval_accuracy": before["accuracy"], "eval_ci95": before["accuracy_ci95"],
                   "eval_format_rate": before["format_rate"]}, records)
        self.start_correct = before["correct"]
        bar = tqdm(range(self.config.steps), desc="grpo", disable=not progress, dynamic_ncols=True)
        for _ in bar:
            record = self.grpo_step()
            if self.step % self.config.eval_every == 0 or self.step == self.config.steps:
                result = self.evaluate(test_examples)
                test = evaluate.mcnemar_test(self.start_correct, result["correct"])
                record.update(eval_accuracy=result["accuracy"], eval_ci95=result["accuracy_ci95"],
                              eval_format_rate=result["format_rate"], eval_fixed=test["fixed"],
                              eval_broken=test["broken"], eval_p_value=test["p_value"])
            self._log(record, records)
            bar.set_postfix(reward=f"{record['reward']:.3f}", acc=record.get("eval_accuracy", ""))
        if self.run_dir:
            common.save_policy(self.run_dir, self.step, self.state, self.cfg, self.tokenizer)
        return records

    def _log(self, record: dict, records: list) -> None:
        records.append(record)
        if self.run_dir:
            common.append_metrics(self.run_dir, record)


# ---------------------------------------------------------------------------------------------
# The default policy: a tiny model SFT-ed on arithmetic, cached


def default_sft_config(mesh) -> Config:
    cfg = load_preset("align_tiny")
    return common.policy_config(cfg.model, mesh, cfg.train)


def arithmetic_policy(cache_dir: str, mesh, progress: bool = True) -> str:
    """The run directory of the arithmetic SFT policy; trained once, then cached."""
    cfg = default_sft_config(mesh)
    recipe = {"model": to_dict(cfg.model), "train": to_dict(cfg.train),
              "task": dataclasses.asdict(tasks.ArithmeticSpec())}  # a new task or recipe: a new cache entry
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    run_dir = os.path.join(cache_dir, f"align-arithmetic-sft-{key}")
    if not os.path.isfile(os.path.join(run_dir, "done")):
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted earlier attempt
        print(f"training the starting policy (SFT of align_tiny on arithmetic), cached in {run_dir}")
        tokenizer = tasks.byte_tokenizer()
        pairs = sft.tokenize_examples(tasks.arithmetic_examples(20000, "train"), tokenizer)
        sft.run_sft(cfg, mesh, sft.fresh_params(cfg, mesh), pairs, run_dir=run_dir, tokenizer=tokenizer,
                    progress=progress)
        open(os.path.join(run_dir, "done"), "w").close()
    return run_dir


# ---------------------------------------------------------------------------------------------
# Command line


def with_compute_dtype(model_cfg, dtype: str):
    """The policy's model config computing in `dtype` (cuDNN attention takes only 16-bit inputs:
    in float32 it becomes xla attention)."""
    attention = model_cfg.attention_impl
    if dtype == "float32" and attention == "cudnn":
        attention = "xla"
    return dataclasses.replace(model_cfg, compute_dtype=dtype, attention_impl=attention)


def build_parser():
    import argparse

    keys = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(GrpoConfig))
    parser = argparse.ArgumentParser(
        prog="python -m jaxlm.grpo", allow_abbrev=False,
        description="GRPO with verifiable rewards (jaxlm/align/grpo_train.py). With no arguments: "
                    "the arithmetic task from a cached tiny SFT policy, on CPU in a few minutes.",
        epilog=f"GRPO settings are --KEY=VALUE overrides; keys and defaults: {keys}")
    common.add_policy_arguments(parser)  # default: the cached arithmetic SFT model
    parser.add_argument("--data", help="GSM8K-format JSONL of training questions (default: arithmetic)")
    parser.add_argument("--test-data", help="GSM8K-format JSONL of held-out questions (with --data)")
    parser.add_argument("--template", default="plain", choices=("plain", "r1"), help="GSM8K prompt format")
    parser.add_argument("--run-dir", default="runs/grpo", help="metrics.jsonl, summary.json, checkpoint")
    parser.add_argument("--cache-dir", default=None, help="where the default SFT policy is cached "
                        "(default: $XDG_CACHE_HOME/jaxlm or ~/.cache/jaxlm)")
    return parser


def _task_data(args, config: GrpoConfig):
    if args.data is None:
        train_examples = tasks.arithmetic_examples(20000, "train", seed=config.seed + 1)
        return tasks.ARITHMETIC, train_examples, tasks.arithmetic_examples(config.eval_examples, "test")
    if args.test_data is None:
        raise ConfigError("--data needs --test-data (held-out questions for the accuracy)")
    return (tasks.gsm8k_task(args.template), tasks.load_gsm8k(args.data, args.template),
            tasks.load_gsm8k(args.test_data, args.template, limit=config.eval_examples))


def run(args, overrides: list[str]) -> dict:
    run_start = time.perf_counter()
    config = apply_overrides(GrpoConfig(), overrides)
    mesh = sharding.make_mesh(args.mesh)
    start_dir = args.init
    if not (args.init or args.hf):
        if args.data:
            raise ConfigError("--data (GSM8K) needs a starting policy: --init RUN_DIR or --hf DIR")
        cache_dir = args.cache_dir or pipeline.default_cache_dir(dict(os.environ))
        start_dir = arithmetic_policy(cache_dir, mesh, progress=not args.no_progress)
    model_cfg, params, tokenizer = common.load_policy(start_dir, args.hf if start_dir is None else None, mesh)
    if config.compute_dtype is not None:
        model_cfg = with_compute_dtype(model_cfg, config.compute_dtype)
    tokenizer = common.require_tokenizer(tokenizer, start_dir or args.hf)
    start_opt_state = common.restore_opt_state(start_dir, mesh) if start_dir and config.carry_adam else None
    task, train_examples, test_examples = _task_data(args, config)
    os.makedirs(args.run_dir, exist_ok=True)
    if os.path.exists(os.path.join(args.run_dir, common.METRICS_FILE)):
        os.remove(os.path.join(args.run_dir, common.METRICS_FILE))
    trainer = GrpoTrainer(model_cfg, params, tokenizer, task, train_examples, config, mesh, args.run_dir,
                          start_opt_state)
    start = time.perf_counter()
    records = trainer.train(test_examples, progress=not args.no_progress)
    steps = [r for r in records if r["step"] > 0]
    summary = {"task": task.name, "config": dataclasses.asdict(config), "held_out_examples": len(test_examples),
               "accuracy_before": records[0]["eval_accuracy"], "ci95_before": records[0]["eval_ci95"],
               "accuracy_after": records[-1]["eval_accuracy"], "ci95_after": records[-1]["eval_ci95"],
               "mcnemar": {"fixed": records[-1]["eval_fixed"], "broken": records[-1]["eval_broken"],
                           "p_value": records[-1]["eval_p_value"]},
               "seconds": time.perf_counter() - start, "total_seconds": time.perf_counter() - run_start,
               "rollout_seconds": sum(r["rollout_seconds"] for r in steps),
               "update_seconds": sum(r["update_seconds"] for r in steps),
               "rollout_tokens": sum(r["rollout_tokens"] for r in steps)}
    with open(os.path.join(args.run_dir, "summary.json"), "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=1)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    try:
        summary = run(args, overrides)
    except (ConfigError, ValueError, FileNotFoundError, sharding.MeshError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    low, high = summary["ci95_before"]
    low2, high2 = summary["ci95_after"]
    test = summary["mcnemar"]
    print(f"held-out accuracy ({summary['held_out_examples']} problems, greedy): "
          f"{summary['accuracy_before']:.3f} [{low:.3f}, {high:.3f}] -> {summary['accuracy_after']:.3f} "
          f"[{low2:.3f}, {high2:.3f}]; McNemar on the same problems: {test['fixed']} fixed, {test['broken']} broken, "
          f"p = {test['p_value']:.2g}; GRPO {summary['seconds']:.0f} s (rollouts {summary['rollout_seconds']:.0f} s, "
          f"updates {summary['update_seconds']:.0f} s), {summary['total_seconds']:.0f} s in all with the start "
          f"policy and evaluations; metrics in {args.run_dir}")
    return 0
