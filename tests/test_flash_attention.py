"""Pallas flash attention (interpret mode on CPU) against an independent float64 numpy oracle.

Each case checks the output and dq, dk, dv (jax.vjp with a random cotangent) of the kernel, and
the output of `flash_attention_reference`, against `numpy_attention`, which derives the gradients
by hand. Tiles are 16 so short sequences still span several blocks and lengths that are not block
multiples exercise the padding; shapes are prime-ish so a swapped dim fails loudly.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import (FlashConfig, KernelBlocks, _segment_block_ranges,
                                            default_config, flash_attention,
                                            flash_attention_reference)

SMALL = FlashConfig(KernelBlocks(16, 16, 4, 1), KernelBlocks(16, 16, 4, 1),
                    KernelBlocks(16, 16, 4, 1))


def numpy_mask(batch, q_len, kv_len, causal, q_offset, kv_lengths, q_seg, kv_seg, window):
    q_pos = np.broadcast_to(np.asarray(q_offset), (batch,))[:, None] + np.arange(q_len)  # [B, T]
    k_pos = np.arange(kv_len)[None, None, :]
    mask = np.ones((batch, q_len, kv_len), bool)
    if causal:
        mask &= k_pos <= q_pos[:, :, None]
    if window is not None:
        mask &= q_pos[:, :, None] - k_pos < window
    if kv_lengths is not None:
        mask &= k_pos < np.asarray(kv_lengths)[:, None, None]
    if q_seg is not None:
        mask &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
    return mask


def numpy_attention(q, k, v, do, mask, softcap=None):
    """float64 attention and its hand-derived vjp: returns out, dq, dk, dv."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5
    q5 = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
    do5 = do.reshape(q5.shape)
    x = np.einsum("btkgh,bskh->bkgts", q5, k) * scale
    tanh = None
    if softcap is not None:
        tanh = np.tanh(x / softcap)
        x = softcap * tanh
    m = mask[:, None, None]
    x = np.where(m, x, -np.inf)
    peak = x.max(-1, keepdims=True)
    p = np.where(m, np.exp(x - np.where(np.isfinite(peak), peak, 0.0)), 0.0)
    total = p.sum(-1, keepdims=True)
    p = p / np.where(total == 0, 1.0, total)
    out = np.einsum("bkgts,bskh->btkgh", p, v)
    dv = np.einsum("bkgts,btkgh->bskh", p, do5)
    dp = np.einsum("btkgh,bskh->bkgts", do5, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    if tanh is not None:
        ds = ds * (1.0 - tanh ** 2)
    ds = ds * scale
    dq = np.einsum("bkgts,bskh->btkgh", ds, k)
    dk = np.einsum("bkgts,btkgh->bskh", ds, q5)
    shape = (batch, q_len, num_heads, head_dim)
    return out.reshape(shape), dq.reshape(shape), dk, dv


def random_inputs(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype):
    rng = np.random.default_rng(seed)
    shapes = [(batch, q_len, num_heads, head_dim), (batch, kv_len, num_kv_heads, head_dim),
              (batch, kv_len, num_kv_heads, head_dim), (batch, q_len, num_heads, head_dim)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def rel_error(got, want):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    assert np.isfinite(got).all(), "non-finite values in the kernel output"
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def check(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, *, dtype=jnp.float32,
          tol=1e-5, config=SMALL, causal=True, segment_ids=None, q_offset=None, kv_lengths=None,
          sliding_window=None, softcap=None):
    q, k, v, do = random_inputs(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim,
                                dtype)
    rules = dict(causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                 kv_lengths=kv_lengths, sliding_window=sliding_window, softcap=softcap)
    if isinstance(segment_ids, tuple):
        q_seg, kv_seg = segment_ids
    else:
        q_seg = kv_seg = segment_ids
    mask = numpy_mask(batch, q_len, kv_len, causal, 0 if q_offset is None else q_offset,
                      kv_lengths, q_seg, kv_seg, sliding_window)
    want = numpy_attention(q, k, v, do, mask, softcap)

    out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, config=config, interpret=True,
                                                       **rules), q, k, v)
    got = (out, *vjp(do))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype, name
        assert rel_error(g, w) <= tol, (name, rel_error(g, w))
    reference = flash_attention_reference(q, k, v, **rules)
    assert rel_error(reference, want[0]) <= tol
    return mask, got


@pytest.mark.parametrize("num_heads,num_kv_heads,causal", [(6, 6, True), (6, 3, False),
                                                           (8, 1, True)])
def test_gqa_ratios_and_ragged_lengths(num_heads, num_kv_heads, causal):
    check(0, 2, 37, 37, num_heads, num_kv_heads, 16, causal=causal)


