"""MoE layer forward+backward throughput against a dense SwiGLU MLP of the same active parameters.

    python tools/bench_moe.py                                  # GPU shape: 64 experts, top-8
    python tools/bench_moe.py --tokens 256 --embed 48 --experts 8 --top-k 2 --expert-mlp 40 --steps 2

The dense MLP has mlp dim top_k * expert_mlp (+ shared), so both do the same matmul FLOPs per
token; the ratio MoE/dense tokens per second is what dropless dispatch (sort, ragged_dot,
unsort) costs. Prints one line per variant and the ratio.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jaxlm import moe
from jaxlm.config import ModelConfig
from jaxlm.layers import swiglu


def timed(fn, *args, steps: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--embed", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--expert-mlp", type=int, default=1024)
    parser.add_argument("--dispatch", default="dropless", choices=["dropless", "capacity"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    # Attention shapes do not matter here; heads of 64 keep any embed width valid.
    cfg = ModelConfig(embed_dim=args.embed, num_heads=max(args.embed // 64, 1), num_kv_heads=1,
                      head_dim=64, num_experts=args.experts, top_k=args.top_k,
                      expert_mlp_dim=args.expert_mlp, mlp_dim=args.expert_mlp,
                      moe_dispatch=args.dispatch, compute_dtype=args.dtype)
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 8)
    D, E, F, k = args.embed, args.experts, args.expert_mlp, args.top_k
    normal = lambda key, shape, scale: (scale * jax.random.normal(key, shape)).astype(dtype)
    p = {"router": normal(keys[0], (D, E), 0.02).astype(jnp.float32),
         "router_bias": jnp.zeros((E,), jnp.float32),
         "gate": normal(keys[1], (E, D, F), 0.02), "up": normal(keys[2], (E, D, F), 0.02),
         "down": normal(keys[3], (E, F, D), 0.02)}
    dense = {"gate": normal(keys[4], (D, k * F), 0.02), "up": normal(keys[5], (D, k * F), 0.02),
             "down": normal(keys[6], (k * F, D), 0.02)}
    x = normal(keys[7], (1, args.tokens, D), 1.0)

    def moe_loss(p, x):
        y, aux = moe.moe_mlp(cfg, p, x)
        return jnp.sum(y.astype(jnp.float32) ** 2) + aux["balance_loss"]

    def dense_loss(p, x):
        return jnp.sum(swiglu(x, p["gate"], p["up"], p["down"]).astype(jnp.float32) ** 2)

    moe_step = jax.jit(jax.grad(moe_loss, argnums=(0, 1)))
    dense_step = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))
    moe_time = timed(moe_step, p, x, steps=args.steps)
    dense_time = timed(dense_step, dense, x, steps=args.steps)
    flops = 6 * 3 * D * F * k * args.tokens
    device = jax.devices()[0].device_kind
    for name, seconds in (("dense", dense_time), (f"moe {args.dispatch}", moe_time)):
        print(f"{name:>14}: {args.tokens / seconds:,.0f} tokens/s, {flops / seconds / 1e12:.1f} "
              f"TFLOP/s (fwd+bwd, {device})")
    print(f"moe / dense throughput: {dense_time / moe_time:.2f}x (target >= 0.7)")


if __name__ == "__main__":
    main()
