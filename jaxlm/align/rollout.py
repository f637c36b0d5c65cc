"""Rollouts: batched sampling through `jaxlm.decode.generate`, with stop strings and the
log-probs of the sampled tokens.

    rollouts = sample_responses(cfg, params, tokenizer, prompts, max_new_tokens=64,
                                temperature=1.0, stop=("</answer>",), seed=0, mesh=mesh)

The sampler reads the trainer's params as they are (same pytree, same shardings): no copy or
conversion between the train step and generation. `decode.generate` runs the whole token loop
in one jit and stops at eos.

Stop strings are applied on the host after generation: a response is cut after the first token
whose text completes a stop string (the stop string stays in the response: it was sampled and is
part of the action the policy is credited for). Tokens sampled after it are dropped, with their
log-probs. Ids the tokenizer lacks (a model vocab padded beyond it) are never sampled. Eos stays
in `response_ids` (the policy learns to stop) but not in `text`.

Prompts are processed in chunks of `batch_size`; the last chunk is padded with copies of its
first prompt so every chunk has the same shape (one compiled program).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from jaxlm import decode
from jaxlm.align.common import eos_id_of


@dataclasses.dataclass(frozen=True)
class Rollout:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    log_probs: tuple[float, ...]  # log p(response_ids[j]) under the sampling params
    text: str  # the response as text, without eos


def cut_at_stop(ids: list[int], tokenizer, stop: Sequence[str]) -> int:
    """Number of tokens to keep: up to the token that completes the first stop string, else all."""
    text = tokenizer.decode(ids)
    positions = [text.find(s) + len(s) for s in stop if s in text]
    if not positions:
        return len(ids)
    end = min(positions)
    for count in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:count])) >= end:
            return count
    return len(ids)


def _finish(prompt_ids, ids: list[int], log_probs: list[float], tokenizer, eos_id, stop) -> Rollout:
    keep = cut_at_stop(ids, tokenizer, stop) if stop else len(ids)
    ids, log_probs = ids[:keep], log_probs[:keep]
    visible = ids[:-1] if ids and ids[-1] == eos_id else ids
    return Rollout(tuple(prompt_ids), tuple(ids), tuple(log_probs), tokenizer.decode(visible))


def sample_responses(cfg, params: dict, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                     temperature: float = 1.0, top_p: Optional[float] = None, seed: int = 0,
                     stop: Sequence[str] = (), mesh=None, batch_size: Optional[int] = None) -> list[Rollout]:
    """One rollout per prompt (repeat a prompt G times for G samples); temperature 0 = greedy."""
    eos_id = eos_id_of(tokenizer)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    batch_size = batch_size or len(prompt_ids)
    rollouts = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        ids, log_probs = decode.generate(cfg, params, padded, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, seed=seed + start,
                                         eos_id=eos_id, mesh=mesh, return_log_probs=True,
                                         vocab_limit=decode.vocab_limit_of(cfg, tokenizer))
        rollouts += [_finish(p, i, lp, tokenizer, eos_id, stop) for p, i, lp in zip(chunk, ids, log_probs)]
    return rollouts