def test_default_config_shrinks_tiles():
    check(1, 1, 45, 45, 4, 2, 32, config=None)


@pytest.mark.parametrize("lengths", [(11, 20, 10), (40, 24, 33)])
def test_packed_documents_with_one_segment_array(lengths):
    # (40, 24, 33): documents spanning whole 16-blocks, which then run without the mask.
    seg = np.repeat([[0, 1, 2], [5, 5, 7]], lengths, axis=1)
    check(2, 2, seg.shape[1], seg.shape[1], 4, 2, 16, segment_ids=jnp.asarray(seg))


def test_unsorted_segment_ids():
    """Ids in no order (documents interleaved, boundaries inside blocks): the segment block
    ranges are only a bound there, and the result must still be exact."""
    seg = np.random.default_rng(7).integers(0, 3, size=(2, 53))
    seg[1, 20:40] = 9  # one id used only in the middle of row 1
    check(8, 2, 53, 53, 4, 2, 16, segment_ids=jnp.asarray(seg))


def test_segment_block_ranges_skip_other_documents():
    # Documents of 32, 40 and 56 rows, blocks of 16. Blocks 0-1 (document 0) see key blocks
    # 0-1, all of one id; blocks 2-3 hold rows 32-63 of document 1 (rows 32-71), which spans key
    # blocks 2-4, of which 2-3 hold only id 1; block 4 holds ids 1 and 2: key blocks 2-7, none
    # unmasked; blocks 5-7 (document 2) see key blocks 4-7, of which 5-7 hold only id 2.
    seg = jnp.asarray(np.repeat([[0, 1, 2]], [32, 40, 56], axis=1))
    ranges = np.asarray(_segment_block_ranges(seg, seg, 16, 16))[0]
    np.testing.assert_array_equal(ranges[:, 0], [0, 0, 2, 2, 2, 4, 4, 4])  # lo
    np.testing.assert_array_equal(ranges[:, 1], [2, 2, 5, 5, 8, 8, 8, 8])  # hi
    full = ranges[:, 3] - ranges[:, 2]
    np.testing.assert_array_equal(np.where(full > 0, ranges[:, 2], -1), [0, 0, 2, 2, -1, 5, 5, 5])
    np.testing.assert_array_equal(np.maximum(full, 0), [2, 2, 2, 2, 0, 3, 3, 3])
    # A run of one-id blocks stops at the first other block even when the id comes back.
    ranges = np.asarray(_segment_block_ranges(jnp.zeros((1, 16), jnp.int32),
                                              jnp.asarray([[0] * 32 + [1] * 16 + [0] * 16]), 16, 16))
    np.testing.assert_array_equal(ranges[0, 0], [0, 4, 0, 2])
    # Against keys of another sequence (chunked prefill): no overlap gives an empty range.
    ranges = _segment_block_ranges(seg[:, :32], jnp.full((1, 64), 5), 16, 32)
    np.testing.assert_array_equal(ranges[..., 1] - ranges[..., 0], [[0, 0]])


def test_chunked_prefill_with_offsets_and_lengths():
    # Chunk of 21 queries against a cache of 53 slots; batch row 2 has no valid key at all.
    mask, (out, dq, _, _) = check(3, 3, 21, 53, 4, 2, 16, q_offset=jnp.array([32, 5, 0]),
                                  kv_lengths=jnp.array([53, 26, 0]))
    assert not mask[2].any()
    assert np.all(np.asarray(out[2]) == 0) and np.all(np.asarray(dq[2]) == 0)


def test_chunked_prefill_with_segment_pair_and_scalar_offset():
    q_seg = np.repeat([[1, 2]], [9, 14], axis=1)  # [1, 23]
    kv_seg = np.repeat([[3, 1, 2]], [10, 20, 18], axis=1)  # [1, 48]; segment 2 starts at key 30
    check(4, 1, 23, 48, 4, 2, 16, q_offset=25,
          segment_ids=(jnp.asarray(q_seg), jnp.asarray(kv_seg)))


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_and_softcap(causal):
    # 70 keys over tiles of 16 with a window of 9: whole key blocks are skipped.
    check(5, 1, 70, 70, 2, 1, 16, causal=causal, sliding_window=9, softcap=3.0)


def test_bfloat16_inputs():
    check(6, 1, 33, 33, 4, 2, 32, dtype=jnp.bfloat16, tol=2e-2, softcap=20.0)


