"""Supervised fine-tuning: next-token cross-entropy on response tokens only.

    python -m jaxlm.sft --data train.jsonl --init runs/125m --run-dir runs/125m-sft
    python -m jaxlm.sft --task arithmetic --config align_tiny --run-dir runs/arith-sft

Examples are (prompt, response) token-id pairs; the response ends with eos, so the model learns
to stop. They are packed back to back into rows of `train.seq_len` + 1 tokens with segment ids
and positions restarting per example (attention stays inside an example, as the pretraining
"documents" layout), and `loss_mask` is 1 exactly where the target is a response token. The
update is the pretraining step itself (`train.make_train_step`): the loss is the mean over the
response tokens of the whole batch, with `train.grad_accum` microbatches, the same sharding,
clipping, AdamW schedule and non-finite check. An example longer than a row is cut (counted in
the log). Each epoch reshuffles the examples with `train.seed` + epoch.

Data: JSONL lines {"prompt", "response"}, or GSM8K lines {"question", "answer"} (`--template`
picks the prompt format, jaxlm/align/tasks.py), or `--task arithmetic` (generated).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Iterator, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from jaxlm import model, sharding, train
from jaxlm.align import common, tasks
from jaxlm.config import Config, ConfigError, apply_overrides, load_preset


# ---------------------------------------------------------------------------------------------
# Packing


def pack_examples(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int) -> dict:
    """Pack (prompt ids, response ids) into rows: inputs, targets, loss_mask, positions,
    segment_ids, all [R, seq_len]; segment 0 is padding. Returns also "truncated" (a count)."""
    width = seq_len + 1
    rows, truncated = [], 0
    tokens, segments, positions, is_response = [], [], [], []

    def flush():
        pad = width - len(tokens)
        rows.append((tokens + [common.PAD_ID] * pad, segments + [0] * pad, positions + [0] * pad,
                     is_response + [0.0] * pad))

    for prompt, response in pairs:
        example = list(prompt) + list(response)
        flags = [0.0] * len(prompt) + [1.0] * len(response)
        if len(example) > width:
            example, flags, truncated = example[:width], flags[:width], truncated + 1
        if len(tokens) + len(example) > width:
            flush()
            tokens, segments, positions, is_response = [], [], [], []
        segment = (segments[-1] if segments else 0) + 1
        tokens += example
        segments += [segment] * len(example)
        positions += list(range(len(example)))
        is_response += flags
    if tokens:
        flush()
    ids, segs, pos, resp = (np.asarray(column) for column in zip(*rows))
    same_example = (segs[:, 1:] == segs[:, :-1]) & (segs[:, 1:] > 0)
    return {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
            "loss_mask": (resp[:, 1:] * same_example).astype(np.float32),
            "positions": pos[:, :-1].astype(np.int32), "segment_ids": segs[:, :-1].astype(np.int32),
            "truncated": truncated}


def sft_batches(pairs: list, seq_len: int, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless batches of `batch_size` packed rows; reshuffled every epoch."""
    epoch = 0
    while True:
        order = np.random.default_rng(seed + epoch).permutation(len(pairs))
        packed = pack_examples([pairs[i] for i in order], seq_len)
        packed.pop("truncated")
        num_rows = len(packed["inputs"])
        if num_rows < batch_size:
            raise ValueError(f"the examples fill {num_rows} rows of {seq_len} tokens, fewer than "
                             f"train.batch_size={batch_size}; give more examples or a smaller batch")
        for start in range(0, num_rows - batch_size + 1, batch_size):
            yield {name: array[start:start + batch_size] for name, array in packed.items()}
        epoch += 1


