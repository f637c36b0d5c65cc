"""`python -m jaxlm.decode`: generate text from a training run or a Hugging Face folder.

    python -m jaxlm.decode --run-dir runs/125m --prompt "Once upon a time" --max-new-tokens 64
    python -m jaxlm.decode --hf path/to/hf --prompt "..." --dtype bfloat16 --attention-impl pallas

Tokens stream to the terminal as `decode.stream` makes them; time to first token and the
decoding rate go to stderr at the end. Without a tokenizer, prompts and output are token ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

from jaxlm.checkpoint import load_run, load_tokenizer
from jaxlm.decode import stream, use_pallas_step, vocab_limit_of


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlm.decode",
        description="Generate text from a trained run or a Hugging Face folder, streaming tokens; "
                    "prints time to first token and tokens/s at the end.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="training run directory (latest checkpoint + tokenizer)")
    source.add_argument("--hf", metavar="DIR", help="Hugging Face model folder (safetensors)")
    parser.add_argument("--prompt", required=True,
                        help="prompt text (token ids separated by spaces when there is no tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eos-id", type=int, default=None,
                        help="stop at this token (default: the tokenizer's <|endoftext|>, if any)")
    parser.add_argument("--dtype", default=None, help="--hf: parameter/compute dtype, e.g. bfloat16")
    parser.add_argument("--attention-impl", default=None, choices=("xla", "cudnn", "pallas"))
    parser.add_argument("--int8-cache", action="store_true", help="int8 KV cache")
    parser.add_argument("--pallas-step", action=argparse.BooleanOptionalAction, default=None,
                        help="--pallas-step: decode steps by the fused Triton kernel "
                             "(pallas_kernels/fused_decode.py); --no-pallas-step: by XLA; "
                             "default: on a Hopper GPU at batch 1, the chain step where it "
                             "runs, else the fused step up to embed 2048 (where each was "
                             "measured faster, docs/benchmarks.md)")
    parser.add_argument("--chain-step", action="store_true",
                        help="decode steps as one persistent Mosaic GPU kernel "
                             "(pallas_kernels/chain_step.py; Hopper, head_dim 64), or an error "
                             "saying why it cannot run")
    return parser


def _encode(tokenizer, prompt: str) -> list[int]:
    if tokenizer is None:
        try:
            return [int(t) for t in prompt.split()]
        except ValueError:
            raise ValueError("there is no tokenizer: give --prompt as token ids, e.g. "
                             "--prompt '1 2 3'") from None
    return list(tokenizer.encode(prompt))


def _default_eos(tokenizer) -> Optional[int]:
    special = getattr(tokenizer, "special_ids", None)
    if special:
        return special.get("<|endoftext|>")
    return getattr(tokenizer, "eos_token_id", None)


def run(args: argparse.Namespace) -> int:
    if args.run_dir:
        cfg, params, tokenizer = load_run(args.run_dir)
    else:
        from jaxlm import hf

        cfg, params = hf.load_pretrained(args.hf, dtype=args.dtype)
        tokenizer = load_tokenizer(args.hf if os.path.exists(os.path.join(args.hf, "tokenizer.json"))
                                    else None)
    if args.attention_impl:
        cfg = dataclasses.replace(cfg, attention_impl=args.attention_impl)
    prompt = _encode(tokenizer, args.prompt)
    eos_id = args.eos_id if args.eos_id is not None else _default_eos(tokenizer)
    requested = "chain" if args.chain_step else args.pallas_step
    step = use_pallas_step(cfg, 1, args.int8_cache, None, requested)
    print(args.prompt, end="", flush=True)
    start, times, ids, printed = time.perf_counter(), [], [], ""
    for token in stream(cfg, params, prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, eos_id=eos_id, quantize_cache=args.int8_cache,
                        vocab_limit=vocab_limit_of(cfg, tokenizer), pallas_step=requested):
        times.append(time.perf_counter())
        ids.append(token)
        if tokenizer is None:
            print(f" {token}", end="", flush=True)
            continue
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(printed):], end="", flush=True)
            printed = text
    # The second token compiles the decode step: the rate counts the tokens after it.
    rate = (len(ids) - 2) / (times[-1] - times[1]) if len(ids) > 2 else float("nan")
    print(f"\n\n{len(prompt)} prompt tokens, {len(ids)} new tokens; time to first token "
          f"{times[0] - start:.3f} s (includes compilation), {rate:.1f} tokens/s decoding "
          f"({STEP_NAMES[step]})", file=sys.stderr)
    return 0


# What decode.use_pallas_step's answer means, for the summary line.
STEP_NAMES = {"chain": "the chain step: one Mosaic GPU kernel a token",
              True: "the fused Pallas step: one Triton kernel a token", False: "XLA's step"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chain_step and args.pallas_step is not None:
        parser.error("--chain-step and --pallas-step/--no-pallas-step choose the same thing: "
                     "give one")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
