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

Against a KV cache (`attention_cached`, kv_cache.py's [B, K, S, H] layout), query t of sequence b
sits at slot q_offsets[b] + t and sees slots s <= q_offsets[b] + t. `pallas` runs the split-K
decode kernel (pallas_kernels/decode_attention.py) for up to MAX_DECODE_QUERIES new tokens and
flash attention for longer chunks; `xla` and `cudnn` run einsums on the cache layout.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxlm import sharding

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


def attention_pallas(q, k, v, *, q_segment_ids=None, k_segment_ids=None,
                     sliding_window=None) -> jax.Array:
    """The Pallas flash-attention kernel (causal from position 0)."""
    from pallas_kernels.flash_attention import flash_attention

    segments = None if q_segment_ids is None else (q_segment_ids, k_segment_ids)
    return flash_attention(q, k, v, causal=True, segment_ids=segments,
                           sliding_window=sliding_window, interpret=jax.default_backend() == "cpu")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
              k_positions: jax.Array, q_segment_ids: Optional[jax.Array] = None,
              k_segment_ids: Optional[jax.Array] = None, sliding_window: Optional[int] = None,
              plain_causal: bool = False, impl: str = "xla") -> jax.Array:
    """Attention with the masking rule of this module's docstring.

    `plain_causal=True` promises that positions are arange(T) for both q and k and there are no
    segments, so an implementation may use its own causal mask instead of the explicit one.
    """
    if impl == "pallas":
        return attention_pallas(q, k, v, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                                sliding_window=sliding_window)
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


# ---------------------------------------------------------------------------------------------
# Attention against a KV cache (prefill and decoding)

# Up to this many query tokens per sequence (a decode step, or speculative verification of
# gamma + 1 tokens) run the split-K decode kernel; longer chunks (prefill) run flash attention.
MAX_DECODE_QUERIES = 16


def attention_cached_xla(q: jax.Array, k: jax.Array, v: jax.Array, q_offsets: jax.Array,
                         sliding_window: Optional[int] = None) -> jax.Array:
    """q [B, T, N, H] against a cache layer k, v [B, K, S, H]; query t of sequence b sits at
    slot q_offsets[b] + t and sees slots s <= q_offsets[b] + t (bottom-right causal)."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    q_pos = q_offsets[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]  # [B, T]
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    mask = k_pos <= q_pos[:, :, None]  # [B, T, S]; slot q_pos itself is always visible
    if sliding_window is not None:
        mask &= q_pos[:, :, None] - k_pos < sliding_window
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksh->btkgh", weights.astype(v.dtype), v)
    return out.reshape(batch, q_len, num_heads, head_dim)


def _pallas_cached(q, k, v, q_offsets, sliding_window, layer=None, k_scale=None, v_scale=None):
    interpret = jax.default_backend() == "cpu"
    if q.shape[1] <= MAX_DECODE_QUERIES:
        from pallas_kernels.decode_attention import decode_attention

        return decode_attention(q, k, v, q_offsets, k_scale=k_scale, v_scale=v_scale, layer=layer,
                                sliding_window=sliding_window, interpret=interpret)
    from pallas_kernels.flash_attention import flash_attention

    k, v = _cache_layer(k, v, layer, k_scale, v_scale, q.dtype)
    # NOTE: prefill is compute bound; the [B, S, K, H] copy of the cache layer it needs is small
    # next to the T x S score work.
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    return flash_attention(q, k, v, causal=True, q_offset=q_offsets,
                           kv_lengths=q_offsets + q.shape[1], sliding_window=sliding_window,
                           interpret=interpret)


def _cache_layer(k, v, layer, k_scale, v_scale, dtype):
    """One layer [B, K, S, H] in `dtype` of a cache given as a layer or the stacked cache."""
    if layer is not None:
        k, v = k[layer], v[layer]
        k_scale, v_scale = (None, None) if k_scale is None else (k_scale[layer], v_scale[layer])
    if k_scale is not None:
        k = k.astype(jnp.float32) * k_scale[..., None]
        v = v.astype(jnp.float32) * v_scale[..., None]
    return k.astype(dtype), v.astype(dtype)


def _shard_over_mesh(fn, q, k, v, q_offsets, scales):
    """Run a Pallas call per device: batch over its mesh axes, heads over tensor, when the mesh
    set with `jax.set_mesh` has those axes (a kernel is not partitioned by GSPMD). k, v may
    carry a leading layer dim ([L, B, K, S, H]); scales are None or (k_scale, v_scale)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, q_offsets, scales)
    from jax.sharding import PartitionSpec as P

    batch_axes = tuple(a for a in sharding.LOGICAL_RULES["batch"]
                       if a in mesh.shape and mesh.shape[a] > 1)
    tensor = "tensor" if mesh.shape.get("tensor", 1) > 1 else None
    batch = batch_axes or None
    if q.shape[0] % max(1, _axes_size(mesh, batch_axes)) or k.shape[-3] % mesh.shape.get("tensor", 1):
        return fn(q, k, v, q_offsets, scales)  # does not divide: let GSPMD gather
    lead = (None,) * (k.ndim - 4)
    q_spec = P(batch, None, tensor, None)
    kv_spec, scale_spec = P(*lead, batch, tensor, None, None), P(*lead, batch, tensor, None)
    scale_specs = None if scales is None else (scale_spec, scale_spec)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch), scale_specs),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_offsets, scales)


def _axes_size(mesh, axes) -> int:
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def attention_cached(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offsets: jax.Array,
                     layer=None, k_scale: Optional[jax.Array] = None,
                     v_scale: Optional[jax.Array] = None, sliding_window: Optional[int] = None,
                     impl: str = "xla") -> jax.Array:
    """Attention of new tokens q [B, T, N, H] over a cache layer k, v [B, K, S, H] that already
    holds them; q_offsets [B] is each sequence's slot of query 0 (kv_cache.py's layout).

    layer: k, v are the whole stacked cache [L, B, K, S, H] and this is the layer to read (an
    int lets the decode kernel read it in place; a traced index slices it out). k_scale,
    v_scale [(L,) B, K, S]: an int8 cache's scales (the decode kernel dequantizes in registers).
    `pallas`: the split-K decode kernel for T <= MAX_DECODE_QUERIES, flash attention above;
    `xla` and `cudnn`: einsums on the cache layout (cuDNN wants [B, S, K, H]; transposing the
    whole cache every step would cost more than the attention itself).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    if impl != "pallas" or not (layer is None or isinstance(layer, int)):
        # Einsum paths, and a traced layer index (a BlockSpec cannot take it): slice it out.
        k, v = _cache_layer(k, v, layer, k_scale, v_scale, q.dtype)
        layer, k_scale, v_scale = None, None, None
    if impl != "pallas":
        return attention_cached_xla(q, k, v, q_offsets, sliding_window)

    def fn(q, k, v, o, scales):
        return _pallas_cached(q, k, v, o, sliding_window, layer, *(scales or (None, None)))

    scales = None if k_scale is None else (k_scale, v_scale)
    return _shard_over_mesh(fn, q, k, v, q_offsets, scales)
