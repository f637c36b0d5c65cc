"""MoE throughput: the layer (forward+backward) against a dense SwiGLU MLP of the same active
parameters, and the grouped matmul kernel alone against a dense matmul and jax.lax.ragged_dot.

    python tools/bench_moe.py                       # GPU shapes, ~1 minute; --sweep: + tiles
    python tools/bench_moe.py --impl ragged_dot     # the layer with XLA's ragged_dot instead
    python tools/bench_moe.py --skip-kernel --profile DIR   # + kernel-time table of the layer
    python tools/bench_moe.py --tokens 256 --embed 48 --experts 8 --top-k 2 --expert-mlp 40 \
        --steps 2 --rows 256 --kernel-k 48 --kernel-n 40 --kernel-groups 8   # CPU smoke run

Layer: the dense MLP has mlp dim top_k * expert_mlp, so both do the same matmul FLOPs per
token; the ratio MoE/dense tokens per second is what dropless dispatch (sort, grouped matmul,
unsort) costs. `--impl pallas` (default on GPU) runs pallas_kernels/grouped_matmul.py through
`moe.set_grouped_matmul`; off GPU it runs the kernel in interpret mode.

Kernel: x [rows, K] @ w[g] ([groups, K, N]) with group sizes drawn from a multinomial over
equally likely groups (sum = rows), bf16. FLOPs: 2 * rows * K * N forward, 3x that for
forward+backward (dx and dw). On Hopper the kernel rows come twice: `pallas` (forward and dx on
Mosaic GPU) and `pallas triton`; each one's forward and dx are checked against ragged_dot
(relative L2 error). References: one dense matmul [rows, K] @ [K, N] (the roofline a grouped
matmul aims at), the batched einsum over equal groups [G, rows/G, K] x [G, K, N], and ragged_dot
(on GPU a masked dense computation over all groups: slow, and it materializes [G, rows, K]; an
out-of-memory error prints and the run goes on). `--sweep` times a few tile configs of each of
the three Triton kernels (forward, transposed forward = dx, weight gradient), the others kept at
their defaults. Timing: jit, one warm-up call, mean over --steps calls (the layer: median of
--repeats such means, MoE and dense alternating).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import moe
from jaxlm.config import ModelConfig
from jaxlm.layers import swiglu
from pallas_kernels.grouped_matmul import GmmBlocks, default_config, grouped_matmul

# (block_m, block_k, block_n, num_warps, num_stages); Triton matmul-tutorial-like tiles.
SWEEP = [(128, 64, 128, 8, 3), (128, 64, 256, 8, 3), (128, 64, 256, 8, 4), (256, 64, 128, 8, 3),
         (128, 32, 256, 8, 5), (128, 128, 128, 8, 3), (64, 128, 256, 8, 3), (64, 256, 128, 8, 3),
         (128, 128, 256, 8, 2)]


def timed(fn, *args, steps: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def report(name: str, flops: float, fn, *args, steps: int) -> None:
    """Time fn and print one line; an error (out of memory, say) prints and the run goes on."""
    try:
        seconds = timed(fn, *args, steps=steps)
    except Exception:  # noqa: BLE001 - a benchmark row must not end the run
        print(f"{name:>44}: failed: {traceback.format_exc(limit=1).splitlines()[-1][:160]}")
        return
    print(f"{name:>44}: {seconds * 1e3:8.3f} ms  {flops / seconds / 1e12:7.1f} TFLOP/s")


def bench_layer(args, dtype) -> None:
    # Attention shapes do not matter here; heads of 64 keep any embed width valid.
    cfg = ModelConfig(embed_dim=args.embed, num_heads=max(args.embed // 64, 1), num_kv_heads=1,
                      head_dim=64, num_experts=args.experts, top_k=args.top_k,
                      expert_mlp_dim=args.expert_mlp, mlp_dim=args.expert_mlp,
                      moe_dispatch=args.dispatch, compute_dtype=args.dtype)
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
    # The expert weights in the form the model's forward hands the layer (training stacks gate
    # and up where it casts the float32 master weights, a cast the dense MLP pays as well).
    p = moe.fuse_gate_up(p)

    def moe_loss(p, x):
        y, aux = moe.moe_mlp(cfg, p, x)
        return jnp.sum(y.astype(jnp.float32) ** 2) + aux["balance_loss"]

    def dense_loss(p, x):
        return jnp.sum(swiglu(x, p["gate"], p["up"], p["down"]).astype(jnp.float32) ** 2)

    moe_step = jax.jit(jax.grad(moe_loss, argnums=(0, 1)))
    dense_step = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))
    # Alternating repeats, medians: the dense time alone moved 648-716 TFLOP/s between runs.
    times = [(timed(moe_step, p, x, steps=args.steps), timed(dense_step, dense, x, steps=args.steps))
             for _ in range(args.repeats)]
    moe_time, dense_time = (float(np.median(column)) for column in zip(*times))
    flops = 6 * 3 * D * F * k * args.tokens
    device = jax.devices()[0].device_kind
    label = f"moe {args.dispatch}" + (f" ({args.impl})" if args.dispatch == "dropless" else "")
    for name, seconds in (("dense", dense_time), (label, moe_time)):
        print(f"{name:>24}: {args.tokens / seconds:,.0f} tokens/s, {flops / seconds / 1e12:.1f} "
              f"TFLOP/s (fwd+bwd, {device})")
    ratios = sorted(d / m for m, d in times)
    print(f"moe / dense throughput: {dense_time / moe_time:.2f}x (target >= 0.7; median of "
          f"{args.repeats} alternating repeats, per repeat {ratios[0]:.3f}..{ratios[-1]:.3f})")
    if args.profile:
        profile_layer(args.profile, moe_step, p, x)


def profile_layer(out_dir: str, step, *args, repeats: int = 5) -> None:
    """Kernel-time table of the MoE layer's forward+backward (tools/profile_train_step.py's)."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_train_step import summarize_trace
    jax.block_until_ready(step(*args))
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for _ in range(repeats):
            out = step(*args)
        jax.block_until_ready(out)
    summarize_trace(out_dir, repeats, top=25, unit="layer fwd+bwd")


