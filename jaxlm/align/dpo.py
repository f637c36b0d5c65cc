"""Direct Preference Optimization (Rafailov et al. 2023, eq. 7).

    python -m jaxlm.dpo --data pairs.jsonl --init runs/125m-sft --run-dir runs/125m-dpo --beta=0.1

For a prompt x with a chosen response y_c and a rejected one y_r:

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

with log pi(y|x) the *sum* of the response tokens' log-probs. The reference is the starting
policy, a second frozen params pytree; its log-probs do not change during training, so they are
computed once per batch before the update and travel in the batch (`chosen_ref_log_probs`,
`rejected_ref_log_probs`). The update is `train.make_train_step` with `DpoLoss`: the batch holds
chosen_* and rejected_* [P, T] arrays, so a microbatch always keeps pairs together, and
`loss_mask` marks one token per pair, so the step's denominator is the number of pairs and the
loss is the mean over pairs. Reported: loss, reward accuracy (chosen margin > rejected) and the
implicit reward margin beta * (chosen - rejected log-ratio).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxlm import sharding, train
from jaxlm.align import common
from jaxlm.config import ConfigError, TrainConfig, apply_overrides


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, beta: float) -> jax.Array:
    """Per-pair DPO loss from sequence-summed log-probs [P] (-log sigmoid, computed stably)."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -jax.nn.log_sigmoid(margin)


def sequence_log_prob(cfg, params, batch: dict, prefix: str) -> jax.Array:
    """Sum of the response tokens' log-probs of the `prefix` ("chosen"/"rejected") rows: [P]."""
    out = common.response_log_probs(cfg, params, batch[f"{prefix}_input_ids"], batch[f"{prefix}_labels"])
    return jnp.sum(out["log_probs"] * batch[f"{prefix}_mask"], axis=-1)


@dataclasses.dataclass(frozen=True)
class DpoLoss:
    """`train.make_train_step`'s loss_fn for DPO (hashable, so compiled once per beta)."""

    beta: float = 0.1

    def __call__(self, model_cfg, params, micro: dict) -> dict:
        chosen = sequence_log_prob(model_cfg, params, micro, "chosen")
        rejected = sequence_log_prob(model_cfg, params, micro, "rejected")
        ref_chosen = jnp.sum(micro["chosen_ref_log_probs"], axis=-1)
        ref_rejected = jnp.sum(micro["rejected_ref_log_probs"], axis=-1)
        losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        margin = self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        return {"ce_sum": jnp.sum(losses), "z_sum": jnp.float32(0),
                "sums": {"correct": jnp.sum((margin > 0).astype(jnp.float32)), "margin": jnp.sum(margin)}}


def dpo_batch(pairs: Sequence[tuple[list, list, list]], length: int) -> dict:
    """Host arrays [P, length - 1] of (prompt ids, chosen ids, rejected ids) triples."""
    out = {}
    for index, prefix in ((1, "chosen"), (2, "rejected")):
        packed = common.pack_prompt_and_response_ids([p[0] for p in pairs], [p[index] for p in pairs], length)
        out.update({f"{prefix}_input_ids": packed["input_ids"], f"{prefix}_labels": packed["labels"],
                    f"{prefix}_mask": packed["response_mask"]})
    one_per_pair = np.zeros_like(out["chosen_mask"])
    one_per_pair[:, 0] = 1.0
    out["loss_mask"] = one_per_pair
    return out


def add_reference_log_probs(cfg, mesh, reference: dict, batch: dict) -> dict:
    with jax.set_mesh(mesh):
        for prefix in ("chosen", "rejected"):
            log_probs = common.response_log_probs_jit(cfg.model, reference, batch[f"{prefix}_input_ids"],
                                                      batch[f"{prefix}_labels"])
            batch[f"{prefix}_ref_log_probs"] = np.asarray(log_probs) * batch[f"{prefix}_mask"]
    return batch


