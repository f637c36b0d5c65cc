"""`python -m jaxlm.train`: the training command line around jaxlm/train.py's Trainer.

    python -m jaxlm.train                                   # tiny preset on the built-in corpus
    python -m jaxlm.train --config 125m --mesh fsdp=8 --data shards/ --run-dir runs/125m \\
        --train.batch_size=256 --train.grad_accum=4 --model.remat=full

Resolves the preset and dotted overrides into a Config, initializes multi-process JAX when a
launcher's environment is present, prepares the data (text files are tokenized into a cache),
prints the config, mesh and per-device memory estimate, and runs the Trainer. Bad input exits
with status 2 and a message; a non-finite loss or an out-of-memory with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax

from jaxlm import loss, pipeline, sharding
from jaxlm.config import Config, ConfigError, MeshConfig, load_config, to_dict
from jaxlm.train import (METRICS_FILE, NonFiniteLossError, OutOfMemoryError, Trainer, format_memory,
                         memory_estimate)


def maybe_initialize_distributed(environ: dict) -> bool:
    """`jax.distributed.initialize()` when a multi-process launcher's environment is present.

    JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID) is read explicitly; SLURM
    (srun with several tasks) and Open MPI (mpirun) are auto-detected by JAX itself.
    """
    if "JAX_COORDINATOR_ADDRESS" in environ:
        jax.distributed.initialize(
            coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in environ else None,
            process_id=int(environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in environ else None)
        return True
    launched = (int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in environ
                or int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if launched:
        jax.distributed.initialize()
    return launched


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlm.train", description="Train a language model (jaxlm/train.py).",
        epilog="Any config key can be overridden with --model.KEY=VALUE, --train.KEY=VALUE or "
               "--mesh.AXIS=N, e.g. --train.lr=3e-4 --train.grad_accum=4 --train.zero1=true.")
    parser.add_argument("--config", default="tiny", help="preset in configs/ (default: tiny)")
    parser.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=8,tensor=2 (default: all "
                        "devices on data, unless the preset's mesh fits the devices)")
    parser.add_argument("--data", nargs="*", default=[], metavar="PATH",
                        help="token-shard directories or text files (default: the built-in corpus)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="tokenizer for text --data (default: train one of model.vocab_size, cached)")
    parser.add_argument("--run-dir", default="runs/default", help="checkpoints and metrics.jsonl; "
                        "resumes from its latest checkpoint (default: runs/default)")
    parser.add_argument("--cache-dir", default=None, help="tokenizers and encoded text (default: "
                        "$XDG_CACHE_HOME/jaxlm or ~/.cache/jaxlm)")
    parser.add_argument("--steps", type=int, default=None, help="shorthand for --train.steps")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def resolve_config(args: argparse.Namespace, overrides: list[str], num_devices: int) -> Config:
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"unrecognized argument {item!r}; see --help")
    cfg = load_config(args.config, overrides)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=args.steps))
    if args.mesh is not None:
        cfg = dataclasses.replace(cfg, mesh=sharding.parse_mesh(args.mesh))
    elif math.prod(dataclasses.astuple(cfg.mesh)) != num_devices:
        cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=num_devices))
    if cfg.model.param_dtype != "float32":
        print(f"note: training keeps float32 master params; model.param_dtype={cfg.model.param_dtype} "
              "is replaced by float32 (compute stays in model.compute_dtype)", file=sys.stderr)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype="float32"))
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.model.loss_kernel == "triton":
        loss.check_loss_kernel(cfg.model)
    return cfg


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    maybe_initialize_distributed(dict(os.environ))
    cfg = resolve_config(args, overrides, jax.device_count())
    mesh = sharding.make_mesh(cfg.mesh)
    main = jax.process_index() == 0
    cache_dir = args.cache_dir or pipeline.default_cache_dir(dict(os.environ))
    shard_dirs, tokenizer_dir = pipeline.prepare_data(args.data, args.tokenizer, cache_dir,
                                                      cfg.model.vocab_size, cfg.train.default_corpus_bytes)
    data = pipeline.TrainData(pipeline.combine_shards(shard_dirs), cfg.train, cfg.model.vocab_size)
    if main:
        print(json.dumps(to_dict(cfg), indent=1))
        print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
              f"{jax.process_count()} process(es)")
        print(f"data: {data.shards.num_tokens} tokens in {len(data.shards.tokens)} shard(s) from {shard_dirs}")
        print(f"memory per device (estimate): {format_memory(memory_estimate(cfg))}")
    trainer = Trainer(cfg, mesh, data, args.run_dir, tokenizer_dir, progress=not args.no_progress)
    if main and trainer.step:
        print(f"resuming {args.run_dir} from step {trainer.step}")
    start = time.perf_counter()
    try:
        records = trainer.train()
    finally:
        trainer.close()
    if main and records:
        last = records[-1]
        evals = [r for r in records if "eval_loss" in r]
        summary = f"step {last['step']}: loss {last['loss']:.4f}"
        if evals:
            summary += f", eval_loss {evals[-1]['eval_loss']:.4f} (step {evals[-1]['step']})"
        print(f"{summary}; {time.perf_counter() - start:.1f}s; metrics in "
              f"{os.path.join(args.run_dir, METRICS_FILE)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    try:
        return run(args, overrides)
    except (ConfigError, sharding.MeshError, pipeline.DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, OutOfMemoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