def test_unsupported_cases_name_the_constraint():
    q = jnp.ones((1, 16, 4, 48))
    with pytest.raises(ValueError, match="head_dim 48"):
        flash_attention(q, q, q, interpret=True)
    q = jnp.ones((1, 16, 3, 16))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        flash_attention(q, q[:, :, :2], q[:, :, :2], interpret=True)
    k = jnp.ones((1, 32, 3, 16))
    with pytest.raises(ValueError, match="T == S"):
        flash_attention(q, k, k, segment_ids=jnp.zeros((1, 16), jnp.int32), interpret=True)
    bad = FlashConfig(KernelBlocks(24, 16, 4, 1), SMALL.backward_dkv, SMALL.backward_dq)
    with pytest.raises(ValueError, match="power of 2"):
        flash_attention(q, q, q, config=bad, interpret=True)


@pytest.mark.parametrize("rules", [dict(causal=True), dict(causal=False, kv_lengths=True),
                                   dict(segment_ids=True, sliding_window=64, softcap=30.0)])
def test_kernels_lower_to_triton_ir(hopper_lowering, rules):
    """Lower forward+backward for CUDA on CPU, up to Triton IR (no PTX): catches constructs the
    Triton lowering rejects, which interpret mode accepts (fixture in conftest.py)."""
    q = jax.ShapeDtypeStruct((2, 200, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 200, 2, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 200), jnp.int32)

    def grads(q, k, v, ids):
        kwargs = dict(rules, segment_ids=ids if rules.get("segment_ids") else None,
                      kv_lengths=ids[:, 0] if rules.get("kv_lengths") else None)
        loss = lambda q, k, v: flash_attention(q, k, v, **kwargs).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    text = jax.jit(grads).trace(q, k, k, ids).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("flash_attention_") >= 3  # forward, dkv, dq kernels


def test_mosaic_kernels_lower_for_hopper_where_they_apply(hopper_lowering, monkeypatch):
    """On Hopper, the "auto" backends run forward and backward on Mosaic GPU for plain causal or
    full attention, and Triton for every case Mosaic GPU does not take; each can be forced to one
    side. Lowered for CUDA on CPU (no PTX); numerics are checked on the GPU by
    tools/check_attention_gpu.py."""
    fa = importlib.import_module("pallas_kernels.flash_attention")
    monkeypatch.setattr(fa, "_on_hopper", lambda: True)
    q = jax.ShapeDtypeStruct((2, 256, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 256, 2, 128), jnp.bfloat16)
    ids = jnp.repeat(jnp.arange(2)[None], 128, axis=1).reshape(1, 256).repeat(2, axis=0)
    triton = ('"flash_attention_forward"', '"flash_attention_backward_dkv"',
              '"flash_attention_backward_dq"')

    def lowered(**rules):
        loss = lambda q, k, v: flash_attention(q, k, v, **rules).astype(jnp.float32).sum()
        grads = jax.grad(loss, argnums=(0, 1, 2))
        return jax.jit(grads).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()

    for causal in (True, False):
        text = lowered(causal=causal)
        assert "mosaic_gpu" in text and not any(name in text for name in triton)
    text = lowered(causal=True, segment_ids=ids)  # not a Mosaic case: Triton all the way
    assert "mosaic_gpu" not in text and all(name in text for name in triton)
    forward_only = dataclasses.replace(default_config(128), backward_backend="triton")
    text = lowered(causal=True, config=forward_only)
    assert "mosaic_gpu" in text and '"flash_attention_forward"' not in text
    assert all(name in text for name in triton[1:])


def test_forced_mosaic_backend_names_what_it_does_not_take(monkeypatch):
    fa = importlib.import_module("pallas_kernels.flash_attention")
    mosaic = dataclasses.replace(default_config(128), forward_backend="mosaic_gpu")
    q = jnp.ones((1, 256, 2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="interpret mode"):
        flash_attention(q, q, q, config=mosaic, interpret=True)
    with pytest.raises(ValueError, match="other than Hopper"):  # this CPU
        flash_attention(q, q, q, config=mosaic)
    monkeypatch.setattr(fa, "_on_hopper", lambda: True)
    with pytest.raises(ValueError, match=r"softcap, .*T=200 \(needs a multiple of 128\)"):
        flash_attention(q[:, :200], q[:, :200], q[:, :200], softcap=5.0, config=mosaic)
    with pytest.raises(ValueError, match="causal with T=128 != S=256"):
        flash_attention(q[:, :128], q, q, config=mosaic)
    with pytest.raises(ValueError, match="float32"):
        flash_attention(*(q.astype(jnp.float32),) * 3, config=mosaic)
    with pytest.raises(ValueError, match="forward_backend='cuda'"):
        flash_attention(q, q, q, config=dataclasses.replace(mosaic, forward_backend="cuda"))
    backward = dataclasses.replace(default_config(128), backward_backend="mosaic_gpu")
    with pytest.raises(ValueError, match="backward_backend='mosaic_gpu' does not take segment_ids"):
        flash_attention(q, q, q, config=backward, segment_ids=jnp.zeros((1, 256), jnp.int32))