def run_dpo(cfg, mesh, params: dict, pairs: list, beta: float, *, run_dir: Optional[str] = None,
            tokenizer=None, progress: bool = True) -> tuple[dict, list[dict]]:
    """`cfg.train.steps` DPO steps of `cfg.train.batch_size` pairs (reshuffled every epoch)."""
    if len(pairs) < cfg.train.batch_size:
        raise ValueError(f"{len(pairs)} preference pairs, fewer than train.batch_size={cfg.train.batch_size}")
    state = common.state_from_params(cfg, mesh, params)
    step_fn = train.make_train_step(cfg, mesh, DpoLoss(beta))
    length = max(len(p[0]) + max(len(p[1]), len(p[2])) for p in pairs)
    records, order, position = [], np.array([], int), 0
    for step in tqdm(range(1, cfg.train.steps + 1), desc="dpo", disable=not progress, dynamic_ncols=True):
        if position + cfg.train.batch_size > len(order):
            order, position = np.random.default_rng(cfg.train.seed + step).permutation(len(pairs)), 0
        chosen = [pairs[i] for i in order[position:position + cfg.train.batch_size]]
        position += cfg.train.batch_size
        start = time.perf_counter()
        batch = add_reference_log_probs(cfg, mesh, params, dpo_batch(chosen, length))
        state, metrics = common.run_update(step_fn, state, batch, mesh, cfg.train.grad_accum)
        count = len(chosen)
        record = {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                  "reward_accuracy": float(metrics["sums"]["correct"]) / count,
                  "reward_margin": float(metrics["sums"]["margin"]) / count, "step_time": time.perf_counter() - start}
        records.append(record)
        if run_dir:
            common.append_metrics(run_dir, record)
    if run_dir:
        common.save_policy(run_dir, cfg.train.steps, state, cfg, tokenizer)
    return state, records


# ---------------------------------------------------------------------------------------------
# Command line


def read_pairs(path: str, tokenizer) -> list[tuple[list, list, list]]:
    """(prompt ids, chosen ids + eos, rejected ids + eos) of {prompt, chosen, rejected} lines."""
    eos = common.eos_id_of(tokenizer)
    end = [] if eos is None else [eos]
    pairs = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not all(key in record for key in ("prompt", "chosen", "rejected")):
                raise ValueError(f"{path}:{number}: expected a JSON object with prompt, chosen and rejected")
            pairs.append((tokenizer.encode(record["prompt"]), tokenizer.encode(record["chosen"]) + end,
                          tokenizer.encode(record["rejected"]) + end))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlm.dpo", allow_abbrev=False,
        description="Direct Preference Optimization from a run or HF model (jaxlm/align/dpo.py).",
        epilog="Optimizer and batch settings are train config keys: --train.steps=100 --train.lr=1e-6 "
               "--train.batch_size=16 (pairs per step) --train.grad_accum=2.")
    common.add_policy_arguments(parser, required=True)
    parser.add_argument("--data", required=True, help="JSONL of {prompt, chosen, rejected} lines")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO temperature (default 0.1)")
    parser.add_argument("--run-dir", default="runs/dpo", help="checkpoint and metrics.jsonl")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    try:
        mesh = sharding.make_mesh(args.mesh)
        model_cfg, params, tokenizer = common.load_policy(args.init, args.hf, mesh)
        tokenizer = common.require_tokenizer(tokenizer, args.init or args.hf)
        defaults = TrainConfig(steps=100, batch_size=16, lr=1e-6, warmup_steps=10, min_lr_ratio=1.0, weight_decay=0.0)
        train_cfg = apply_overrides(common.policy_config(model_cfg, mesh, defaults), overrides).train
        cfg = common.policy_config(model_cfg, mesh, train_cfg)
        pairs = read_pairs(args.data, tokenizer)
        _, records = run_dpo(cfg, mesh, params, pairs, args.beta, run_dir=args.run_dir, tokenizer=tokenizer,
                             progress=not args.no_progress)
    except (ConfigError, ValueError, FileNotFoundError, sharding.MeshError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    last = records[-1]
    print(f"step {last['step']}: loss {last['loss']:.4f}, reward accuracy {last['reward_accuracy']:.3f}; "
          f"checkpoint in {args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
