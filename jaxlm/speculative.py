"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding", sec. 2.3; Chen et al. 2023): a draft model proposes gamma tokens
x_i ~ q_i; the target scores all gamma + 1 positions in one forward; x_i is accepted with
probability min(1, p_i/q_i), the first rejection is replaced by a draw from
normalize(max(0, p - q)), and when all gamma are accepted a bonus token is drawn from p_gamma.
The output has exactly the target's distribution (with the same temperature / top-k / top-p
filtering applied to both models).

    tokens, stats = speculative_generate(cfg, params, draft_cfg, draft_params, prompts,
                                         gamma=4, max_new_tokens=32)

Also `jaxlm.decode.speculative_generate`. Requests, batching and the caches are jaxlm.decode's.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlm import decode, decode_steps, kv_cache, model
from jaxlm.config import ModelConfig
from jaxlm.sampling import Sampling, probabilities, sample


def _verify(p, q, drafted, key):
    """Accept/reject drafted [B, gamma] with target p [B, gamma+1, V], draft q [B, gamma, V].

    Returns the number accepted [B] and the token after them [B]: a draw from
    normalize(max(0, p_a - q_a)) at the first rejection a, or from p_gamma if all are accepted.
    """
    batch, gamma = drafted.shape
    accept_key, resample_key = jax.random.split(key)
    p_x = jnp.take_along_axis(p[:, :gamma], drafted[..., None], -1)[..., 0]
    q_x = jnp.take_along_axis(q, drafted[..., None], -1)[..., 0]
    # r < p/q written without the division (q_x > 0: x was drawn from q).
    accepted = jax.random.uniform(accept_key, (batch, gamma)) * q_x < p_x
    num_accepted = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1)
    q_next = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q_gamma = 0: bonus from p
    p_a = jnp.take_along_axis(p, num_accepted[:, None, None], 1)[:, 0]
    q_a = jnp.take_along_axis(q_next, num_accepted[:, None, None], 1)[:, 0]
    residual = jnp.maximum(p_a - q_a, 0.0)
    total = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p_a)
    token = jax.random.categorical(resample_key, jnp.log(residual), axis=-1).astype(jnp.int32)
    return num_accepted, token


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6), static_argnames="pallas_step")
def _speculative_loop(target_cfg, draft_cfg, sampling, gamma, max_new_tokens, eos_id, cache_len,
                      target_params, draft_params, tokens, lengths, key, real, pallas_step=False):
    """As decode._generate_loop (real, and the first overflowed new token or -1, included), with a
    draft proposing gamma tokens a target forward; pallas_step: the draft's decode steps."""
    target_params = model.inference_params(target_cfg, target_params)
    draft_inference = model.inference_params(draft_cfg, draft_params)
    target_cache = decode.new_cache(target_cfg, tokens.shape[0], cache_len, False)
    draft_cache = decode.new_cache(draft_cfg, tokens.shape[0], cache_len, False)
    logits, target_cache = decode.prefill_traced(target_cfg, target_params, tokens, target_cache,
                                                 lengths)
    _, draft_cache = decode.prefill_traced(draft_cfg, draft_inference, tokens, draft_cache, lengths)
    draft_one, draft_cache = decode_steps.token_stepper(draft_cfg, draft_params, draft_inference,
                                                        draft_cache, cache_len, pallas_step)
    batch = tokens.shape[0]
    token = sample(logits, jax.random.fold_in(key, 0), sampling)
    width = max_new_tokens + gamma + 1
    padding = jnp.zeros(token.shape, bool) if real is None else ~real
    first_bad = jnp.where(decode.non_finite_rows(logits, padding), 0, -1)
    out = jnp.full((batch, width), decode.PAD, jnp.int32).at[:, 0].set(
        jnp.where(padding, decode.PAD, token))
    count = jnp.ones((batch,), jnp.int32)
    done = decode.is_eos(token, eos_id) | (count >= max_new_tokens) | padding

    def draft(carry, step_key):
        token, cache, position = carry
        logits, cache = draft_one(token, cache, position)
        token = sample(logits, step_key, sampling)
        return (token, cache, position + 1), (token, probabilities(logits, sampling))

    def body(state):
        step, token, done, count, out, target_cache, draft_cache, accepted, drafted, first_bad = (
            state)
        keys = jax.random.split(jax.random.fold_in(key, step), gamma + 2)
        start = target_cache["lengths"]
        # gamma + 1 draft steps: the last one only writes x_{gamma-1} into the draft cache.
        (_, draft_cache, _), (xs, qs) = jax.lax.scan(draft, (token, draft_cache, start[0]),
                                                     keys[:gamma + 1])
        xs, qs = xs[:gamma].T, jnp.swapaxes(qs[:gamma], 0, 1)  # [B, gamma], [B, gamma, V]
        verify = jnp.concatenate([token[:, None], xs], axis=1)  # [B, gamma + 1]
        logits, target_cache = model.forward(target_cfg, target_params, verify, cache=target_cache)
        num_accepted, next_token = _verify(probabilities(logits, sampling), qs, xs, keys[-1])
        j = jnp.arange(gamma + 1)[None, :]
        emitted = jnp.where(j < num_accepted[:, None], jnp.pad(xs, ((0, 0), (0, 1))),
                            next_token[:, None])
        valid = (j <= num_accepted[:, None]) & ~done[:, None]
        # NaN or inf in the target's logits or the draft's probabilities at a window position
        # whose token is emitted (the rejection test there compares NaN): that new token,
        # count + j, is the first it spoils.
        bad = ~jnp.all(jnp.isfinite(logits), axis=-1) | jnp.pad(
            ~jnp.all(jnp.isfinite(qs), axis=-1), ((0, 0), (0, 1)))
        kept = valid & (count[:, None] + j < max_new_tokens)
        spoiled = jnp.min(jnp.where(bad & kept, count[:, None] + j, width))
        first_bad = jnp.where((first_bad < 0) & (spoiled < width), spoiled, first_bad)
        slots = jnp.where(valid, count[:, None] + j, width)  # width: dropped
        out = out.at[jnp.arange(batch)[:, None], slots].set(emitted, mode="drop")
        new_lengths = jnp.where(done, start, start + 1 + num_accepted)
        target_cache = kv_cache.set_lengths(target_cache, new_lengths)
        draft_cache = decode_steps.rewind(pallas_step, draft_cache, new_lengths)
        accepted += jnp.sum(jnp.where(done, 0, num_accepted))
        drafted += jnp.sum(jnp.where(done, 0, gamma))
        count = count + jnp.where(done, 0, num_accepted + 1)
        token = jnp.where(done, token, next_token)
        done = (done | jnp.any(valid & decode.is_eos(emitted, eos_id), axis=1)
                | (count >= max_new_tokens))
        return (step + 1, token, done, count, out, target_cache, draft_cache, accepted,
                drafted, first_bad)

    state = (jnp.int32(1), token, done, count, out, target_cache, draft_cache, jnp.int32(0),
             jnp.int32(0), first_bad)
    state = jax.lax.while_loop(lambda s: ~jnp.all(s[2]), body, state)
    step, _, _, count, out, _, _, accepted, drafted, first_bad = state
    return out, count, accepted, drafted, step - 1, first_bad


