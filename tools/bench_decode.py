"""Decoding speed: batch-1 tokens/s against the memory roofline, throughput at batch 1/8/64, and
the decode-attention kernel's bandwidth against cuDNN and XLA single-query attention.

    python tools/bench_decode.py --config 125m                 # one preset, bf16, on the GPU
    python tools/bench_decode.py --config 1b --baseline-hf     # + transformers generate (torch)
    python tools/bench_decode.py --quick                       # 125m and 1b, short, < 4 minutes
    python tools/bench_decode.py --config tiny                 # CPU smoke check (tiny shapes)

Shapes: prompts of 512 random tokens (--prompt-len), 256 new tokens, greedy, no eos (tiny:
32 + 16). Each generate runs once to compile, then is timed (a throughput row, and
transformers', the median of REPEATS calls). Batch-1 decode time per token is
(t(256 new) - t(1 new)) / 255, so prefill is not counted; the roofline is the bytes one step must
read (bf16 weights + the KV cache of the mean context, jaxlm.accounting) over a copy bandwidth
measured here (read + write of a large array); `read_roofline_fraction` uses a read-only
bandwidth (a sum over a large array), the stricter roofline. Each batch-1 row also gives the
first call's seconds (compile included) and a teacher-forced check of its greedy tokens
against one float32 forward (how many are float32's argmax; the Pallas steps' rows also say
how many leading tokens equal XLA's step's). Results print as one JSON object per line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import accounting, attention, decode, model
from jaxlm.config import load_config

REPEATS = 5  # timed calls a throughput row takes the median of


def timed(fn, repeats: int = 1) -> float:
    """Median seconds of `repeats` calls after one call that compiles."""
    fn()
    return statistics.median(_seconds(fn) for _ in range(repeats))


def best_time(run, x, repeats: int) -> float:
    """The best of `repeats` timed calls of run(x) after an untimed one (which also compiles
    and brings the clocks up). The best, not the median: the roofline is what the card can do."""
    run(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return min(times)


def per_pass_rate(loop, x, bytes_per_pass: int, repeats: int, passes=(8, 40)) -> float:
    """Bytes/s of one pass of `loop(n)` (a jitted n-pass loop over x): the time of `passes[1]`
    passes minus that of `passes[0]`, so what a call pays once (dispatch, sync, and the copy
    of x into the loop's own buffer, a whole extra pass) cancels out. Dividing the time of 8
    passes alone read 3.47-3.65 TB/s for a copy on an H200 where this reads 4.17-4.24."""
    few, many = (best_time(loop(n), x, repeats) for n in passes)
    if many <= few:
        raise RuntimeError(f"{passes[1]} passes timed no slower than {passes[0]} "
                           f"({many:.3g} s vs {few:.3g} s): use a larger array")
    return bytes_per_pass * (passes[1] - passes[0]) / (many - few)


def copy_loop(passes: int):
    """A jitted loop of `passes` elementwise passes over an array, each reading and writing it
    (an optimization barrier keeps them from fusing into one)."""
    return jax.jit(lambda a: jax.lax.fori_loop(
        0, passes, lambda _, b: jax.lax.optimization_barrier(b * 1.0001), a))


def read_loop(passes: int):
    """A jitted loop of `passes` sums over an array (the array goes through an optimization
    barrier each pass, so no pass is hoisted or merged)."""
    def body(_, carry):
        total, a = carry
        a = jax.lax.optimization_barrier(a)
        return total + jnp.sum(a), a

    return jax.jit(lambda a: jax.lax.fori_loop(0, passes, body, (jnp.float32(0), a))[0])


def copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Bytes/s read + written by a copy pass (copy_loop) over an `nbytes` array."""
    return per_pass_rate(copy_loop, jnp.ones((nbytes // 4,), jnp.float32), 2 * nbytes, repeats)


def read_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Bytes/s read by a sum (read_loop) over an `nbytes` array. A decode step mostly reads, and
    reading alone runs faster than a copy (the Pallas step's vocabulary head read at 3.9 TB/s
    on an H200): the stricter roofline, reported next to the copy-based one that the decoding
    issue names."""
    return per_pass_rate(read_loop, jnp.ones((nbytes // 4,), jnp.float32), nbytes, repeats)


def bench_generate(cfg, params, batch: int, prompt_len: int, new_tokens: int,
                   repeats: int = 1, pallas_step=None, detail: bool = False, **options):
    """Seconds of a greedy generate (median of `repeats` after a call that compiles); with
    detail, (seconds, seconds of the first call, compile included, the prompts, the tokens).
    options: more keywords for generate (eos_id, vocab_limit)."""
    prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    out = {}

    def run():
        out["tokens"] = decode.generate(cfg, params, prompts, max_new_tokens=new_tokens,
                                        temperature=0.0, pallas_step=pallas_step, **options)

    first = _seconds(run)
    seconds = statistics.median(_seconds(run) for _ in range(repeats))
    return (seconds, first, prompts, out["tokens"]) if detail else seconds


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_step(name: str, cfg, params, prompt_len: int, new_tokens: int, bandwidth: float,
               pallas_step=False, read: Optional[float] = None, greedy=None):
    """Batch-1 time per decoded token, prefill excluded: (t(n new) - t(1 new)) / (n - 1).
    Also the first call's seconds (compile included), and with `greedy` (the XLA step's
    tokens) how many leading tokens this step's greedy output shares with it. Returns the
    tokens."""
    one = bench_generate(cfg, params, 1, prompt_len, 1, repeats=3, pallas_step=pallas_step)
    full, first, prompts, tokens = bench_generate(cfg, params, 1, prompt_len, new_tokens, repeats=3,
                                         pallas_step=pallas_step, detail=True)
    same = None
    if greedy is not None:
        pairs = list(zip(tokens[0], greedy[0]))
        same = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
    forced = float32_check(cfg, params, prompts[0], tokens[0])
    step = (full - one) / (new_tokens - 1)
    step_bytes = accounting.decode_step_bytes(cfg, 1, prompt_len + new_tokens // 2)
    print(json.dumps({"model": name, "batch": 1, "decode_tokens_per_s": round(1 / step, 1),
                      "step_ms": round(step * 1e3, 3), "step_bytes": step_bytes,
                      "roofline_fraction": round(step_bytes / bandwidth / step, 3),
                      **({"read_roofline_fraction": round(step_bytes / read / step, 3)}
                         if read else {}),
                      "attention_impl": cfg.attention_impl, "pallas_step": pallas_step,
                      "batch1_tokens_per_s": round(new_tokens / full, 1),
                      "first_call_s": round(first, 1),
                      **({"greedy_tokens_equal_to_xla": f"{same}/{len(tokens[0])}"}
                         if greedy is not None else {}), **forced}), flush=True)
    return tokens


def bench_loop_forms(name: str, cfg, params, prompt_len: int, new_tokens: int, pallas_step,
                     rounds: int = 2) -> None:
    """Batch-1 step time of generate's loop forms, alternated in one process: the stop check
    (eos) after every step (the loop before STEPS_PER_CHECK), after every 8, and no eos (one
    loop of known length). The eos id is the vocabulary's last, which vocab_limit keeps from
    being emitted, so every form runs all its steps (and all forms mask that one logit)."""
    eos, limit = cfg.vocab_size - 1, cfg.vocab_size - 1
    forms = {"check_each_step": (eos, 1), "check_every_8": (eos, 8), "no_eos": (None, 8)}
    default = decode.STEPS_PER_CHECK
    try:
        for round_ in range(rounds):
            for form, (eos_id, every) in forms.items():
                decode.STEPS_PER_CHECK = every
                kw = dict(pallas_step=pallas_step, eos_id=eos_id, vocab_limit=limit, repeats=3)
                one = bench_generate(cfg, params, 1, prompt_len, 1, **kw)
                full = bench_generate(cfg, params, 1, prompt_len, new_tokens, **kw)
                print(json.dumps({"model": name, "loop": form, "round": round_,
                                  "pallas_step": pallas_step,
                                  "step_ms": round((full - one) / (new_tokens - 1) * 1e3, 4)}),
                      flush=True)
    finally:
        decode.STEPS_PER_CHECK = default


def float32_check(cfg, params, prompt, tokens) -> dict:
    """The greedy tokens against one float32 forward over prompt + tokens (teacher-forced):
    how many are the float32 argmax at their position, the largest gap (float32 max logit -
    the chosen token's), and the median gap between float32's two best logits. On random
    weights the logits are nearly flat, so bf16 steps can pick a near-tie: the gaps say
    whether a disagreement is such a tie or an error."""
    f32 = dataclasses.replace(cfg, param_dtype="float32", compute_dtype="float32",
                              attention_impl="xla")
    weights = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a,
                           params)
    ids = jnp.asarray([list(prompt) + list(tokens)], jnp.int32)
    logits = jax.jit(lambda p, t: model.forward(f32, p, t)[0])(weights, ids)[0]
    logits = np.asarray(logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)])
    chosen = logits[np.arange(len(tokens)), np.asarray(tokens)]
    best = np.sort(logits, axis=-1)[:, -2:]
    return {"float32_argmax": f"{int(np.sum(chosen == best[:, 1]))}/{len(tokens)}",
            "float32_max_gap": round(float(np.max(best[:, 1] - chosen)), 4),
            "float32_top2_gap_median": round(float(np.median(best[:, 1] - best[:, 0])), 4),
            "float32_logit_std": round(float(np.std(logits)), 4)}


def bench_model(name: str, args, bandwidth: float, read: Optional[float] = None) -> None:
    cfg = load_config(name).model
    tiny = name == "tiny"
    # The tiny preset's head_dim 8 is below the Pallas kernels' minimum of 16.
    impl = args.attention_impl or ("xla" if tiny else "pallas")
    prompt_len, new_tokens = (32, 16) if tiny else (512, 64 if args.quick else 256)
    prompt_len = args.prompt_len or prompt_len
    cfg = dataclasses.replace(cfg, param_dtype="bfloat16", compute_dtype="bfloat16",
                              attention_impl=impl,
                              max_seq_len=max(cfg.max_seq_len, 1024, prompt_len + new_tokens))
    params = model.init_params(cfg, jax.random.key(0))
    greedy = bench_step(name, cfg, params, prompt_len, new_tokens, bandwidth, read=read)
    steps = [True] * bool(args.pallas_step) + ["chain"] * bool(args.chain_step)
    if args.loop_forms:
        for step in [False] + steps:
            bench_loop_forms(name, cfg, params, prompt_len, new_tokens, step)
        return
    for step in steps:  # the Pallas decode steps, batch 1, against XLA's just above
        bench_step(name, cfg, params, prompt_len, new_tokens, bandwidth, pallas_step=step,
                   read=read, greedy=greedy)
    if steps:
        return
    for batch in ((1, 2) if tiny else (1, 8) if args.quick else (1, 8, 64)):
        # generate's default step; a call takes at most about a second after the compile
        seconds = bench_generate(cfg, params, batch, prompt_len, new_tokens, repeats=REPEATS)
        print(json.dumps({"model": name, "batch": batch, "prompt": prompt_len, "new": new_tokens,
                          "throughput_tokens_per_s": round(batch * new_tokens / seconds, 1),
                          "seconds": round(seconds, 3),
                          "pallas_step": decode.use_pallas_step(cfg, batch)}), flush=True)
    if args.baseline_hf and not tiny:
        bench_hf(cfg, name, prompt_len, new_tokens, args.quick)


def bench_hf(cfg, name: str, prompt_len: int, new_tokens: int, quick: bool) -> None:
    """transformers' generate with a static cache, bf16, on the same shapes (needs CUDA torch)."""
    import torch
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim, intermediate_size=cfg.mlp_dim,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings)
    hf_model = transformers.LlamaForCausalLM(hf_cfg).to("cuda", torch.bfloat16).eval()
    for batch in (1, 8) if quick else (1, 8, 64):
        ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device="cuda")

        def run():
            with torch.no_grad():
                hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  cache_implementation="static", pad_token_id=0)
            torch.cuda.synchronize()

        seconds = timed(run, repeats=REPEATS)
        print(json.dumps({"model": name, "baseline": "transformers", "batch": batch,
                          "throughput_tokens_per_s": round(batch * new_tokens / seconds, 1),
                          "transformers": transformers.__version__}), flush=True)


def bench_kernel(tiny: bool, bandwidth: float) -> None:
    """One layer of single-query attention over a bf16 cache: Llama 3.2 1B heads (32 q, 8 kv,
    head_dim 64), batch 8, 4096 cached tokens."""
    batch, heads, kv_heads, head_dim, length = (2, 6, 2, 16, 64) if tiny else (8, 32, 8, 64, 4096)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, 1, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, kv_heads, length, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, kv_heads, length, head_dim), jnp.bfloat16)
    offsets = jnp.full((batch,), length - 1, jnp.int32)
    cache_bytes = 2 * k.size * k.dtype.itemsize
    calls = 2 if tiny else 20
    candidates = {
        "pallas_decode": lambda q, k, v: attention._pallas_cached(q, k, v, offsets, None),
        "xla": lambda q, k, v: attention.attention_cached_xla(q, k, v, offsets),
    }
    layouts = {"cache": (k, v)}
    if jax.default_backend() == "gpu":
        # cuDNN wants [B, S, K, H]: transposed once outside the timed call (its best case).
        layouts["cudnn"] = (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
        candidates["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                                           implementation="cudnn")
    for label, fn in candidates.items():
        timed_fn = jax.jit(functools.partial(_repeat, fn, calls))
        args = (q, *layouts["cudnn" if label == "cudnn" else "cache"])
        try:
            seconds = timed(lambda: timed_fn(*args).block_until_ready(), repeats=1 if tiny else 10)
        except Exception as error:  # noqa: BLE001: report and go on
            print(json.dumps({"kernel": label, "error": str(error)[:200]}), flush=True)
            continue
        seconds /= calls
        print(json.dumps({"kernel": label, "shape": [batch, heads, kv_heads, length, head_dim],
                          "us": round(seconds * 1e6, 1),
                          "GB_per_s": round(cache_bytes / seconds / 1e9, 1),
                          "fraction_of_copy_bandwidth": round(cache_bytes / seconds / bandwidth, 3)}),
              flush=True)


def _repeat(fn, calls: int, q, k, v):
    """`calls` attention calls in one program, each query depending on the previous output (so
    no two calls can share a read of the cache): the per-call time excludes the host's dispatch,
    which takes longer than reading a 67 MB cache."""
    for _ in range(calls):
        q = q + fn(q, k, v).astype(q.dtype) * 1e-3
    return q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", help="preset(s) (default 125m and 1b)")
    parser.add_argument("--quick", action="store_true", help="64 new tokens, batches 1 and 8")
    parser.add_argument("--baseline-hf", action="store_true", help="also transformers generate")
    parser.add_argument("--pallas-step", action="store_true",
                        help="batch 1 only: XLA's decode step, then generate(pallas_step=True)")
    parser.add_argument("--chain-step", action="store_true",
                        help='batch 1 only: XLA\'s decode step, then generate(pallas_step='
                             '"chain"): the step as one persistent Mosaic GPU kernel')
    parser.add_argument("--loop-forms", action="store_true",
                        help="batch 1 only: the step time of generate's loop forms (stop "
                             "check after each step, every 8, none), XLA's step and those "
                             "chosen by --pallas-step/--chain-step")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="prompt tokens (default 512; tiny 32): a longer context reads a "
                             "bigger cache each step")
    parser.add_argument("--attention-impl", default=None, choices=("xla", "cudnn", "pallas"),
                        help="model attention (default pallas; xla for tiny)")
    args = parser.parse_args()
    if args.prompt_len is not None and args.prompt_len < 1:
        parser.error(f"--prompt-len must be at least 1 (got {args.prompt_len})")
    names = args.config or ["125m", "1b"]
    tiny = names == ["tiny"]
    bandwidth = copy_bandwidth(16 << 20 if tiny else 1 << 30)
    read = read_bandwidth(16 << 20 if tiny else 1 << 30)
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                      "copy_GB_per_s": round(bandwidth / 1e9, 1),
                      "read_GB_per_s": round(read / 1e9, 1)}), flush=True)
    bench_kernel(tiny, bandwidth)
    for name in names:
        bench_model(name, args, bandwidth, read)


if __name__ == "__main__":
    main()
