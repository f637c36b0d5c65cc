"""Where a decoding step's GPU time goes: kernel time and launches per generated token.

    python tools/profile_decode.py --config 125m --batch 1 --out DIR

Runs `jaxlm.decode.generate` (bf16, greedy, random prompt of --prompt tokens), measures the wall
time per decode step as (t(new tokens) - t(1 token)) / (new - 1), then traces one call and prints
its kernel time per generated token (the prefill amortized over --new tokens) by category and
name (tools/profile_train_step.py reads the trace). The gap between the kernel sum and the wall
time per step is launch and loop overhead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from profile_train_step import summarize_trace  # noqa: E402

from jaxlm import decode, model  # noqa: E402
from jaxlm.config import load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="125m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--attention-impl", default="pallas", choices=("xla", "cudnn", "pallas"))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="profile_decode")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides).model
    cfg = dataclasses.replace(cfg, param_dtype="bfloat16", compute_dtype="bfloat16",
                              attention_impl=args.attention_impl,
                              max_seq_len=max(cfg.max_seq_len, args.prompt + args.new))
    params = model.init_params(cfg, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                (args.batch, args.prompt)).tolist()

    def generate(new_tokens: int) -> float:
        start = time.perf_counter()
        decode.generate(cfg, params, prompts, max_new_tokens=new_tokens, temperature=0.0)
        return time.perf_counter() - start

    generate(args.new), generate(1)  # compile both
    wall = (generate(args.new) - generate(1)) / (args.new - 1)
    print(f"{jax.devices()[0].device_kind} {args.config} batch {args.batch}: "
          f"{wall * 1e3:.3f} ms per decode step (wall)")
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        generate(args.new)
    summarize_trace(args.out, args.new, args.top, "generated token (prefill included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
