"""muP learning-rate transfer: an LR sweep at several widths, standard parameterization vs muP.

    python tools/mup_lr_transfer.py --out results/mup      # about 2 minutes on one H100
    python tools/mup_lr_transfer.py --out /tmp/m --widths 32,64 --steps 5 --lrs 3 --batch 4   # CPU smoke

For each parameterization and width (embed_dim; heads of --head-dim dims, mlp 8/3 x width,
--layers layers; muP's base width = the smallest) it trains one model per learning rate on the
built-in corpus (the training CLI's data pipeline and tokenizer cache) for --steps AdamW steps
with the repository's schedule (warmup, cosine) and clipping, then measures the held-out loss.
The learning rates of one width train together: params, optimizer state and the rate are vmapped,
so each (parameterization, width) compiles once. Writes lr_transfer.json ({parameterization:
{width: {lrs, losses, best_lr}}}) and lr_transfer.png (final loss against LR, one curve per
width, the best LR starred). Under muP the stars should line up; under the standard
parameterization the best LR falls as the width grows (TP5, fig. 1).
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
import jax.numpy as jnp
import numpy as np

from jaxlm import loss, model, optim, pipeline
from jaxlm.config import ModelConfig, TrainConfig
from jaxlm.train import default_cache_dir

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coord_check import width_config  # noqa: E402  (tools/ is not a package)


def load_data(args: argparse.Namespace, train: TrainConfig) -> pipeline.TrainData:
    shard_dirs, _ = pipeline.prepare_data([], None, args.cache_dir or default_cache_dir(dict(os.environ)),
                                          args.vocab, args.corpus_bytes)
    return pipeline.TrainData(pipeline.combine_shards(shard_dirs), train, args.vocab)


def sweep_learning_rates(cfg: ModelConfig, train: TrainConfig, lrs: np.ndarray, data: pipeline.TrainData) -> np.ndarray:
    """Held-out loss after `train.steps` steps for each learning rate (inf where it diverged)."""
    # The schedule runs at lr 1 and each copy's updates are multiplied by its own rate: AdamW's
    # update (adam + decay) is linear in the learning rate, so this is AdamW at that rate.
    tx = optim.make_optimizer(cfg, dataclasses.replace(train, lr=1.0))
    params = model.init_params(cfg, jax.random.key(train.seed))
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(lrs), *x.shape)), params)
    state = jax.vmap(tx.init)(stacked)

    def step(params, state, lr, batch):
        grads = jax.grad(loss.mean_loss, argnums=1)(cfg, params, batch)
        updates, state = tx.update(grads, state, params)
        return jax.tree.map(lambda p, u: p + lr * u, params, updates), state

    step = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None)), donate_argnums=(0, 1))
    evaluate = jax.jit(jax.vmap(lambda p, batch: loss.mean_loss(cfg, p, batch), in_axes=(0, None)))
    iterator = data.train_iterator()
    rates = jnp.asarray(lrs, jnp.float32)
    for _ in range(train.steps):
        stacked, state = step(stacked, state, rates, next(iterator))
    losses = np.mean([np.asarray(evaluate(stacked, batch)) for batch in data.eval_batches()], axis=0)
    return np.where(np.isfinite(losses), losses, np.inf)


def run(args: argparse.Namespace) -> dict:
    widths = sorted(int(w) for w in args.widths.split(","))
    lrs = np.logspace(math.log10(args.lr_min), math.log10(args.lr_max), args.lrs)
    train = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, warmup_steps=max(1, args.steps // 10),
                        eval_batches=args.eval_batches, weight_decay=0.1, seed=0)
    data = load_data(args, train)
    results = {"widths": widths, "lrs": lrs.tolist(), "steps": args.steps, "batch": args.batch, "seq": args.seq,
               "layers": args.layers, "device": jax.devices()[0].device_kind}
    for parameterization in ("standard", "mup"):
        results[parameterization] = {}
        for width in widths:
            start = time.perf_counter()
            cfg = width_config(width, parameterization, widths[0], args.layers, args.vocab, args.seq,
                               args.head_dim, args.dtype)
            losses = sweep_learning_rates(cfg, train, lrs, data)
            best = int(np.argmin(losses))
            results[parameterization][str(width)] = {
                "losses": [float(v) if np.isfinite(v) else None for v in losses],  # None: diverged
                "best_lr": float(lrs[best]), "best_loss": float(losses[best])}
            print(f"{parameterization} width {width}: best lr {lrs[best]:.3g} (loss {losses[best]:.4f}); "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
    return results


def plot(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(results["widths"])))
    lrs = np.array(results["lrs"])
    for axes, parameterization in zip(panels, ("standard", "mup")):
        for width, color in zip(results["widths"], colors):
            entry = results[parameterization][str(width)]
            losses = np.array([np.nan if v is None else v for v in entry["losses"]])
            shown = np.isfinite(losses)
            axes.plot(lrs[shown], losses[shown], marker="o", ms=3, color=color, label=f"width {width}")
            axes.scatter([entry["best_lr"]], [entry["best_loss"]], marker="*", s=150, color=color,
                         edgecolor="k", zorder=3)
        axes.set_xscale("log")
        axes.set_xlabel("learning rate")
        axes.set_title(f"{parameterization}: best LR starred")
        axes.grid(alpha=0.3)
    finite = [v for p in ("standard", "mup") for w in results["widths"] for v in results[p][str(w)]["losses"]
              if v is not None]
    panels[0].set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 2.0))
    panels[0].set_ylabel(f"held-out loss after {results['steps']} steps")
    panels[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for lr_transfer.json and lr_transfer.png")
    parser.add_argument("--widths", default="128,256,512,1024", help="embed dims (default 128,256,512,1024)")
    parser.add_argument("--lrs", type=int, default=8, help="learning rates, log-spaced (default 8)")
    parser.add_argument("--lr-min", type=float, default=3e-4)
    parser.add_argument("--lr-max", type=float, default=1e-1)
    parser.add_argument("--steps", type=int, default=250, help="AdamW steps per run (default 250)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="layers (default 2)")
    parser.add_argument("--head-dim", type=int, default=32, help="head dim (default 32)")
    parser.add_argument("--vocab", type=int, default=512, help="BPE vocabulary of the corpus (default 512)")
    parser.add_argument("--corpus-bytes", type=int, default=8_000_000, help="built-in corpus size (default 8 MB)")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches (default 8)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
    parser.add_argument("--cache-dir", default=None, help="tokenizer and data cache of the training CLI")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = run(args)
    with open(os.path.join(args.out, "lr_transfer.json"), "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)
    print(f"wrote {plot(results, os.path.join(args.out, 'lr_transfer.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
