"""Coordinate check for muP (Yang et al. 2021, "Tensor Programs V", sec. 7 and fig. 5).

    python tools/coord_check.py --widths 32,64,128,256,512 --steps 4 --out docs/mup_coord_check.png

Trains models of growing width (embed_dim; heads of 16 dims, mlp 8/3 x width, 2 layers) for a
few Adam steps on one fixed batch, under the standard parameterization and under muP (base width
= the smallest), and records the RMS of the activations (embedding output, each layer's residual
stream, logits) before every step. Under muP the curves over width stay flat; under the standard
parameterization they grow with width once training moves the weights (Adam's update of a
width-n matrix moves its output by ~ lr x n). Writes the PNG (rows: activations, columns: the two
parameterizations, x: width, one line per step) and, with --json, the numbers. Runs on CPU in
well under a minute at the default widths.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import loss, model, mup, optim
from jaxlm.config import ModelConfig, TrainConfig
from jaxlm.layers import rms_norm, rope_inverse_frequencies

HEAD_DIM = 16


def width_config(width: int, parameterization: str, base_width: int, num_layers: int = 2,
                 vocab_size: int = 97, seq_len: int = 32, head_dim: int = HEAD_DIM,
                 compute_dtype: str = "float32") -> ModelConfig:
    """A model of the width family: width / head_dim heads, mlp 8/3 x width (multiple of 8)."""
    heads = width // head_dim
    return ModelConfig(vocab_size=vocab_size, embed_dim=width, num_layers=num_layers, num_heads=heads,
                       num_kv_heads=heads, head_dim=head_dim, mlp_dim=8 * math.ceil(width / 3),
                       max_seq_len=seq_len, compute_dtype=compute_dtype, parameterization=parameterization,
                       mup_base_width=base_width)


def hidden_states(cfg: ModelConfig, params: dict, tokens: jax.Array) -> dict[str, jax.Array]:
    """Embedding output, each layer's output and the logits of a dense model, no cache.

    NOTE: mirrors `model.forward_with_aux`'s dense path layer by layer (tests check that its
    logits equal `model.forward`'s, so a change there shows up).
    """
    batch, length = tokens.shape
    dtype = jnp.dtype(cfg.compute_dtype)
    ctx = {"positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
           "segment_ids": None, "plain_causal": True,
           "inverse_frequencies": rope_inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta,
                                                           cfg.rope_scaling)}
    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    states = {"embedding": x}
    blocks = model._cast_weights(params["blocks"], dtype)
    for layer in range(cfg.num_layers):
        x, _ = model._block(cfg, ctx, x, (jax.tree.map(lambda w: w[layer], blocks), None))
        states[f"layer {layer}"] = x
    logits = jnp.einsum("btd,dv->btv", rms_norm(x, params["final_norm"], cfg.norm_eps), params["lm_head"])
    if cfg.parameterization == "mup":
        logits = logits * mup.output_scale(cfg)
    states["logits"] = logits.astype(jnp.float32)
    return states


def fixed_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> dict:
    """Arithmetic sequences mod the vocabulary: learnable, so the gradients carry signal.
    Every position counts (no document boundaries), so the loss is a plain mean."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, vocab_size, (batch_size, 1))
    strides = rng.integers(1, 7, (batch_size, 1))
    tokens = (starts + strides * np.arange(seq_len + 1)) % vocab_size
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


def activation_rms_over_steps(cfg: ModelConfig, lr: float, steps: int, batch: dict, seed: int = 0) -> list[dict]:
    """[{activation name: RMS}] before each of `steps` Adam steps (no clipping, no decay)."""
    train = TrainConfig(steps=1000, lr=lr, warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
    tx = optim.make_optimizer(cfg, train)
    params = model.init_params(cfg, jax.random.key(seed))
    state = tx.init(params)

    def objective(params):
        states = hidden_states(cfg, params, batch["inputs"])
        rms = {name: jnp.sqrt(jnp.mean(jnp.square(x))) for name, x in states.items()}
        return jnp.mean(loss.cross_entropy(states["logits"], batch["targets"])[0]), rms

    @jax.jit
    def step(params, state):
        grads, rms = jax.grad(objective, has_aux=True)(params)
        updates, state = tx.update(grads, state, params)
        return jax.tree.map(jnp.add, params, updates), state, rms

    records = []
    for _ in range(steps):
        params, state, rms = step(params, state)
        records.append({name: float(value) for name, value in rms.items()})
    return records


def coordinate_check(widths: Sequence[int], lr: float, steps: int, num_layers: int = 2,
                     batch_size: int = 4, seq_len: int = 32, seed: int = 0) -> dict:
    """{parameterization: {width: records of `activation_rms_over_steps`}}; base width = min."""
    batch = fixed_batch(97, batch_size, seq_len, seed)
    results = {}
    for parameterization in ("standard", "mup"):
        results[parameterization] = {
            width: activation_rms_over_steps(width_config(width, parameterization, min(widths), num_layers,
                                                          seq_len=seq_len), lr, steps, batch, seed)
            for width in widths}
    return results


def plot(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(next(iter(results.values())).values()))[0])
    figure, grid = plt.subplots(len(names), 2, figsize=(9, 2.4 * len(names)), squeeze=False)
    for column, (parameterization, by_width) in enumerate(results.items()):
        widths = sorted(by_width)
        steps = len(by_width[widths[0]])
        colors = plt.cm.viridis(np.linspace(0, 0.9, steps))
        for row, name in enumerate(names):
            axes = grid[row][column]
            for t in range(steps):
                axes.plot(widths, [by_width[w][t][name] for w in widths], marker="o", ms=3,
                          color=colors[t], label=f"step {t}")
            axes.set_xscale("log", base=2)
            axes.set_yscale("log")
            axes.set_title(f"{parameterization}: {name}", fontsize=9)
            axes.grid(alpha=0.3)
        grid[-1][column].set_xlabel("width (embed_dim)")
    grid[0][0].legend(fontsize=7)
    figure.suptitle("Coordinate check: activation RMS against width, before each Adam step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="32,64,128,256,512", help="comma-separated embed dims")
    parser.add_argument("--steps", type=int, default=4, help="Adam steps recorded (default 4)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    parser.add_argument("--layers", type=int, default=2, help="layers (default 2)")
    parser.add_argument("--out", default="coord_check.png", help="PNG path")
    parser.add_argument("--json", default=None, help="also write the RMS values here")
    args = parser.parse_args(argv)
    widths = sorted(int(w) for w in args.widths.split(","))
    if any(w % HEAD_DIM or w <= 0 for w in widths):
        parser.error(f"--widths must be positive multiples of {HEAD_DIM}, got {args.widths}")
    results = coordinate_check(widths, args.lr, args.steps, args.layers)
    print(f"wrote {plot(results, args.out)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=1)
    for parameterization, by_width in results.items():
        last = {w: records[-1]["logits"] for w, records in by_width.items()}
        print(f"{parameterization}: logits RMS at step {args.steps - 1}: "
              + ", ".join(f"w{w} {v:.3g}" for w, v in last.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
