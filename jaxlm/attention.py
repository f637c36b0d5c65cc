"""Scaled dot-product attention behind one function, with interchangeable implementations.

Layouts: q [B, T, N, H]; k, v [B, S, K, H] with K kv heads dividing N heads (G = N // K query
heads share one kv head: grouped-query attention; K = 1 is multi-query attention).

Masking is defined by positions and segment ids, True = attend:
    mask[b, t, s] = (k_pos[b, s] <= q_pos[b, t])                 causal, in position space
                  & (q_seg[b, t] == k_seg[b, s])                 packed documents stay apart
                  & (q_pos[b, t] - k_pos[b, s] < window)         optional sliding window
Position-space causality makes packed sequences (positions restart per document), KV caches
(empty slots carry a position larger than any query) and left padding work through one rule.

Implementations:
- `xla`: plain einsums with a float32 softmax; the reference every other one is tested against.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash attention
  on NVIDIA GPUs (bf16/fp16 only). Plain causal self-attention uses its built-in causal mask;
  anything else passes the explicit mask.
- `pallas`: pallas_kernels.flash_attention, jaxlm's own flash attention (Triton lowering on GPU,
  interpret mode on CPU). It masks in *index* space: query t of a chunk written at cache slot
  `q_offset` sits at q_offset + t, key s at s. NOTE: that equals the position rule above only
  when positions count up by one within each segment (the default arange, packed documents whose
  positions restart at each document, a cache filled from slot 0), which is what jaxlm's data
  pipeline and decoding produce; custom positions (left padding) need `xla` or `cudnn`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


def make_mask(q_positions: jax.Array, k_positions: jax.Array,
              q_segment_ids: Optional[jax.Array] = None, k_segment_ids: Optional[jax.Array] = None,
              sliding_window: Optional[int] = None) -> jax.Array:
    """Boolean mask [B, T, S] from positions [B, T], [B, S] and optional segment ids."""
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
    if sliding_window is not None:
        mask &= q_positions[:, :, None] - k_positions[:, None, :] < sliding_window
    return mask


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference attention: [B, T, N, H] x [B, S, K, H] -> [B, T, N, H], mask [B, T, S]."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    # NOTE: a query row with no allowed key (a padding slot) would average all values; zero it.
    weights = jnp.where(mask.any(-1)[:, None, None, :, None], weights, 0.0)
    out = jnp.einsum("bkgts,bskh->btkgh", weights.astype(v.dtype), v)
    return out.reshape(batch, q_len, num_heads, head_dim)


def attention_pallas(q, k, v, *, q_segment_ids=None, k_segment_ids=None, sliding_window=None,
                     cache_index=None) -> jax.Array:
    """The Pallas flash-attention kernel, bottom-right causal against a cache at `cache_index`."""
    from pallas_kernels.flash_attention import flash_attention

    segments = None if q_segment_ids is None else (q_segment_ids, k_segment_ids)
    kv_lengths = None
    if cache_index is not None:
        kv_lengths = jnp.full((q.shape[0],), cache_index + q.shape[1], jnp.int32)
    return flash_attention(q, k, v, causal=True, segment_ids=segments, q_offset=cache_index,
                           kv_lengths=kv_lengths, sliding_window=sliding_window,
                           interpret=jax.default_backend() == "cpu")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
              k_positions: jax.Array, q_segment_ids: Optional[jax.Array] = None,
              k_segment_ids: Optional[jax.Array] = None, sliding_window: Optional[int] = None,
              plain_causal: bool = False, cache_index: Optional[jax.Array] = None,
              impl: str = "xla") -> jax.Array:
    """Attention with the masking rule of this module's docstring.

    `plain_causal=True` promises that positions are arange(T) for both q and k and there are no
    segments, so an implementation may use its own causal mask instead of the explicit one.
    `cache_index`: the cache slot of the first query when k/v are a KV cache (pallas only).
    """
    if impl == "pallas":
        return attention_pallas(q, k, v, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                                sliding_window=sliding_window, cache_index=cache_index)
    if impl == "xla":
        mask = make_mask(q_positions, k_positions, q_segment_ids, k_segment_ids, sliding_window)
        return attention_xla(q, k, v, mask)
    if impl == "cudnn":
        window = None if sliding_window is None else (sliding_window - 1, 0)
        if plain_causal:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                                implementation="cudnn")
        mask = make_mask(q_positions, k_positions, q_segment_ids, k_segment_ids, sliding_window)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
