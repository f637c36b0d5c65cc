"""Attention kernel throughput: TFLOP/s forward and forward+backward, one row per implementation.

    python tools/bench_attention.py --quick                      # key targets, < 5 minutes
    python tools/bench_attention.py --seqs 512,2048,8192 --head-dims 128 --impls ours,cudnn
    python tools/bench_attention.py --quick --sweep              # also try a few tile configs

Implementations: `ours` (pallas_kernels.flash_attention with its default backends: Mosaic GPU where
it applies on Hopper, else Triton), `ours-triton` (all Triton), `ours-mosaic` (Mosaic GPU forward,
Triton backward), `ours-mosaic-bwd` (forward and backward on Mosaic GPU), `cudnn`
(jax.nn.dot_product_attention(implementation="cudnn")), `mha` (JAX's bundled Pallas
jax.experimental.pallas.ops.gpu.attention.mha, no GQA) and `xla` (materialized scores; skipped past
--xla-max-seq). Inputs are bf16 [B, T, N, H] with N = 2048 / H heads and B so that B x T >= 32768
tokens and B x N >= 64.

FLOP convention (the FlashAttention papers'): forward = 4 B N T S H (two matmuls), halved when
causal; forward+backward = 3.5 x forward (the backward is 2.5 x: five matmuls of the same size).
Packed documents (`--packed`, in --quick) time causal attention over documents of random lengths
packed into each row: ours and mha with segment ids, cuDNN with the equivalent explicit mask;
their TFLOP/s use the plain causal count (a nominal rate: compare times).

Timing: jit, `--warmup` calls, then the median over `--repeats` of host time around
`block_until_ready`. Results print as a table and go to --out (JSON, rewritten after every
row); --plot writes a PNG if matplotlib is installed (`--plot P --plot-from A.json,B.json` plots
earlier runs without timing anything). Every (implementation, shape) runs in its own try/except:
an error prints and the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.attention import make_mask
from pallas_kernels.flash_attention import KernelBlocks, default_config, flash_attention

EMBED = 2048
MIN_TOKENS = 32768
SWEEP_FORWARD = [(128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 2)]
# The backward's two kernels are swept one at a time, the other kept at its default.
SWEEP_DKV = [(64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2), (128, 128, 8, 2)]
SWEEP_DQ = [(128, 32, 4, 2), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)]


def shape_for(seq: int, head_dim: int):
    num_heads = EMBED // head_dim
    batch = max(MIN_TOKENS // seq, -(-64 // num_heads))
    return batch, num_heads


def forward_flops(batch, num_heads, seq, head_dim, causal):
    flops = 4 * batch * num_heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def packed_segments(batch, seq, seed=0):
    """Segment ids [B, T] of documents with lengths uniform in [seq/16, seq/2]."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(int(rng.integers(seq // 16, seq // 2 + 1)))
        rows.append(np.repeat(np.arange(len(lengths)), lengths)[:seq])
    return jnp.asarray(np.stack(rows), jnp.int32)


def packed_causal_mask(segment_ids):
    """The explicit [B, 1, T, T] mask of causal attention inside each packed document."""
    positions = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    return make_mask(positions, positions, segment_ids, segment_ids)[:, None]


def attention_fn(impl, causal, segment_ids, config=None):
    """(q, k, v) -> out for one implementation; segment ids close over as constants."""
    if impl.startswith("ours"):
        forward, backward = {"ours": ("auto", "auto"), "ours-triton": ("triton", "triton"),
                             "ours-mosaic": ("mosaic_gpu", "triton"),
                             "ours-mosaic-bwd": ("mosaic_gpu", "mosaic_gpu")}[impl]

        def ours(q, k, v):
            cfg = dataclasses.replace(config or default_config(q.shape[-1]),
                                      forward_backend=forward, backward_backend=backward)
            return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, config=cfg)
        return ours
    if impl == "cudnn":
        if segment_ids is None:
            return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                implementation="cudnn")
        mask = packed_causal_mask(segment_ids)
        if not causal:
            raise ValueError("packed documents are benchmarked causal only")
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask,
                                                            implementation="cudnn")
    if impl == "mha":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu.attention import mha
        return lambda q, k, v: mha(q, k, v, segment_ids, sm_scale=q.shape[-1] ** -0.5,
                                   causal=causal)
    if impl == "xla":
        if segment_ids is None:
            return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                implementation="xla")
        mask = packed_causal_mask(segment_ids)
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask,
                                                            implementation="xla")
    raise ValueError(f"unknown implementation {impl!r}")


def time_it(fn, args, warmup, repeats):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(impl, seq, head_dim, causal, mode, args, segment_ids=None, config=None,
              label=None):
    batch, num_heads = shape_for(seq, head_dim)
    shape = (batch, seq, num_heads, head_dim)
    keys = jax.random.split(jax.random.key(seq + head_dim), 4)  # on the device: numpy takes seconds
    q, k, v, do = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
    attend = attention_fn(impl, causal, segment_ids, config)
    if mode == "fwd":
        fn, inputs, factor = jax.jit(attend), (q, k, v), 1.0
    else:
        def fwd_bwd(q, k, v, do):
            out, vjp = jax.vjp(attend, q, k, v)
            return out, vjp(do)
        fn, inputs, factor = jax.jit(fwd_bwd), (q, k, v, do), 3.5
    seconds = time_it(fn, inputs, args.warmup, args.repeats)
    flops = factor * forward_flops(batch, num_heads, seq, head_dim, causal)
    return dict(impl=label or impl, seq=seq, head_dim=head_dim, causal=causal, mode=mode,
                batch=batch, num_heads=num_heads, packed=segment_ids is not None,
                ms=seconds * 1e3, tflops=flops / seconds / 1e12)