def kernel_inputs(args, dtype):
    rows, K, N, G = args.rows, args.kernel_k, args.kernel_n, args.kernel_groups
    sizes = np.random.default_rng(0).multinomial(rows, np.full(G, 1.0 / G)).astype(np.int32)
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (rows, K)).astype(dtype)
    w = (0.02 * jax.random.normal(keys[1], (G, K, N))).astype(dtype)
    dy = jax.random.normal(keys[2], (rows, N)).astype(dtype)
    return x, w, dy, jnp.asarray(sizes)


def gmm_fns(config, interpret: bool):
    """(forward, transposed forward, forward+backward) of the kernel, jitted."""
    forward = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, config=config, interpret=interpret))
    transposed = jax.jit(lambda dy, w, s: grouped_matmul(dy, w, s, transpose_rhs=True,
                                                         config=config, interpret=interpret))

    def loss(x, w, dy, s):
        out = grouped_matmul(x, w, s, config=config, interpret=interpret)
        return jnp.sum(out.astype(jnp.float32) * dy.astype(jnp.float32))

    # NOTE: value_and_grad: with jax.grad alone the forward kernel is dead code (the cotangents
    # of this loss need only dy), and forward+backward timed dx and dw only.
    return forward, transposed, jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bench_kernel(args, dtype, interpret: bool) -> None:
    x, w, dy, sizes = kernel_inputs(args, dtype)
    rows, K, N, G = args.rows, args.kernel_k, args.kernel_n, args.kernel_groups
    flops = 2 * rows * K * N
    print(f"grouped matmul x [{rows}, {K}] @ w [{G}, {K}, {N}], group sizes "
          f"{int(sizes.min())}..{int(sizes.max())}, {jnp.dtype(dtype).name}, "
          f"{jax.devices()[0].device_kind}")
    # On Hopper "pallas" runs the forward and dx on Mosaic GPU; "pallas triton" is the Triton
    # kernels everywhere (the weight gradient is Triton in both).
    backends = [("pallas", default_config())]
    if not interpret:
        backends.append(("pallas triton", dataclasses.replace(default_config(), backend="triton")))
    outputs = {}
    for name, config in backends:
        forward, transposed, both = gmm_fns(config, interpret)
        report(f"{name} forward", flops, forward, x, w, sizes, steps=args.steps)
        report(f"{name} transposed (dx)", flops, transposed, dy, w, sizes, steps=args.steps)
        report(f"{name} forward+backward", 3 * flops, both, x, w, dy, sizes, steps=args.steps)
        outputs[name] = (forward(x, w, sizes), transposed(dy, w, sizes))
    report("dense matmul [M,K]@[K,N]", flops, jax.jit(jnp.matmul), x, w[0], steps=args.steps)
    if rows % G == 0:
        batched = jax.jit(lambda x, w: jnp.einsum("gmk,gkn->gmn", x.reshape(G, rows // G, K), w))
        report("batched einsum (equal groups)", flops, batched, x, w, steps=args.steps)
    report("jax.lax.ragged_dot forward", flops, jax.jit(jax.lax.ragged_dot), x, w, sizes,
           steps=max(1, min(args.steps, 3)))
    check_against_ragged_dot(outputs, x, w, dy, sizes)


def check_against_ragged_dot(outputs, x, w, dy, sizes) -> None:
    """Relative L2 error of each kernel's forward and dx against XLA's ragged_dot (an
    independent implementation; float32 accumulation in both)."""
    try:
        want = (jax.jit(jax.lax.ragged_dot)(x, w, sizes),
                jax.jit(lambda dy, w, s: jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), s))(
                    dy, w, sizes))
    except Exception as err:  # noqa: BLE001 (out of memory: the timing rows still stand)
        print(f"check against ragged_dot skipped: {type(err).__name__}: {str(err)[:120]}")
        return
    for name, got in outputs.items():
        errors = [float(jnp.linalg.norm((g - r).astype(jnp.float32)) /
                        jnp.linalg.norm(r.astype(jnp.float32))) for g, r in zip(got, want)]
        print(f"{name}: relative error vs ragged_dot forward {errors[0]:.2e}, dx {errors[1]:.2e}")


def sweep_kernel(args, dtype, interpret: bool) -> None:
    x, w, dy, sizes = kernel_inputs(args, dtype)
    flops = 2 * args.rows * args.kernel_k * args.kernel_n
    base, steps = default_config(), max(1, args.steps // 2)
    print("sweep (block_m, block_k, block_n, num_warps, num_stages); others at their defaults")
    for tiles in SWEEP:
        blocks = GmmBlocks(*tiles)
        forward = gmm_fns(dataclasses.replace(base, forward=blocks), interpret)[0]
        transposed = gmm_fns(dataclasses.replace(base, forward_transposed=blocks), interpret)[1]
        both = gmm_fns(dataclasses.replace(base, weight_grad=blocks), interpret)[2]
        report(f"{tiles} forward", flops, forward, x, w, sizes, steps=steps)
        report(f"{tiles} transposed", flops, transposed, dy, w, sizes, steps=steps)
        report(f"{tiles} fwd+bwd (as weight_grad)", 3 * flops, both, x, w, dy, sizes, steps=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--embed", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--expert-mlp", type=int, default=1024)
    parser.add_argument("--dispatch", default="dropless", choices=["dropless", "capacity"])
    parser.add_argument("--impl", choices=["pallas", "pallas_triton", "ragged_dot"], default=None,
                        help="grouped matmul of dropless dispatch (default: pallas on GPU, "
                             "ragged_dot elsewhere; pallas_triton: no Mosaic GPU kernels)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="layer bench: alternating repeats")
    parser.add_argument("--rows", type=int, default=16384 * 8, help="kernel bench: rows of x")
    parser.add_argument("--kernel-k", type=int, default=2048)
    parser.add_argument("--kernel-n", type=int, default=1024)
    parser.add_argument("--kernel-groups", type=int, default=64)
    parser.add_argument("--skip-layer", action="store_true", help="only the kernel benchmark")
    parser.add_argument("--skip-kernel", action="store_true", help="only the layer benchmark")
    parser.add_argument("--sweep", action="store_true", help="also time a few kernel tiles")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="also trace the MoE layer into DIR and print where its time goes")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    args.impl = args.impl or ("pallas" if on_gpu else "ragged_dot")
    interpret = not on_gpu
    moe.set_grouped_matmul("pallas_interpret" if interpret and args.impl != "ragged_dot"
                           else args.impl)
    dtype = jnp.dtype(args.dtype)
    if not args.skip_layer:
        bench_layer(args, dtype)
    if not args.skip_kernel:
        bench_kernel(args, dtype, interpret)
    if args.sweep:
        sweep_kernel(args, dtype, interpret)


if __name__ == "__main__":
    main()
