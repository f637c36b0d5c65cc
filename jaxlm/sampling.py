"""Sampling the next token from logits: temperature, top-k, top-p and a vocabulary limit.

Logits / temperature, then top-k (keep the k largest), then top-p (keep the smallest set of
most likely tokens whose probability reaches p), then a categorical draw; temperature 0 is
greedy (argmax). `probabilities` is the distribution `sample` draws from, which speculative
decoding's acceptance test needs for both models. All functions are pure and jit-friendly;
`Sampling` is hashable, a static argument of jit (a new setting compiles a new program).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from logits (hashable: a static argument of jit)."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    # Ids >= vocab_limit are never chosen: a model whose vocab is padded beyond its tokenizer's
    # (e.g. 50304 for GPT-2's 50257, or a BPE that stopped merging early) cannot emit ids the
    # tokenizer has no text for.
    vocab_limit: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def restrict_vocab(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """logits with -inf at ids >= sampling.vocab_limit; [..., V]."""
    if sampling.vocab_limit is None or sampling.vocab_limit >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < sampling.vocab_limit, logits, -jnp.inf)


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """float32 logits / temperature with -inf outside the top-k and top-p sets (and at ids >=
    vocab_limit); [..., V]."""
    logits = restrict_vocab(logits.astype(jnp.float32), sampling) / sampling.temperature
    if sampling.top_k is not None:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)  # the first always stays
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def probabilities(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The distribution [..., V] that `sample` draws from (one-hot of the argmax if greedy)."""
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(restrict_vocab(logits, sampling), axis=-1),
                              logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits, sampling), axis=-1)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token id per row of logits [B, V] -> [B] int32."""
    if sampling.greedy:
        return jnp.argmax(restrict_vocab(logits, sampling), axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)

