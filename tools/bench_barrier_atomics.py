"""What a grid barrier costs on the GPU, alone and with the work a barrier-saving fusion would add
(pallas_kernels/fused_decode_kernel.py's barrier: one arrival counter, polled).

    python tools/bench_barrier_atomics.py            # GPU only (the barrier spins)

One kernel of one program per SM runs `--rounds` rounds; each round does its work, then the
grid barrier. Work: none; a plain store of a `--width`-float vector per program; an atomic add of
it into one accumulator, or into C copies (program i adds into copy i mod C, so C-fold less
contention per address). Each variant is a jitted loop of `--calls` kernel calls, median of 5,
printed per round as JSON lines; the atomic variants also print the accumulated value, which
must be the exact sum over programs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import fused_decode, fused_decode_kernel

CHUNK = 256


def _kernel(counter_in, acc_in, part_in, counter, acc, part, *, plan, mode, copies, rounds, width):
    del counter_in, acc_in, part_in  # aliased to the outputs
    pid = pl.program_id(0)

    def one_round(r, polls):
        value = jnp.full((CHUNK,), 1.0, jnp.float32) * (pid + 1).astype(jnp.float32)
        for c in range(width // CHUNK):
            if mode == "store":
                plgpu.store(part.at[pid, r, pl.ds(c * CHUNK, CHUNK)], value)
            elif mode == "atomic":
                plgpu.atomic_add(acc, (r, lax.rem(pid, copies), pl.ds(c * CHUNK, CHUNK)), value)
        fused_decode_kernel._arrive(counter, plan)
        return polls + fused_decode_kernel._wait(counter, r + 1, plan)

    polls = lax.fori_loop(0, rounds, one_round, jnp.int32(0))
    # the poll count is used, so the wait loop survives (see fused_decode_kernel._wait)
    part[pid, rounds - 1, pl.ds(0, 16)] = jnp.full((16,), 1.0) * polls.astype(jnp.float32)


def time_variant(mode: str, copies: int, *, programs: int, rounds: int, width: int,
                 calls: int) -> dict:
    plan = fused_decode.Plan(layers=1, embed=width, heads=1, kv_heads=1, head_dim=64, mlp=width,
                             vocab=width, eps=1e-5, programs=programs, splits=1, round_bf16=False,
                             interpret=False)
    shapes = [((1,), jnp.int32), ((rounds, copies, width), jnp.float32),
              ((programs, rounds, width), jnp.float32)]
    kernel = pl.pallas_call(
        functools.partial(_kernel, plan=plan, mode=mode, copies=copies, rounds=rounds,
                          width=width),
        grid=(programs,), out_shape=[jax.ShapeDtypeStruct(s, d) for s, d in shapes],
        input_output_aliases={0: 0, 1: 1, 2: 2},
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=1))

    @jax.jit
    def loop(part):
        def body(i, carry):
            part, total = carry
            zero = jnp.minimum(i, 0)  # fresh counter and accumulator per call
            _, acc, part = kernel(zero[None].astype(jnp.int32),
                                  jnp.zeros((rounds, copies, width), jnp.float32) + zero, part)
            return part, total + acc[0, 0, 0]
        return lax.fori_loop(0, calls, body, (part, jnp.float32(0)))

    part = jnp.zeros((programs, rounds, width), jnp.float32)
    jax.block_until_ready(loop(part))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        out = jax.block_until_ready(loop(part))
        times.append(time.perf_counter() - start)
    row = {"work": mode, "copies": copies, "programs": programs, "width": width,
           "us_per_round": round(statistics.median(times) / calls / rounds * 1e6, 3)}
    if mode == "atomic":
        expected = sum(p + 1 for p in range(programs) if p % copies == 0)
        row.update(accumulated=float(out[1]) / calls, expected=float(expected))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--width", type=int, default=768, help="floats per program and round "
                        f"(a multiple of {CHUNK})")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("needs a GPU: the barrier spins until every program has arrived, and "
                         "interpret mode runs programs one after another")
    if args.width % CHUNK:
        raise SystemExit(f"--width {args.width}: must be a multiple of {CHUNK}")
    programs = int(getattr(jax.devices()[0], "core_count", 0) or 132)
    print(json.dumps({"device": jax.devices()[0].device_kind, "programs": programs}), flush=True)
    for mode, copies in (("none", 1), ("store", 1), ("atomic", 1), ("atomic", 4), ("atomic", 16)):
        print(json.dumps(time_variant(mode, copies, programs=programs, rounds=args.rounds,
                                      width=args.width, calls=args.calls)), flush=True)


if __name__ == "__main__":
    main()
