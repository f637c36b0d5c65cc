"""Why speculative decoding accepts what it accepts: for the runs tools/bench_speculative.py
trained, compare per prompt the greedy acceptance rate with how often the draft's argmax agrees
with the target's along the target's own greedy continuation (one forward of each over prompt +
continuation, teacher forcing).

    python tools/check_speculative_agreement.py --work runs/spec

If each drafted token agreed independently with probability a, a round would accept
a + a^2 + ... + a^gamma of gamma drafted tokens: the printed `expected_rate`. A measured rate far
below it points at the speculative loop (caches, positions), not at the models. Also prints the
first index where generate's default step, XLA's step, speculative decoding and the full forward
part ways (bf16 near-ties: each takes its own rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_speculative import in_domain_prompts  # noqa: E402  (tools/ is not a package)


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder holding the target and draft runs")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=256, help="new tokens a prompt")
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxlm import checkpoint, decode, model

    target_cfg, target_params, tokenizer = checkpoint.load_run(os.path.join(args.work, "target"))
    draft_cfg, draft_params, _ = checkpoint.load_run(os.path.join(args.work, "draft"))
    prompts = in_domain_prompts(tokenizer, args.prompt_len, args.prompts)
    forward = jax.jit(lambda cfg, params, tokens: jnp.argmax(model.forward(
        cfg, model.inference_params(cfg, params), tokens)[0][0], -1), static_argnums=0)
    for index, prompt in enumerate(prompts):
        common = dict(max_new_tokens=args.new, temperature=0.0)
        default = decode.generate(target_cfg, target_params, [prompt], **common)[0]
        xla = decode.generate(target_cfg, target_params, [prompt], pallas_step=False, **common)[0]
        speculative, stats = decode.speculative_generate(
            target_cfg, target_params, draft_cfg, draft_params, [prompt], gamma=args.gamma,
            **common)
        tokens = jnp.array([prompt + xla])
        n = args.prompt_len - 1
        target = np.asarray(forward(target_cfg, target_params, tokens))[n:-1]
        draft = np.asarray(forward(draft_cfg, draft_params, tokens))[n:-1]
        agreement = float(np.mean(draft == target))
        expected = sum(agreement ** i for i in range(1, args.gamma + 1)) / args.gamma
        print(json.dumps({
            "prompt": index, "acceptance_rate": round(stats["acceptance_rate"], 3),
            "draft_agrees": round(agreement, 3), "expected_rate": round(expected, 3),
            "first_difference_from_xla": {
                "default_step": first_difference(default, xla),
                "speculative": first_difference(speculative[0], xla),
                "forward": first_difference([int(t) for t in target], xla)},
            "distinct_tokens": len(set(xla))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
