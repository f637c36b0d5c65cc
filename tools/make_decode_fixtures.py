"""Write the greedy-generation fixture that tests/test_decode.py checks against transformers.

Needs transformers and a CPU torch (the tests themselves need neither):

    python tools/make_decode_fixtures.py [--model tests/golden/hf/llama] [--out tests/golden/decode]

Reuses the tiny random Llama of tools/make_hf_fixtures.py (GQA, llama3 rope scaling, tied
embeddings), draws a few prompts of different lengths from a seeded generator, and runs
transformers' greedy `generate` on each prompt alone (batch 1, no padding) in float64 with eager
attention. Writes <out>/llama_greedy.json: the prompts, their continuations and, per prompt, the
smallest gap between the top two logits along the greedy path (a float32 implementation agrees
on the argmax when that gap is well above its rounding error; the script refuses gaps < 1e-3).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import transformers

PROMPT_LENGTHS = (5, 13, 2, 8)
MAX_NEW_TOKENS = 12
MIN_GAP = 1e-3


def greedy(model, prompt: list[int]) -> tuple[list[int], float]:
    input_ids = torch.tensor([prompt])
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                         eos_token_id=None)
    tokens = out.sequences[0, len(prompt):].tolist()
    gaps = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
    return tokens, min(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tests/golden/hf/llama")
    parser.add_argument("--out", default="tests/golden/decode")
    args = parser.parse_args()
    model = transformers.LlamaForCausalLM.from_pretrained(args.model, attn_implementation="eager",
                                                          dtype=torch.float64)
    model.eval()
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]
    continuations, gaps = [], []
    with torch.no_grad():
        for prompt in prompts:
            tokens, gap = greedy(model, prompt)
            if gap < MIN_GAP:
                raise SystemExit(f"prompt {prompt}: top-2 logit gap {gap:.2e} < {MIN_GAP}; "
                                 f"change the seed")
            continuations.append(tokens)
            gaps.append(gap)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fixture = {"model": "tests/golden/hf/llama", "transformers": transformers.__version__,
               "max_new_tokens": MAX_NEW_TOKENS, "prompts": prompts,
               "continuations": continuations, "min_top2_logit_gap": gaps}
    (out / "llama_greedy.json").write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {out / 'llama_greedy.json'}: gaps {['%.3g' % g for g in gaps]}")


if __name__ == "__main__":
    main()
