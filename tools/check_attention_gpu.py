"""GPU numerics of the attention kernels: bf16 outputs and grads against a float32 reference.

    python tools/check_attention_gpu.py            # all cases, ~1-2 minutes on an H100
    python tools/check_attention_gpu.py --quick    # the benchmark's key shapes only
    python tools/check_attention_gpu.py --cases GQA,packed   # cases whose names hold a word

For each case, out, dq, dk, dv (jax.vjp with a random cotangent) of `ours` (the Pallas kernels
with the automatic backends), `triton` (all Triton), `mosaic` (Mosaic GPU forward, Triton
backward), `mosbwd` (forward and backward on Mosaic GPU; both Mosaic rows refuse the cases they
do not take, by name), `cudnn` (jax.nn.dot_product_attention(implementation="cudnn"), explicit
mask where the rule needs one) and `mha` (JAX's bundled Pallas kernel, plain MHA only) are
compared with `flash_attention_reference` run in float32 on the same (bf16-rounded) inputs. The
table shows relative L2 errors; a bf16 case passes at <= 2e-2 (cuDNN typically lands near
3e-3..8e-3), the float32 case at <= 1e-4. The exit status is 1 if any row of ours fails or
errors (a Mosaic row's refusal of a case it does not take excepted).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import default_config, flash_attention, flash_attention_reference

# name, (B, T, S, N, K, H), rules, dtype
CASES = [
    ("causal H128 4096", (2, 4096, 4096, 16, 16, 128), dict(causal=True), jnp.bfloat16),
    ("full H128 4096", (2, 4096, 4096, 16, 16, 128), dict(causal=False), jnp.bfloat16),
    ("causal H64 2048", (2, 2048, 2048, 32, 32, 64), dict(causal=True), jnp.bfloat16),
    ("causal GQA8 H128 1000", (2, 1000, 1000, 16, 2, 128), dict(causal=True), jnp.bfloat16),
    ("causal GQA4 H128 2048", (2, 2048, 2048, 16, 4, 128), dict(causal=True), jnp.bfloat16),
    ("full GQA2 H64 1024", (2, 1024, 1024, 8, 4, 64), dict(causal=False), jnp.float16),
    ("packed H128 4096", (2, 4096, 4096, 16, 16, 128), dict(causal=True, segment_ids="packed"),
     jnp.bfloat16),
    ("prefill chunk 300/2100", (2, 300, 2100, 8, 4, 128),
     dict(causal=True, q_offset=(1700, 900), kv_lengths=(2000, 1200)), jnp.bfloat16),
    ("window 256 + softcap 30", (2, 2048, 2048, 8, 2, 128),
     dict(causal=True, sliding_window=256, softcap=30.0), jnp.bfloat16),
    ("H256 causal 1024", (2, 1024, 1024, 8, 8, 256), dict(causal=True), jnp.bfloat16),
    ("fp16 causal H128 1024", (2, 1024, 1024, 8, 8, 128), dict(causal=True), jnp.float16),
    ("fp32 causal H64 777", (2, 777, 777, 4, 2, 64), dict(causal=True), jnp.float32),
]
QUICK = {"causal H128 4096", "full H128 4096", "causal GQA4 H128 2048", "full GQA2 H64 1024",
         "packed H128 4096", "prefill chunk 300/2100", "fp32 causal H64 777"}


def packed(batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq // 16, seq // 2, size=(batch, 64))
    starts = np.cumsum(lengths, axis=1)
    return jnp.asarray((np.arange(seq)[None, :, None] >= starts[:, None, :]).sum(-1), jnp.int32)


def make_rules(rules, batch, seq):
    rules = dict(rules)
    if rules.get("segment_ids") == "packed":
        rules["segment_ids"] = packed(batch, seq)
    for key in ("q_offset", "kv_lengths"):
        if key in rules:
            rules[key] = jnp.asarray(rules[key], jnp.int32)
    return rules


def explicit_mask(rules, batch, q_len, kv_len):
    """[B, 1, T, S] boolean mask for cuDNN, the same rules as the kernel's."""
    offset = rules.get("q_offset", jnp.zeros((batch,), jnp.int32))
    q_pos = jnp.broadcast_to(offset, (batch,))[:, None] + jnp.arange(q_len)
    k_pos = jnp.arange(kv_len)[None, None, :]
    mask = jnp.ones((batch, q_len, kv_len), bool)
    if rules.get("causal", True):
        mask &= k_pos <= q_pos[:, :, None]
    if rules.get("sliding_window") is not None:
        mask &= q_pos[:, :, None] - k_pos < rules["sliding_window"]
    if "kv_lengths" in rules:
        mask &= k_pos < rules["kv_lengths"][:, None, None]
    if rules.get("segment_ids") is not None:
        seg = rules["segment_ids"]
        mask &= seg[:, :, None] == seg[:, None, :]
    return mask[:, None]