def tokenize_examples(examples: Sequence[tasks.Example], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, solution ids + eos) per example."""
    eos = common.eos_id_of(tokenizer)
    end = [] if eos is None else [eos]
    return [(tokenizer.encode(e.prompt), tokenizer.encode(e.solution) + end) for e in examples]


# ---------------------------------------------------------------------------------------------
# The loop


def run_sft(cfg: Config, mesh, params: dict, pairs: list, *, run_dir: Optional[str] = None,
            tokenizer=None, progress: bool = True) -> tuple[dict, list[dict]]:
    """`cfg.train.steps` SFT steps from `params`; returns the final state and per-step records.

    Writes metrics.jsonl and a final checkpoint to `run_dir` when given.
    """
    state = common.state_from_params(cfg, mesh, params)
    step_fn = train.make_train_step(cfg, mesh)
    batches = sft_batches(pairs, cfg.train.seq_len, cfg.train.batch_size, cfg.train.seed)
    records = []
    for step in tqdm(range(1, cfg.train.steps + 1), desc="sft", disable=not progress, dynamic_ncols=True):
        start = time.perf_counter()
        batch = next(batches)
        state, metrics = common.run_update(step_fn, state, batch, mesh, cfg.train.grad_accum)
        record = {"step": step, "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
                  "grad_norm": float(metrics["grad_norm"]), "response_tokens": float(batch["loss_mask"].sum()),
                  "step_time": time.perf_counter() - start}
        records.append(record)
        if run_dir:
            common.append_metrics(run_dir, record)
    if run_dir:
        common.save_policy(run_dir, cfg.train.steps, state, cfg, tokenizer)
    return state, records


def fresh_params(cfg: Config, mesh) -> dict:
    with jax.set_mesh(mesh):
        return model.init_params(cfg.model, jax.random.key(cfg.train.seed), mesh)


# ---------------------------------------------------------------------------------------------
# Command line


def read_sft_jsonl(path: str, template: str) -> list[tasks.Example]:
    """{"prompt", "response"} lines, or GSM8K {"question", "answer"} lines."""
    with open(path, encoding="utf-8") as file:
        first = json.loads(next(line for line in file if line.strip()))
    if "question" in first:
        return tasks.load_gsm8k(path, template)
    examples = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                record = json.loads(line)
                if "prompt" not in record or "response" not in record:
                    raise ValueError(f"{path}:{number}: expected {{\"prompt\", \"response\"}} (or GSM8K's "
                                     "{\"question\", \"answer\"})")
                examples.append(tasks.Example(record["prompt"], record["response"], ""))
    return examples


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlm.sft", allow_abbrev=False,
        description="Supervised fine-tuning on response tokens (jaxlm/align/sft.py).",
        epilog="Optimizer and batch settings are train config keys: --train.steps=200 --train.lr=1e-4 "
               "--train.batch_size=32 --train.seq_len=512 --train.grad_accum=2 (--model.KEY too with --config).")
    source = common.add_policy_arguments(parser)
    source.add_argument("--config", default=None, help="start from random weights of this preset "
                        "(with --task arithmetic: align_tiny and the byte tokenizer)")
    parser.add_argument("--data", help="JSONL: {prompt, response} or GSM8K {question, answer} lines")
    parser.add_argument("--task", choices=("arithmetic",), help="generated training data instead of --data")
    parser.add_argument("--num-examples", type=int, default=20000, help="--task: how many problems")
    parser.add_argument("--template", default="plain", choices=("plain", "r1"), help="GSM8K prompt format")
    parser.add_argument("--run-dir", default="runs/sft", help="checkpoint and metrics.jsonl")
    return parser


def _load_start(args, mesh, overrides):
    """(Config without train settings applied, params, tokenizer) of the starting policy."""
    if args.init or args.hf:
        model_cfg, params, tokenizer = common.load_policy(args.init, args.hf, mesh)
        cfg = Config(model=model_cfg, train=load_preset("align_tiny").train)
        return cfg, params, common.require_tokenizer(tokenizer, args.init or args.hf)
    if not args.task:
        raise ConfigError("starting from random weights (--config) is only supported with --task "
                          "arithmetic; give --init RUN_DIR or --hf DIR to fine-tune a model")
    cfg = apply_overrides(load_preset(args.config or "align_tiny"), [o for o in overrides if o.startswith("--model.")])
    return cfg, None, tasks.byte_tokenizer()


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if bool(args.data) == bool(args.task):
        raise ConfigError("give exactly one of --data FILE.jsonl or --task arithmetic")
    mesh = sharding.make_mesh(args.mesh)
    cfg, params, tokenizer = _load_start(args, mesh, overrides)
    cfg = apply_overrides(cfg, [o for o in overrides if not o.startswith("--model.")])
    cfg = common.policy_config(cfg.model, mesh, cfg.train)
    if params is None:
        params = fresh_params(cfg, mesh)
    examples = (tasks.arithmetic_examples(args.num_examples, "train") if args.task
                else read_sft_jsonl(args.data, args.template))
    pairs = tokenize_examples(examples, tokenizer)
    print(f"{len(pairs)} examples; {cfg.train.steps} steps of {cfg.train.batch_size} rows x "
          f"{cfg.train.seq_len} tokens; mesh {dict(mesh.shape)}")
    _, records = run_sft(cfg, mesh, params, pairs, run_dir=args.run_dir, tokenizer=tokenizer,
                         progress=not args.no_progress)
    print(f"step {records[-1]['step']}: loss {records[-1]['loss']:.4f}; checkpoint in {args.run_dir}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    try:
        return run(args, overrides)
    except (ConfigError, ValueError, FileNotFoundError, sharding.MeshError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
