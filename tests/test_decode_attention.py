"""pallas_kernels/decode_attention.py (interpret mode) against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention, decode_attention_reference


def _numpy_reference(q, k, v, offsets, window=None):
    """float64 softmax attention, one (sequence, head, query) at a time."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    out = np.zeros_like(q)
    for b in range(batch):
        for t in range(q_len):
            q_pos = offsets[b] + t
            slots = np.arange(k.shape[2])
            visible = slots <= q_pos
            if window is not None:
                visible &= q_pos - slots < window
            for n in range(num_heads):
                keys, values = k[b, n // group][visible], v[b, n // group][visible]
                scores = keys @ q[b, t, n] / np.sqrt(head_dim)
                weights = np.exp(scores - scores.max())
                out[b, t, n] = weights @ values / weights.sum()
    return out


def _inputs(seed, batch, q_len, num_heads, num_kv_heads, kv_len, head_dim):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, q_len, num_heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, num_kv_heads, kv_len, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, num_kv_heads, kv_len, head_dim), jnp.float32)
    return q, k, v


def _rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# (heads per kv head G, query tokens T, sliding window); S = 45 is not a block multiple.
@pytest.mark.parametrize("group,q_len,window", [(1, 1, None), (2, 5, None), (8, 3, 9)])
def test_decode_attention_matches_float64(group, q_len, window):
    num_kv_heads = 2
    q, k, v = _inputs(group, 3, q_len, group * num_kv_heads, num_kv_heads, 45, 16)
    offsets = np.array([0, 17, 45 - q_len])  # ragged: each sequence has its own length
    out = decode_attention(q, k, v, jnp.asarray(offsets), sliding_window=window, interpret=True)
    expected = _numpy_reference(q, k, v, offsets, window)
    assert out.shape == q.shape
    assert _rel_error(out, expected) <= 1e-5
    reference = decode_attention_reference(q, k, v, jnp.asarray(offsets), sliding_window=window)
    assert _rel_error(reference, expected) <= 1e-5
    # Slots past a sequence's last query are never read: garbage there changes nothing.
    k_garbage = k.at[1, :, 17 + q_len:].set(1e4)
    again = decode_attention(q, k_garbage, v, jnp.asarray(offsets), sliding_window=window,
                             interpret=True)
    np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(out[1]))


def test_decode_attention_int8_cache_and_explicit_splits():
    q, k, v = _inputs(11, 2, 2, 4, 2, 64, 32)
    scale_k = jnp.max(jnp.abs(k), axis=-1) / 127
    scale_v = jnp.max(jnp.abs(v), axis=-1) / 127
    k8 = jnp.round(k / scale_k[..., None]).astype(jnp.int8)
    v8 = jnp.round(v / scale_v[..., None]).astype(jnp.int8)
    offsets = jnp.array([30, 62])
    out = decode_attention(q, k8, v8, offsets, k_scale=scale_k, v_scale=scale_v, splits=4,
                           block_k=16, interpret=True)
    dequantized = _numpy_reference(q, k8 * scale_k[..., None], v8 * scale_v[..., None],
                                   np.asarray(offsets))
    assert _rel_error(out, dequantized) <= 1e-5
    assert _rel_error(out, _numpy_reference(q, k, v, np.asarray(offsets))) < 2e-2


def test_decode_attention_reads_one_layer_of_a_stacked_cache():
    """layer=i on the stacked [L, B, K, S, H] cache (bf16 and int8) equals attention over layer i;
    the other layers hold garbage that must not be read."""
    q, k, v = _inputs(5, 2, 1, 4, 2, 64, 16)
    offsets = jnp.array([20, 63])
    garbage = jnp.full_like(k, 1e4)
    stacked_k, stacked_v = jnp.stack([garbage, k, garbage]), jnp.stack([garbage, v, garbage])
    out = decode_attention(q, stacked_k, stacked_v, offsets, layer=1, interpret=True)
    assert _rel_error(out, _numpy_reference(q, k, v, np.asarray(offsets))) <= 1e-5
    scale_k = jnp.max(jnp.abs(k), axis=-1) / 127
    scale_v = jnp.max(jnp.abs(v), axis=-1) / 127
    k8 = jnp.round(k / scale_k[..., None]).astype(jnp.int8)
    v8 = jnp.round(v / scale_v[..., None]).astype(jnp.int8)
    junk8, junk_scale = jnp.full_like(k8, 127), jnp.full_like(scale_k, 1e4)
    out8 = decode_attention(q, jnp.stack([k8, junk8]), jnp.stack([v8, junk8]), offsets,
                            k_scale=jnp.stack([scale_k, junk_scale]),
                            v_scale=jnp.stack([scale_v, junk_scale]), layer=0, interpret=True)
    expected = _numpy_reference(q, k8 * scale_k[..., None], v8 * scale_v[..., None],
                                np.asarray(offsets))
    assert _rel_error(out8, expected) <= 1e-5


