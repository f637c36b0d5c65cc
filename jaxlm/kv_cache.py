"""The key/value cache: an explicit pytree passed to and returned by `model.forward`.

    cache = {
        "k": [L, B, K, S, H],     keys of every layer (kv heads, not query heads), S = cache length
        "v": [L, B, K, S, H],
        "lengths": [B] int32,     filled slots of each sequence
        "k_scale": [L, B, K, S],  float32, only in an int8 cache
        "v_scale": [L, B, K, S],
    }

Slot s of sequence b holds the token at position s: every sequence starts at slot 0 and appends
at its own `lengths[b]`, so a batch of prompts of different lengths is right-padded, prefilled in
one call, and then `set_lengths` rewinds each sequence to its real length (the padded slots are
overwritten by the next tokens). Writing T tokens fills slots lengths[b] .. lengths[b]+T-1 and adds
T to every length; writes past S are dropped. Attention of query t of sequence b sees the slots
s <= lengths[b] + t (bottom-right causal), so stale slots past a sequence's length are never read.
Speculative decoding uses the same rewind to drop rejected draft tokens.

Layout: [B, K, S, H] per layer puts one kv head's keys of one sequence in one contiguous [S, H]
block, which the decode kernel streams (pallas_kernels/decode_attention.py); layers are stacked
first so `model.forward` scans over them. Sharding: batch over (data, fsdp, expert), kv heads over tensor
(CACHE_AXES).

int8 (`quantize=True`): symmetric per (layer, sequence, kv head, token) scales over head_dim:
x = int8 * scale, scale = max|x| / 127. A per-token scale is written with its token, so appending
never requantizes old entries, and it follows outliers of single tokens; the scales add 4 / H of
the int8 bytes (3% at H = 128). The cache is never mutated: `write_layer` returns a new one
(donate it under jit to reuse memory).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.config import ModelConfig

# Logical dims of each cache entry, for sharding (see sharding.LOGICAL_RULES).
CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
    "k_scale": ("layers", "batch", "kv_heads", "cache_seq"),
    "v_scale": ("layers", "batch", "kv_heads", "cache_seq"),
    "lengths": ("batch",),
}
INT8_MAX = 127.0


def cache_shardings(cache: dict, mesh: Mesh) -> dict:
    """NamedSharding of every entry of `cache` (arrays or ShapeDtypeStructs) on `mesh`."""
    out = {}
    for name, x in cache.items():
        sharding.check_divisible(f"cache.{name}", x.shape, CACHE_AXES[name], mesh)
        out[name] = sharding.named_sharding(mesh, CACHE_AXES[name])
    return out


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None, *,
               mesh: Optional[Mesh] = None, quantize: bool = False) -> dict:
    """An empty cache for `batch_size` sequences of up to `max_len` tokens.

    dtype: of k/v (default the compute dtype); `quantize=True` stores int8 with float32 scales.
    mesh: create it sharded by CACHE_AXES (batch over data x fsdp x expert, kv heads over tensor).
    """
    dtype = jnp.int8 if quantize else jnp.dtype(dtype or cfg.compute_dtype)
    shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.resolved_head_dim)

    def init():
        cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                 "lengths": jnp.zeros((batch_size,), jnp.int32)}
        if quantize:
            cache["k_scale"] = jnp.zeros(shape[:-1], jnp.float32)
            cache["v_scale"] = jnp.zeros(shape[:-1], jnp.float32)
        return cache

    if mesh is None:
        return init()
    return jax.jit(init, out_shardings=cache_shardings(jax.eval_shape(init), mesh))()


def set_lengths(cache: dict, lengths: jax.Array) -> dict:
    """The same cache with `lengths` [B] filled slots per sequence (rewinds or pads, no copy)."""
    return {**cache, "lengths": jnp.asarray(lengths, jnp.int32)}


def _quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> int8 [..., H] and float32 scales [...] (symmetric, per vector)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX
    safe = jnp.where(scale == 0.0, 1.0, scale)
    return jnp.clip(jnp.round(x / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def write_layer(cache: dict, layer: jax.Array, k: jax.Array, v: jax.Array) -> dict:
    """Write k, v [B, T, K, H] of layer `layer` at slots lengths[b] + t (lengths unchanged).

    `cache` holds the stacked [L, ...] arrays; the write is a scatter into them, so under jit
    with the cache carried through the layer scan it updates the buffers in place.
    """
    batch, length = k.shape[:2]
    rows = jnp.arange(batch)[:, None]  # [B, 1]
    slots = cache["lengths"][:, None] + jnp.arange(length)[None, :]  # [B, T]
    new = dict(cache)
    for name, x in (("k", k), ("v", v)):
        if "k_scale" in cache:
            x, scale = _quantize(x)
            # Advanced indices (layer, rows, slots) split by a slice: the update is [B, T, K].
            new[f"{name}_scale"] = cache[f"{name}_scale"].at[layer, rows, :, slots].set(
                scale, mode="drop")
        new[name] = cache[name].at[layer, rows, :, slots, :].set(x.astype(cache[name].dtype),
                                                                 mode="drop")
    return new


def max_len(cache: dict) -> int:
    return cache["k"].shape[3]
