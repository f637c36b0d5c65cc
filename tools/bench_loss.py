"""Output layer + cross-entropy, forward and backward: full logits vs chunked (XLA or Triton).

    python tools/bench_loss.py                       # the 1b preset's head: D 2048, V 128256, tied
    python tools/bench_loss.py --batch 2 --seq 128 --embed 64 --vocab 1000   # small, runs on CPU

Times jit(value_and_grad) of the summed loss with respect to the hidden states and the output
weight (what a train step does after the last layer), median of --repeats after a warm-up; also
XLA's temporary memory for each (compiled memory analysis). On a GPU it first checks the Triton
kernel against the jnp reference on one chunk of the same shape. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import loss
from pallas_kernels import triton_cross_entropy


def full_loss(hidden, weight, targets, mask):
    logits = jnp.einsum("btd,vd->btv", hidden, weight).astype(jnp.float32)
    token_loss, _ = loss.cross_entropy(logits, targets)
    return jnp.sum(token_loss * mask)


def chunked(chunk, kernel):
    def fn(hidden, weight, targets, mask):
        return loss.chunked_loss_sums(hidden, weight, targets, mask, vocab_major=True, chunk=chunk,
                                      kernel=kernel)[0]
    return fn


def time_it(fn, args, repeats):
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    compiled = step.lower(*args).compile()
    memory = compiled.memory_analysis()
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    value = float(step(*args)[0])
    return {"ms": 1e3 * statistics.median(times), "loss": value,
            "temp_gb": None if memory is None else memory.temp_size_in_bytes / 1e9}


def check_kernel(rows, vocab, dtype):
    """Max abs errors of the Triton kernel vs the jnp reference on one chunk."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((rows, vocab)) * 3, dtype)
    targets = jnp.asarray(rng.integers(0, vocab, rows), jnp.int32)
    weights = jnp.asarray(rng.random(rows) < 0.9, jnp.float32)
    kwargs = dict(scale=0.9, z_loss_weight=1e-3)
    got = jax.jit(lambda *a: triton_cross_entropy.softmax_cross_entropy(*a, **kwargs))(logits, targets, weights)
    want = triton_cross_entropy.softmax_cross_entropy_reference(logits, targets, weights, **kwargs)
    names = ("loss", "lse", "dlogits")
    return {n: float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
            for n, g, w in zip(names, got, want)}


def sweep_kernel(rows, vocab, repeats):
    """ms of the per-chunk softmax/gradient step alone: the jnp reference under XLA vs the Triton
    kernel per (splits, block, num_warps)."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((rows, vocab)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, vocab, rows), jnp.int32)
    weights = jnp.ones((rows,), jnp.float32)
    variants = {"xla": triton_cross_entropy.softmax_cross_entropy_reference}
    for splits in (1, 4, 8, 16):
        for block, warps in ((1024, 4), (2048, 8), (4096, 8)):
            variants[f"triton_s{splits}_b{block}_w{warps}"] = functools.partial(
                triton_cross_entropy.softmax_cross_entropy, block=block, num_warps=warps, splits=splits)
    result = {}
    for name, fn in variants.items():
        step = jax.jit(lambda a, b, c, fn=fn: fn(a + 0, b, c))  # a + 0: a fresh buffer to alias
        try:
            jax.block_until_ready(step(logits, targets, weights))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(step(logits, targets, weights))
                times.append(time.perf_counter() - start)
            result[name] = 1e3 * statistics.median(times)
        except Exception as error:  # noqa: BLE001 - a config Triton cannot compile is a result too
            result[name] = str(error).splitlines()[0][:200]
        print("kernel", name, result[name], flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--embed", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunks", default="256,512,1024")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", action="store_true",
                        help="also time the Triton kernel alone per (splits, block, num_warps) vs XLA")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((args.batch, args.seq, args.embed)), jnp.bfloat16)
    weight = jnp.asarray(rng.standard_normal((args.vocab, args.embed)) * 0.02, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)
    mask = jnp.ones((args.batch, args.seq), jnp.float32)
    data = (hidden, weight, targets, mask)
    result = {"device": jax.devices()[0].device_kind, "shape": vars(args), "runs": {}}
    kernels = ["xla"]
    if triton_cross_entropy.available():
        try:
            result["triton_check_bf16"] = check_kernel(args.batch * 256, args.vocab, jnp.bfloat16)
            kernels.append("triton")
        except Exception as error:  # noqa: BLE001 - report it and time the XLA paths anyway
            result["triton_check_bf16"] = {"error": str(error).splitlines()[0][:300]}
        print("triton kernel vs reference:", result["triton_check_bf16"], flush=True)
    if args.sweep and "triton" in kernels:
        result["kernel_sweep_ms"] = sweep_kernel(args.batch * 256, args.vocab, args.repeats)
    runs = {"full": full_loss}
    for chunk in map(int, args.chunks.split(",")):
        for kernel in kernels:
            runs[f"chunk{chunk}_{kernel}"] = chunked(chunk, kernel)
    for name, fn in runs.items():
        try:
            result["runs"][name] = time_it(fn, data, args.repeats)
        except Exception as error:  # noqa: BLE001 - an out-of-memory run is a result too
            result["runs"][name] = {"error": str(error).splitlines()[0][:300]}
        print(name, result["runs"][name], flush=True)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