def implementations(rules, batch, q_len, kv_len, num_heads, num_kv_heads):
    impls = {"ours": lambda q, k, v: flash_attention(q, k, v, **rules)}
    # "ours" is the automatic choice between the forced ones (forward, backward backends).
    for name, backends in (("triton", ("triton", "triton")), ("mosaic", ("mosaic_gpu", "triton")),
                           ("mosbwd", ("mosaic_gpu", "mosaic_gpu"))):
        impls[name] = lambda q, k, v, backends=backends: flash_attention(
            q, k, v, **rules, config=dataclasses.replace(
                default_config(q.shape[-1]), forward_backend=backends[0],
                backward_backend=backends[1]))
    plain = set(rules) <= {"causal"}
    if rules.get("softcap") is None:
        if plain:
            impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=rules["causal"], implementation="cudnn")
        else:
            mask = explicit_mask(rules, batch, q_len, kv_len)
            impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, mask=mask, implementation="cudnn")
    if num_heads == num_kv_heads and q_len == kv_len and set(rules) <= {"causal", "segment_ids"}:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu.attention import mha
        impls["mha"] = lambda q, k, v: mha(q, k, v, rules.get("segment_ids"),
                                           sm_scale=q.shape[-1] ** -0.5, causal=rules["causal"])
    return impls


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.isfinite(got).all():
        return float("nan")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check_case(name, dims, rules, dtype):
    batch, q_len, kv_len, num_heads, num_kv_heads, head_dim = dims
    rules = make_rules(rules, batch, q_len)
    rng = np.random.default_rng(0)
    shapes = [(batch, q_len, num_heads, head_dim), (batch, kv_len, num_kv_heads, head_dim),
              (batch, kv_len, num_kv_heads, head_dim), (batch, q_len, num_heads, head_dim)]
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    ref_fn = jax.jit(lambda q, k, v, do: (lambda o, f: (o, *f(do)))(
        *jax.vjp(lambda q, k, v: flash_attention_reference(q, k, v, **rules), q, k, v)))
    want = ref_fn(*f32)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    rows = []
    for impl, fn in implementations(rules, batch, q_len, kv_len, num_heads,
                                    num_kv_heads).items():
        start = time.perf_counter()
        try:
            got = jax.jit(lambda q, k, v, do, fn=fn: (lambda o, f: (o, *f(do)))(
                *jax.vjp(fn, q, k, v)))(q, k, v, do)
            errs = [rel(g, w) for g, w in zip(got, want)]
            ok = all(e <= tol for e in errs)  # NaN compares False: fails
            rows.append((name, impl, errs, "ok" if ok else "FAIL"))
        except Exception as err:  # noqa: BLE001 (report and go on)
            if not refused(str(err)):
                traceback.print_exc(limit=2)
            rows.append((name, impl, None, f"ERROR {type(err).__name__}: "
                                           f"{str(err).splitlines()[0][:120]}"))
        print_row(rows[-1], time.perf_counter() - start)
    return rows


def refused(message):
    """A Mosaic GPU backend's refusal of a case it does not take (an error naming the rule)."""
    return "does not take" in message


def print_row(row, seconds=None):
    name, impl, errs, status = row
    cells = "".join(f"{e:10.2e}" for e in errs) if errs else " " * 40
    took = f"{seconds:6.1f}s" if seconds is not None else " " * 7
    print(f"{name:<26} {impl:<6}{cells} {took}  {status}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the benchmark's key shapes")
    parser.add_argument("--cases", default="",
                        help="comma-separated words; only the cases whose names hold one of them")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'case':<26} {'impl':<6}{'out':>10}{'dq':>10}{'dk':>10}{'dv':>10}{'time':>8}  status")
    words = [w for w in args.cases.split(",") if w]
    failed = False
    for name, dims, rules, dtype in CASES:
        if (args.quick and name not in QUICK) or (words and not any(w in name for w in words)):
            continue
        try:
            rows = check_case(name, dims, rules, dtype)
        except Exception:  # noqa: BLE001 (the reference itself failed: report and go on)
            traceback.print_exc(limit=3)
            rows = [(name, "ours", None, "ERROR in reference")]
            print_row(rows[0])
        # Ours in every backend; a Mosaic row may refuse a case it does not take (an error that
        # names the constraint), which is not a failure.
        failed |= any(status != "ok" and not (impl in ("mosaic", "mosbwd") and refused(status))
                      for _, impl, _, status in rows if impl in ("ours", "triton", "mosaic", "mosbwd"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
