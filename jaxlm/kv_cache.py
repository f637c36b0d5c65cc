"""The key/value cache: an explicit pytree passed to and returned by `model.forward`.

    cache = {
        "k": [L, B, S, K, H],   keys of every layer, S = cache length
        "v": [L, B, S, K, H],
        "positions": [B, S],    the position of the token in each slot; EMPTY_POSITION if unused
        "index": [],            the next slot to write (same for the whole batch)
    }

An empty slot's position is larger than any real position, so the position-space causal mask of
attention.py hides it with no extra rule. Writing T tokens fills slots index .. index+T-1.
The cache is never mutated: `write` returns a new one (donate it under jit to reuse memory).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig

EMPTY_POSITION = jnp.iinfo(jnp.int32).max

# Logical dims of each cache entry, for sharding (see sharding.LOGICAL_RULES).
CACHE_AXES = {
    "k": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "positions": ("batch", "cache_seq"),
    "index": (),
}


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict:
    """An empty cache for `batch_size` sequences of up to `max_len` tokens."""
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "positions": jnp.full((batch_size, max_len), EMPTY_POSITION, jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def write_layer(k_cache: jax.Array, v_cache: jax.Array, index: jax.Array, k: jax.Array,
                v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write k, v [B, T, K, H] into one layer's cache [B, S, K, H] at slot `index`."""
    start = (0, index, 0, 0)
    return (jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start),
            jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start))


def write_positions(cache: dict, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cache's slot positions after writing `positions` [B, T], and the next index."""
    new_positions = jax.lax.dynamic_update_slice(cache["positions"], positions.astype(jnp.int32),
                                                 (0, cache["index"]))
    return new_positions, cache["index"] + positions.shape[1]