class Results(list):
    """The rows so far, rewritten to the JSON file after each one (a killed run keeps them)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def append(self, row):
        super().append(row)
        with open(self.path, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                           flop_convention="fwd 4BNTSH (/2 causal); fwd+bwd 3.5x fwd",
                           results=list(self)), f, indent=1)


def run_guarded(results, *bench_args, **bench_kwargs):
    try:
        row = bench_one(*bench_args, **bench_kwargs)
    except Exception as err:  # noqa: BLE001 (a benchmark reports and goes on)
        row = dict(impl=bench_kwargs.get("label") or bench_args[0], seq=bench_args[1],
                   head_dim=bench_args[2], causal=bench_args[3], mode=bench_args[4],
                   packed=bench_kwargs.get("segment_ids") is not None,
                   error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        traceback.print_exc(limit=2)
    results.append(row)
    print_row(row)


def print_row(row):
    what = f"{row['impl']:<28} seq {row['seq']:>6} H {row['head_dim']:>3} " \
           f"{'causal' if row['causal'] else 'full  '} {'packed' if row['packed'] else '      '} " \
           f"{row['mode']:<6}"
    if "error" in row:
        print(f"{what}  ERROR {row['error']}", flush=True)
    else:
        print(f"{what}  {row['ms']:9.3f} ms  {row['tflops']:7.1f} TFLOP/s", flush=True)


def sweep_configs(head_dim):
    base = default_config(head_dim)
    for blocks in SWEEP_FORWARD:
        yield "fwd", dataclasses.replace(base, forward=KernelBlocks(*blocks))
    for blocks in SWEEP_DKV:
        yield "fwdbwd", dataclasses.replace(base, backward_dkv=KernelBlocks(*blocks))
    for blocks in SWEEP_DQ:
        yield "fwdbwd", dataclasses.replace(base, backward_dq=KernelBlocks(*blocks))


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = [r for r in results if "error" not in r]
    kind = lambda r: "packed" if r["packed"] else ("causal" if r["causal"] else "full")
    panels = sorted({(r["head_dim"], kind(r), r["mode"]) for r in rows})
    cols = min(4, len(panels))
    lines = -(-len(panels) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4 * cols, 3.5 * lines), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (head_dim, what, mode) in zip(axes.flat, panels):
        for impl in sorted({r["impl"] for r in rows}):
            pts = sorted((r["seq"], r["tflops"]) for r in rows if r["impl"] == impl and
                         (r["head_dim"], kind(r), r["mode"]) == (head_dim, what, mode))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"H={head_dim} {what} {mode}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s" + (" (nominal: causal count)" if what == "packed" else ""))
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--causal", choices=("both", "true", "false"), default="both")
    parser.add_argument("--impls", default="ours,cudnn,mha,xla")
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--packed", nargs="?", const="also", choices=("also", "only"),
                        help="also (or only) time packed documents")
    parser.add_argument("--quick", action="store_true",
                        help="causal, H 128, seq 4096, fwd and fwd+bwd, plus packed documents")
    parser.add_argument("--sweep", action="store_true", help="also time a few tile configs (ours)")
    parser.add_argument("--xla-max-seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench_attention.json")
    parser.add_argument("--plot", default=None, help="PNG path (needs matplotlib)")
    parser.add_argument("--plot-from", default=None,
                        help="comma-separated JSON files of earlier runs: plot them, time nothing")
    args = parser.parse_args()
    if args.plot_from:
        if not args.plot:
            parser.error("--plot-from needs --plot PATH")
        rows = [row for path in args.plot_from.split(",")
                for row in json.load(open(path))["results"]]
        plot(rows, args.plot)
        return
    if args.quick:
        args.seqs, args.head_dims, args.causal, args.packed = "4096", "128", "true", True
    seqs = [int(s) for s in args.seqs.split(",")]
    head_dims = [int(h) for h in args.head_dims.split(",")]
    causals = {"both": [True, False], "true": [True], "false": [False]}[args.causal]
    impls, modes = args.impls.split(","), args.modes.split(",")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)

    results = Results(args.out)
    for head_dim in head_dims if args.packed != "only" else []:
        for causal in causals:
            for seq in seqs:
                for impl in impls:
                    if impl == "xla" and seq > args.xla_max_seq:
                        continue
                    for mode in modes:
                        run_guarded(results, impl, seq, head_dim, causal, mode, args)
            if args.sweep:
                for seq in seqs:
                    for mode, config in sweep_configs(head_dim):
                        blocks = config.forward if mode == "fwd" else (config.backward_dkv,
                                                                      config.backward_dq)
                        run_guarded(results, "ours", seq, head_dim, causal, mode, args,
                                    config=config, label=f"ours {_short(blocks)}")
    if args.packed:
        for head_dim in head_dims:
            for seq in seqs:
                batch, _ = shape_for(seq, head_dim)
                segment_ids = packed_segments(batch, seq)
                for impl in impls:
                    if impl == "xla" and seq > args.xla_max_seq:
                        continue
                    for mode in modes:
                        run_guarded(results, impl, seq, head_dim, True, mode, args,
                                    segment_ids=segment_ids)
    print(f"results written to {args.out}")
    if args.plot:
        plot(results, args.plot)


def _short(blocks):
    if isinstance(blocks, tuple):
        return "+".join(_short(b) for b in blocks)
    return f"{blocks.block_q}x{blocks.block_k}w{blocks.num_warps}s{blocks.num_stages}"


if __name__ == "__main__":
    main()
