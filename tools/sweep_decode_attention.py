"""Tile sweep of the split-K decode-attention kernel (pallas_kernels/decode_attention.py) against
cuDNN and XLA on the same shapes, one JSON line per (shape, implementation, tiles).

    python tools/sweep_decode_attention.py                       # the default grid, < 5 min
    python tools/sweep_decode_attention.py --shape 8,32,8,4096,64,1 --backend mosaic \\
        --block-k 64,128 --splits 0,8 --num-stages 2,4

Backends: the kernel's Triton form (every --block-k x --splits x --num-warps x --num-stages)
and its Mosaic GPU form (Hopper; --block-k x --splits x --num-stages, stages being its K/V
slots; 0 in any list is the kernel's default), then cuDNN and XLA. A shape is B,N,K,S,H,T:
batch, query heads, kv heads, cached positions, head dim, new tokens (1 for a decode step,
gamma + 1 for speculative verification), every query at the end of the cache. Each time is
the median over --repeats of a jitted program of --calls dependent calls (each query depends
on the previous output, so no two calls share a read of the cache), divided by --calls; the
fraction is the K/V bytes over the copy bandwidth measured in the same process
(tools/bench_decode.py's copy loop). Every candidate's output is checked against
decode_attention_reference (float32) before it is timed, and once more (untimed, "ragged")
with each sequence at its own length and a sliding window. --profile DIR adds the attention
kernel's own time from a trace (see kernel_times).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_decode import _repeat, copy_bandwidth, timed  # noqa: E402

from pallas_kernels.decode_attention import (decode_attention,  # noqa: E402
                                             decode_attention_reference)

DEFAULT_SHAPES = ("8,32,8,4096,64,1", "64,32,8,768,64,1", "64,12,12,768,64,1", "8,32,8,4096,64,5")


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: comma-separated integers, got {text!r}")
    if any(x < 0 for x in values):
        raise argparse.ArgumentTypeError(f"{name}: values must be >= 0, got {text!r}")
    return values


def _backends(text: str) -> list[str]:
    names = text.split(",")
    if not names or any(name not in ("mosaic", "triton") for name in names):
        raise argparse.ArgumentTypeError(
            f"--backend: comma-separated mosaic, triton; got {text!r}")
    return names


def _shape(text: str) -> tuple[int, ...]:
    values = _ints(text, "--shape")
    if len(values) != 6 or 0 in values:
        raise argparse.ArgumentTypeError(
            f"--shape is B,N,K,S,H,T with every value > 0, got {text!r}")
    batch, heads, kv_heads, length, head_dim, q_len = values
    if heads % kv_heads or q_len > length:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: K must divide N and T <= S")
    return tuple(values)


def inputs(shape, seed: int = 0):
    """bf16 q [B, T, N, H], k, v [B, K, S, H] and the offsets that put the T queries last."""
    batch, heads, kv_heads, length, head_dim, q_len = shape
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, kv_heads, length, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, kv_heads, length, head_dim), jnp.bfloat16)
    return q, k, v, jnp.full((batch,), length - q_len, jnp.int32)


def candidates(args, offsets, q_len: int, interpret: bool):
    """(label, tiles, fn(q, k, v)) for every kernel configuration, then cuDNN and XLA."""
    for backend in args.backend:
        warps = args.num_warps if backend == "triton" else [0]
        for block_k, splits, warp, stages in itertools.product(args.block_k, args.splits, warps,
                                                               args.num_stages):
            tiles = {"block_k": block_k or None, "splits": splits or None,
                     "num_warps": warp or None, "num_stages": stages or None}
            yield backend, tiles, functools.partial(_ours, offsets=offsets, backend=backend,
                                                    interpret=interpret, **tiles)
    if jax.default_backend() == "gpu" and q_len == 1:
        yield "cudnn", {}, _cudnn
    yield "xla", {}, functools.partial(_xla, offsets=offsets)


def _ours(q, k, v, *, offsets, interpret, window=None, **tiles):
    return decode_attention(q, k, v, offsets, sliding_window=window, interpret=interpret,
                            **tiles)


def _cudnn(q, k, v):
    # cuDNN takes [B, S, K, H]; its layout is made outside the timed program (its best case).
    # One query at the cache's end sees every key: no mask (cuDNN's causal mask is top-left,
    # not the bottom-right one several new tokens need, so those shapes skip it).
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def _xla(q, k, v, *, offsets):
    from jaxlm.attention import attention_cached_xla

    return attention_cached_xla(q, k, v, offsets)


def kernel_times(program, args, calls: int, cache_bytes: int, bandwidth: float,
                 out_dir: str) -> dict:
    """From one profiled run of the chained program: the longest kernel's time a call (the
    attention kernel itself, without the layout and combine kernels around it and the gaps
    between launches), all kernels' time a call, and launches a call. Empty without GPU
    events (a CPU run)."""
    from profile_train_step import load_kernel_events

    with jax.profiler.trace(out_dir):
        program(*args).block_until_ready()
    with contextlib.redirect_stdout(sys.stderr):  # (stdout is JSON lines)
        events = load_kernel_events(out_dir)
    if not events:
        return {}
    per_name = collections.Counter()
    for event in events:
        per_name[event["name"]] += event["dur"] * 1e-6 / calls  # (us in the trace)
    name, seconds = per_name.most_common(1)[0]
    return {"kernel": name[:60], "kernel_us": round(seconds * 1e6, 2),
            "kernel_fraction_of_copy": round(cache_bytes / seconds / bandwidth, 3),
            "all_kernels_us": round(sum(per_name.values()) * 1e6, 2),
            "launches_per_call": round(len(events) / calls, 1)}


def ragged_error(shape, fn) -> float:
    """fn's largest error over the output's scale, against the reference, with sequence b at
    length (b + 1) / B of the cache (so some splits see no key) and a window of S / 3."""
    q, k, v, _ = inputs(shape, seed=1)
    batch, length, q_len = shape[0], shape[3], shape[5]
    offsets = jnp.asarray([max(0, (b + 1) * length // batch - q_len) for b in range(batch)],
                          jnp.int32)
    window = max(1, length // 3)
    tiles = dict(fn.keywords, offsets=offsets, window=window)
    out = np.asarray(jax.jit(functools.partial(fn.func, **tiles))(q, k, v), np.float32)
    reference = np.asarray(decode_attention_reference(q, k, v, offsets, sliding_window=window),
                           np.float32)
    return round(float(np.max(np.abs(out - reference))) / float(np.max(np.abs(reference))), 4)


def sweep(args) -> None:
    interpret = jax.default_backend() == "cpu"
    bandwidth = copy_bandwidth(16 << 20 if interpret else 1 << 30)
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                      "copy_GB_per_s": round(bandwidth / 1e9, 1)}), flush=True)
    for shape in args.shape:
        q, k, v, offsets = inputs(shape)
        reference = np.asarray(decode_attention_reference(q, k, v, offsets), np.float32)
        scale = float(np.max(np.abs(reference)))
        cache_bytes = 2 * k.size * k.dtype.itemsize
        layouts = {"cudnn": (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))}
        for index, (label, tiles, fn) in enumerate(candidates(args, offsets, shape[-1],
                                                              interpret)):
            row = {"shape": list(shape), "impl": label, **tiles}
            kv = layouts.get(label, (k, v))
            try:
                out = np.asarray(jax.jit(fn)(q, *kv), np.float32)
                error = float(np.max(np.abs(out - reference))) / scale
                if label in args.backend:
                    row["ragged_error_over_scale"] = ragged_error(shape, fn)
                program = jax.jit(functools.partial(_repeat, fn, args.calls))
                seconds = timed(lambda: program(q, *kv).block_until_ready(),
                                repeats=args.repeats) / args.calls
            except Exception as exc:  # noqa: BLE001: report the candidate and go on
                print(json.dumps({**row, "error": str(exc).splitlines()[0][:200]}), flush=True)
                continue
            row.update({"error_over_scale": round(error, 4), "us": round(seconds * 1e6, 2),
                        "fraction_of_copy": round(cache_bytes / seconds / bandwidth, 3)})
            if args.profile:
                trace_dir = os.path.join(args.profile, "_".join(map(str, shape)), str(index))
                row.update(kernel_times(program, (q, *kv), args.calls, cache_bytes, bandwidth,
                                        trace_dir))
            print(json.dumps(row), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", type=_shape,
                        help=f"B,N,K,S,H,T (repeatable; default {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--backend", type=_backends, default=["mosaic", "triton"],
                        help="the kernel's forms to time: mosaic, triton (default both; "
                             "mosaic needs a Hopper GPU or, on CPU, runs in its interpreter)")
    parser.add_argument("--block-k", type=lambda t: _ints(t, "--block-k"), default=[0],
                        help="keys a loop step (default 0: the kernel's own)")
    parser.add_argument("--splits", type=lambda t: _ints(t, "--splits"), default=[0],
                        help="splits of the cache; 0 = the kernel's choice (default 0)")
    parser.add_argument("--num-warps", type=lambda t: _ints(t, "--num-warps"), default=[0],
                        help="Triton's warps a program (default 0: the kernel's own)")
    parser.add_argument("--num-stages", type=lambda t: _ints(t, "--num-stages"), default=[0],
                        help="Triton's pipelining stages, or the Mosaic kernel's K/V slots "
                             "(default 0: the kernel's own)")
    parser.add_argument("--profile", metavar="DIR",
                        help="also trace one run of each candidate's program under DIR and "
                             "report its longest kernel's time a call (the attention kernel "
                             "alone), all kernels' time and launches a call")
    parser.add_argument("--calls", type=int, default=20, help="dependent calls a program")
    parser.add_argument("--repeats", type=int, default=10, help="timed programs (median)")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        parser.error("--calls and --repeats must be at least 1")
    args.shape = args.shape or [_shape(s) for s in DEFAULT_SHAPES]
    sweep(args)


if __name__ == "__main__":
    main()