def speculative_generate(target_cfg: ModelConfig, target_params: dict, draft_cfg: ModelConfig,
                         draft_params: dict, prompts: Sequence[Sequence[int]], *, gamma: int = 4,
                         max_new_tokens: int, temperature: float = 1.0,
                         top_k: Optional[int] = None, top_p: Optional[float] = None,
                         seed: int = 0, eos_id: Optional[int] = None,
                         mesh: Optional[Mesh] = None, vocab_limit: Optional[int] = None,
                         pallas_step: Optional[bool | str] = None
                         ) -> tuple[list[list[int]], dict]:
    """`generate` with a draft model proposing `gamma` tokens per target forward.

    pallas_step: which step the draft's one-token steps run as, with `generate`'s choices and
    default (a Pallas step at batch 1 on a Hopper GPU: the chain step for bf16 drafts it takes);
    the target verifies gamma + 1 tokens a forward, always by `model.forward`.

    Returns the new tokens (distributed exactly as the target's `generate`; equal to its greedy
    output at temperature 0) and stats: acceptance_rate (accepted / drafted tokens),
    accepted, drafted, target_calls (verification forwards after prefill).
    """
    sampling = Sampling(float(temperature), top_k, top_p, vocab_limit)
    decode.check_request(target_cfg, prompts, max_new_tokens, sampling, eos_id)
    decode.check_request(draft_cfg, prompts, max_new_tokens, sampling, eos_id)
    decode.check_finite_weights(target_params)
    decode.check_finite_weights(draft_params)
    if target_cfg.vocab_size != draft_cfg.vocab_size:
        raise ValueError(f"the draft's vocab_size {draft_cfg.vocab_size} differs from the "
                         f"target's {target_cfg.vocab_size}")
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be a positive integer, got {gamma!r}")
    pallas_step = decode_steps.use_pallas_step(draft_cfg, len(prompts), False, mesh, pallas_step)
    tokens, lengths, cache_len, real = decode.batch_prompts(prompts, mesh, gamma + 1,
                                                            max_new_tokens)
    with decode.on_mesh(mesh):
        out, count, accepted, drafted, calls, first_bad = _speculative_loop(
            target_cfg, draft_cfg, sampling, gamma, max_new_tokens, eos_id, cache_len,
            target_params, draft_params, tokens, lengths, jax.random.key(seed), real,
            pallas_step=pallas_step)
    if int(first_bad) >= 0:
        raise ValueError(decode.overflow_message(int(first_bad)))
    out, count = np.asarray(out), np.asarray(count)
    results = [decode.trim_row(out[i], int(count[i]), max_new_tokens, eos_id)
               for i in range(len(prompts))]
    accepted, drafted = int(accepted), int(drafted)
    stats = {"acceptance_rate": accepted / drafted if drafted else float("nan"),
             "accepted": accepted, "drafted": drafted, "target_calls": int(calls)}
    return results, stats