def _bf16(*xs):
    return tuple(x.astype(jnp.bfloat16) for x in xs)


# The Mosaic GPU kernel (decode_attention_mosaic.py) in Mosaic GPU's interpreter: (G, T, window,
# S). S = 45 pads to one 64-key block; 300 streams three 128-key blocks; 200 streams two over
# 2 splits, where the short sequence (offset 3) leaves the second split without a visible key
# (weight 0).
@pytest.mark.parametrize("group,q_len,window,kv_len", [(1, 1, None, 45), (4, 5, None, 300),
                                                       (8, 3, 40, 200)])
def test_mosaic_kernel_matches_float64(group, q_len, window, kv_len):
    num_kv_heads = 2
    q, k, v = _bf16(*_inputs(group + 20, 3, q_len, group * num_kv_heads, num_kv_heads, kv_len,
                             64))
    offsets = np.array([3, kv_len // 2, kv_len - q_len])
    out = decode_attention(q, k, v, jnp.asarray(offsets), sliding_window=window,
                           backend="mosaic", interpret=True)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    # bf16 inputs exactly; the kernel rounds P to bf16 for P V (and its output to bf16).
    assert _rel_error(out, _numpy_reference(q, k, v, offsets, window)) <= 1e-2
    k_garbage = k.at[0, :, 3 + q_len:].set(1e4)  # never visible to sequence 0
    again = decode_attention(q, k_garbage, v, jnp.asarray(offsets), sliding_window=window,
                             backend="mosaic", interpret=True)
    np.testing.assert_array_equal(np.asarray(again[0], np.float32), np.asarray(out[0], np.float32))


def test_mosaic_kernel_reads_one_layer_of_a_stacked_cache():
    q, k, v = _bf16(*_inputs(6, 2, 1, 8, 2, 128, 128))  # head_dim 128
    offsets = jnp.array([20, 127])
    garbage = jnp.full_like(k, 1e4)
    out = decode_attention(q, jnp.stack([garbage, k]), jnp.stack([garbage, v]), offsets,
                           layer=1, backend="mosaic", interpret=True)
    assert _rel_error(out, _numpy_reference(q, k, v, np.asarray(offsets))) <= 1e-2


def test_backend_choice_and_what_mosaic_refuses(hopper_lowering):
    """auto is Triton (measured faster), "mosaic" lowers to Mosaic GPU (for CUDA on CPU, no PTX);
    an explicit "mosaic" that cannot run names what it does not take."""
    def lowered(q, k, **kw):
        fn = lambda q, k, v, o: decode_attention(q, k, v, o, **kw)
        offsets = jax.ShapeDtypeStruct((q.shape[0],), jnp.int32)
        return jax.jit(fn).trace(q, k, k, offsets).lower(lowering_platforms=("cuda",)).as_text()

    q = jax.ShapeDtypeStruct((2, 1, 8, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 2, 512, 64), jnp.bfloat16)
    assert "mosaic_gpu" in lowered(q, k, backend="mosaic")
    assert "mosaic_gpu" not in lowered(q, k) and "decode_attention" in lowered(q, k)
    wide = jnp.zeros((2, 17, 8, 64), jnp.bfloat16)  # 17 x 4 = 68 rows a kv head > 64
    with pytest.raises(ValueError, match="68 rows"):
        decode_attention(wide, *_bf16(*_inputs(1, 2, 1, 8, 2, 512, 64)[1:]), jnp.array([0, 0]),
                         backend="mosaic", interpret=True)
    qf, kf, vf = _inputs(1, 1, 1, 2, 1, 64, 16)
    with pytest.raises(ValueError, match="head_dim 16"):
        decode_attention(*_bf16(qf, kf, vf), jnp.array([5]), backend="mosaic", interpret=True)
    with pytest.raises(ValueError, match="dtype float32"):
        decode_attention(*_inputs(1, 1, 1, 2, 1, 64, 64), jnp.array([5]), backend="mosaic",
                         interpret=True)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        decode_attention(qf, kf, vf, jnp.array([5]), backend="cuda", interpret=True)
