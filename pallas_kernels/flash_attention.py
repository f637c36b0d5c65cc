"""Flash attention (FlashAttention-2) in Pallas for the Triton GPU backend, with a jnp reference.

Layouts and masking follow jaxlm/attention.py: q [B, T, N, H]; k, v [B, S, K, H] with G = N // K
query heads per kv head (grouped-query attention; K/V are never repeated: the index maps send
query head n to kv head n // G). Every rule below is True = attend, in position space:
    q_pos[b, t] = q_offset[b] + t            k_pos[s] = s
    causal:          k_pos <= q_pos          (bottom-right aligned when q_offset = S - T)
    kv_lengths:      k_pos < kv_lengths[b]   (keys past the valid length are masked)
    segment_ids:     q_seg[b, t] == kv_seg[b, s]
    sliding_window:  q_pos - k_pos < window  (applied as written, with or without causal)
`segment_ids` is one int array [B, T] for self-attention (T == S) or a pair
(q_segment_ids [B, T], kv_segment_ids [B, S]) for chunked prefill against a cache.
`softcap` caps the scaled scores: s = softcap * tanh(s / softcap) (Gemma 2).
A query row with no allowed key outputs zeros and receives zero gradients.

Algorithm (Dao 2023, FlashAttention-2 sections 3.1-3.2): the forward kernel keeps one query block
resident and streams key blocks with an online softmax in base 2, saving the logsumexp (log2
units) per row. The backward pass recomputes probabilities from it: delta = rowsum(dO * O) is one
XLA fusion, then a dK/dV kernel keeps a key block resident and loops over the query blocks (and
the G query heads of its kv head, so GQA needs no atomics nor a per-head dK buffer), and a dQ
kernel keeps a query block resident and loops over key blocks. All accumulation is float32.
Key blocks that the causal/window/length rules fully mask are skipped through the loop bounds;
blocks that are fully visible run without computing a mask (the interior of a causal triangle).
With segment ids, the loop bounds also shrink to the blocks whose segment-id range [min, max]
overlaps the resident block's, and blocks holding only the resident block's single id skip the
segment mask (`_segment_block_ranges`, a small jnp pre-pass): packed documents then cost what
their own causal triangles cost, not the whole row's. Exact for sorted ids (packing),
conservative for any others.

Lengths that are not block multiples are padded in the wrapper: padded keys are masked by the
key-length rule, padded query rows are computed and dropped (their cotangent is zero).

Backends: every kernel here lowers through `pl.pallas_call` to Triton (`interpret=True` runs the
same code on CPU). On Hopper the forward and the backward run on Mosaic GPU instead
(pallas_kernels/flash_attention_mosaic.py: wgmma, TMA, warp specialization) for the cases it
takes; `FlashConfig.forward_backend` / `backward_backend` and `_select_backends` say when. Both
forwards save the same residuals, so either backward follows either forward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
# NOTE: finite on purpose: with -inf, a row masked so far gives exp2(-inf - -inf) = NaN in the
# online-softmax rescale. Probabilities of masked entries are zeroed explicitly instead.
MASK_VALUE = -1e30
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MIN_BLOCK = 16  # smallest tile Triton's tl.dot accepts


@dataclasses.dataclass(frozen=True)
class KernelBlocks:
    """Tile sizes and Triton launch parameters of one kernel (block sizes: powers of 2, >= 16)."""
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


BACKENDS = ("auto", "triton", "mosaic_gpu")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Per-kernel tiles. dK/dV: `block_k` is resident, `block_q` streams; dQ: the reverse.

    forward_backend: "triton" (every case, and interpret mode), "mosaic_gpu" (Hopper only, the
    cases `flash_attention_mosaic.supports` takes; anything else is an error naming the
    constraint) or "auto" (`_select_backends`: Mosaic GPU where it applies, else Triton).
    backward_backend: the same choice for the dQ and dK/dV kernels.
    """
    forward: KernelBlocks
    backward_dkv: KernelBlocks
    backward_dq: KernelBlocks
    forward_backend: str = "auto"
    backward_backend: str = "auto"


def default_config(head_dim: int) -> FlashConfig:
    """Hopper (H100) starting points in the range of Triton's fused-attention tutorial tiles."""
    if head_dim <= 64:
        return FlashConfig(KernelBlocks(128, 64, 4, 3), KernelBlocks(32, 128, 4, 3),
                           KernelBlocks(128, 32, 4, 3))
    if head_dim <= 128:
        # Backward tiles from the H200 sweeps in docs/benchmarks.md (fwd+bwd 251 -> 333 TFLOP/s).
        return FlashConfig(KernelBlocks(128, 64, 8, 3), KernelBlocks(64, 64, 4, 2),
                           KernelBlocks(128, 32, 8, 3))
    return FlashConfig(KernelBlocks(64, 32, 4, 2), KernelBlocks(16, 32, 4, 1),
                       KernelBlocks(32, 16, 4, 1))


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialize on (hashable: a nondiff argument of the custom_vjp)."""
    causal: bool
    window: Optional[int]
    softcap: Optional[float]
    sm_scale: float
    segments: bool
    mask_kv_length: bool  # kv_lengths given, or keys padded to a block multiple
    group: int  # G = N // K
    config: FlashConfig
    interpret: bool
    mosaic: bool = False  # the forward runs flash_attention_mosaic.mosaic_forward
    mosaic_backward: bool = False  # the backward runs flash_attention_mosaic.mosaic_backward


# ----------------------------------------------------------------------------- kernel helpers


def _dot(a, b, *, ta: bool = False, tb: bool = False):
    """a @ b (a.T / b.T when asked) with float32 accumulation; fp32 inputs stay IEEE (no TF32)."""
    contract = ((0 if ta else 1,), (1 if tb else 0,))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _cdiv(x, d: int):
    return lax.div(x + (d - 1), d)  # x >= 0 at every call site, so truncation == floor


def _scores(q, k, st: _Static):
    """Scaled (and capped) logits in log2 units, plus tanh for the softcap derivative."""
    s = _dot(q, k, tb=True) * st.sm_scale
    if st.softcap is None:
        return s * LOG2E, None
    t = jnp.tanh(s / st.softcap)
    return t * (st.softcap * LOG2E), t


def _mask(st: _Static, q_pos, k_pos, kv_len, q_seg, kv_seg):
    """Boolean [bq, bk] from q_pos [bq, 1], k_pos [1, bk]; None when nothing is masked."""
    # NOTE: broadcast the int positions, not a [1, bk] boolean: the Triton lowering fails on
    # broadcasting i1 tensors (an i1 * i32 multiply).
    shape = (q_pos.shape[0], k_pos.shape[1])
    q_pos, k_pos = jnp.broadcast_to(q_pos, shape), jnp.broadcast_to(k_pos, shape)
    mask = None

    def both(m):
        return m if mask is None else mask & m

    if st.causal:
        mask = both(k_pos <= q_pos)
    if st.window is not None:
        mask = both(q_pos - k_pos < st.window)
    if st.mask_kv_length:
        mask = both(k_pos < kv_len)
    if st.segments:
        mask = both(q_seg[:, None] == kv_seg[None, :])
    return mask


def _zero_unless(cond, x):
    # NOTE: not jnp.where: selecting between Python ints lowers to an i1 loop bound in Triton.
    return x * cond.astype(jnp.int32)


def _loop(lo, hi, full_lo, full_hi, body, carry):
    """Run body(j, carry, masked) over [lo, hi); blocks in [full_lo, full_hi) skip the mask."""
    if full_lo is None:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
    full_lo = jnp.minimum(jnp.maximum(full_lo, lo), hi)
    full_hi = jnp.minimum(jnp.maximum(full_hi, full_lo), hi)
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _segment_block_ranges(rows_seg, cols_seg, block_rows: int, block_cols: int):
    """Per block of `rows_seg` [B, R] (R a multiple of block_rows): [B, R / block_rows, 4] =
    (lo, hi, full_lo, full_hi). [lo, hi) are the blocks of `cols_seg` [B, C] whose segment-id
    interval overlaps this block's (lo == hi when none does): blocks outside cannot hold an
    equal id; blocks inside may not either when ids are not sorted (the mask handles those).
    [full_lo, full_hi) is a run of blocks holding one id, the same single id as this block:
    there the segment rule masks nothing (empty when there is none)."""
    batch = rows_seg.shape[0]
    rows = rows_seg.reshape(batch, -1, block_rows)
    cols = cols_seg.reshape(batch, -1, block_cols)
    row_min, row_max = rows.min(-1)[:, :, None], rows.max(-1)[:, :, None]
    col_min, col_max = cols.min(-1)[:, None, :], cols.max(-1)[:, None, :]
    num_cols = cols.shape[1]
    index = jnp.arange(num_cols, dtype=jnp.int32)

    def first_true(m):  # [B, nR, nC] -> index of the first True, num_cols when none
        return jnp.where(m.any(-1), jnp.argmax(m, axis=-1), num_cols).astype(jnp.int32)

    overlap = (col_min <= row_max) & (col_max >= row_min)
    lo = first_true(overlap)
    hi = jnp.maximum(num_cols - first_true(overlap[..., ::-1]), lo)
    same = (row_min == row_max) & (col_min == col_max) & (col_min == row_min)
    full_lo = first_true(same)
    full_hi = first_true(~same & (index >= full_lo[..., None]))  # where the run ends
    return jnp.stack([lo, hi, full_lo, full_hi], axis=-1)


def _within(bounds, ranges_ref):
    """Loop bounds from `_key_blocks` / `_query_blocks` narrowed by a segment range: the loop
    to [lo, hi), the unmasked run to where the segment rule masks nothing too."""
    if ranges_ref is None:
        return bounds
    lo, hi, full_lo, full_hi = bounds
    lo = jnp.maximum(lo, ranges_ref[0])
    hi = jnp.maximum(jnp.minimum(hi, ranges_ref[1]), lo)
    return lo, hi, jnp.maximum(full_lo, ranges_ref[2]), jnp.minimum(full_hi, ranges_ref[3])


def _key_blocks(st: _Static, first_q, block_q: int, block_k: int, kv_len):
    """Key-block range [lo, hi) a query block at absolute positions first_q.. can see, and the
    sub-range where every (query, key) pair is allowed (None: masks everywhere)."""
    last_q = first_q + block_q - 1
    end = jnp.minimum(kv_len, last_q + 1) if st.causal else kv_len
    hi = _cdiv(jnp.maximum(end, 0), block_k)
    lo = 0 if st.window is None else lax.div(jnp.maximum(first_q - st.window + 1, 0), block_k)
    full_lo = lo if st.window is None else _cdiv(jnp.maximum(last_q - st.window + 1, 0), block_k)
    full_hi = hi
    if st.mask_kv_length:
        full_hi = jnp.minimum(full_hi, lax.div(kv_len, block_k))
    if st.causal:
        full_hi = jnp.minimum(full_hi, lax.div(first_q + 1, block_k))
    return lo, hi, full_lo, full_hi


def _query_blocks(st: _Static, first_k, block_q: int, block_k: int, q_offset, kv_len, q_len):
    """Query-block range (local indices) that sees a key block at first_k.., and its unmasked
    sub-range; the mirror image of `_key_blocks`. q_len is the padded query length."""
    last_k = first_k + block_k - 1
    lo = 0 if not st.causal else lax.div(jnp.maximum(first_k - q_offset, 0), block_q)
    hi = q_len // block_q
    if st.window is not None:
        hi = jnp.minimum(hi, _cdiv(jnp.maximum(last_k + st.window - q_offset, 0), block_q))
    if st.mask_kv_length:
        hi = _zero_unless(first_k < kv_len, hi)
    hi = jnp.maximum(hi, lo)
    full_lo = lo if not st.causal else _cdiv(jnp.maximum(last_k - q_offset, 0), block_q)
    full_hi = hi
    if st.window is not None:
        full_hi = jnp.minimum(full_hi, lax.div(jnp.maximum(first_k + st.window - q_offset, 0),
                                               block_q))
    if st.mask_kv_length:
        full_hi = _zero_unless(last_k < kv_len, full_hi)
    return lo, hi, full_lo, full_hi


# ----------------------------------------------------------------------------- forward kernel


def _forward_kernel(q_offset_ref, kv_len_ref, q_ref, k_ref, v_ref, *rest, st: _Static):
    q_seg_ref, kv_seg_ref, ranges_ref, o_ref, lse_ref = (
        rest if st.segments else (None, None, None, *rest))
    block_q, block_k = st.config.forward.block_q, st.config.forward.block_k
    q_offset, kv_len = q_offset_ref[0], kv_len_ref[0]
    first_q = q_offset + pl.program_id(0) * block_q
    q_pos = first_q + jnp.arange(block_q)[:, None]
    q = q_ref[...]  # [bq, H]
    q_seg = q_seg_ref[...] if st.segments else None

    def body(j, carry, masked):
        acc, m, l = carry
        keys = pl.ds(j * block_k, block_k)
        s, _ = _scores(q, k_ref[keys, :], st)  # [bq, bk]
        mask = None
        if masked:
            k_pos = j * block_k + jnp.arange(block_k)[None, :]
            mask = _mask(st, q_pos, k_pos, kv_len, q_seg, kv_seg_ref[keys] if st.segments else None)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp2(m - m_new)
        v = v_ref[keys, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    head_dim = q_ref.shape[-1]
    carry = (jnp.zeros((block_q, head_dim), jnp.float32),
             jnp.full((block_q,), MASK_VALUE, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    bounds = _within(_key_blocks(st, first_q, block_q, block_k, kv_len), ranges_ref)
    acc, m, l = _loop(*bounds, body, carry)
    empty = l == 0.0  # no allowed key: output 0, and a finite lse the backward never uses
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _range_specs():
    """BlockSpec of the [B, blocks, 4] segment ranges: the 4 of this program's block (grid
    axis 0) and batch (grid axis 1)."""
    return [pl.BlockSpec((None, None, 4), lambda i, b, n: (b, i, 0))]


def _bounds_specs(grid_batch_axis: int):
    """BlockSpecs for the per-batch scalars q_offset [B] and kv_len [B] (one element each)."""
    spec = pl.BlockSpec((1,), lambda *ids: (ids[grid_batch_axis],))
    return [spec, spec]


def _forward(q, k, v, q_seg, kv_seg, q_offset, kv_len, st: _Static):
    batch, q_len, num_heads, head_dim = q.shape
    kv_seq = k.shape[1]
    blocks, group = st.config.forward, st.group
    in_specs = _bounds_specs(1) + [
        pl.BlockSpec((None, blocks.block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, kv_seq, None, head_dim), lambda i, b, n: (b, 0, n // group, 0)),
        pl.BlockSpec((None, kv_seq, None, head_dim), lambda i, b, n: (b, 0, n // group, 0)),
    ]
    args = [q_offset, kv_len, q, k, v]
    if st.segments:
        in_specs += [pl.BlockSpec((None, blocks.block_q), lambda i, b, n: (b, i)),
                     pl.BlockSpec((None, kv_seq), lambda i, b, n: (b, 0))] + _range_specs()
        args += [q_seg, kv_seg, _segment_block_ranges(q_seg, kv_seg, blocks.block_q,
                                                       blocks.block_k)]
    return pl.pallas_call(
        functools.partial(_forward_kernel, st=st),
        grid=(q_len // blocks.block_q, batch, num_heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, blocks.block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
            pl.BlockSpec((None, None, blocks.block_q), lambda i, b, n: (b, n, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=st.interpret,
        name="flash_attention_forward",
    )(*args)


# ----------------------------------------------------------------------------- backward kernels


def _probs_and_dscores(st: _Static, masked, q, k, v, do, lse, delta, q_pos, k_pos, kv_len,
                       q_seg, kv_seg):
    """Recomputed probabilities P [bq, bk] and dS = d loss / d(q k^T) (before sm_scale)."""
    s, t = _scores(q, k, st)
    p = jnp.exp2(s - lse[:, None])
    mask = _mask(st, q_pos, k_pos, kv_len, q_seg, kv_seg) if masked else None
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    ds = p * (_dot(do, v, tb=True) - delta[:, None])
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(c tanh(x / c)) / dx
    return p, ds * st.sm_scale


def _dkv_kernel(q_offset_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
                st: _Static):
    q_seg_ref, kv_seg_ref, ranges_ref, dk_ref, dv_ref = (
        rest if st.segments else (None, None, None, *rest))
    block_q, block_k = st.config.backward_dkv.block_q, st.config.backward_dkv.block_k
    q_offset, kv_len = q_offset_ref[0], kv_len_ref[0]
    first_k = pl.program_id(0) * block_k
    k_pos = first_k + jnp.arange(block_k)[None, :]
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    kv_seg = kv_seg_ref[...] if st.segments else None
    bounds = _within(_query_blocks(st, first_k, block_q, block_k, q_offset, kv_len,
                                   q_ref.shape[0]), ranges_ref)

    def body(i, carry, masked, g):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        q_pos = q_offset + i * block_q + jnp.arange(block_q)[:, None]
        p, ds = _probs_and_dscores(st, masked, q, k, v, do, lse_ref[g, rows], delta_ref[g, rows],
                                   q_pos, k_pos, kv_len, q_seg_ref[rows] if st.segments else None,
                                   kv_seg)
        dv = dv + _dot(p.astype(do.dtype), do, ta=True)
        dk = dk + _dot(ds.astype(q.dtype), q, ta=True)
        return dk, dv

    head_dim = k_ref.shape[-1]
    carry = (jnp.zeros((block_k, head_dim), jnp.float32),) * 2
    # NOTE: the G query heads of this kv head are unrolled statically (Triton needs no dynamic
    # index into the head dim then); G is small (1-8 in practice).
    for g in range(st.group):
        def body_g(i, carry, masked, g=g):
            return body(i, carry, masked, g)
        carry = _loop(*bounds, body_g, carry)
    dk, dv = carry
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_offset_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
               st: _Static):
    q_seg_ref, kv_seg_ref, ranges_ref, dq_ref = (
        rest if st.segments else (None, None, None, *rest))
    block_q, block_k = st.config.backward_dq.block_q, st.config.backward_dq.block_k
    q_offset, kv_len = q_offset_ref[0], kv_len_ref[0]
    first_q = q_offset + pl.program_id(0) * block_q
    q_pos = first_q + jnp.arange(block_q)[:, None]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = q_seg_ref[...] if st.segments else None

    def body(j, dq, masked):
        keys = pl.ds(j * block_k, block_k)
        k = k_ref[keys, :]
        k_pos = j * block_k + jnp.arange(block_k)[None, :]
        _, ds = _probs_and_dscores(st, masked, q, k, v_ref[keys, :], do, lse, delta, q_pos, k_pos,
                                   kv_len, q_seg, kv_seg_ref[keys] if st.segments else None)
        return dq + _dot(ds.astype(k.dtype), k)

    bounds = _within(_key_blocks(st, first_q, block_q, block_k, kv_len), ranges_ref)
    dq = _loop(*bounds, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_call(st: _Static, q, k, v, do, lse, delta, q_seg, kv_seg, q_offset, kv_len):
    """dK, dV over a grid (key block, batch, kv head); each program sees all G query heads."""
    batch, q_len, _, head_dim = q.shape
    kv_seq, num_kv_heads = k.shape[1], k.shape[2]
    blocks, group = st.config.backward_dkv, st.group
    rows_spec = pl.BlockSpec((None, q_len, group, head_dim), lambda j, b, h: (b, 0, h, 0))
    keys_spec = pl.BlockSpec((None, blocks.block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
    stats_spec = pl.BlockSpec((None, group, q_len), lambda j, b, h: (b, h, 0))
    in_specs = _bounds_specs(1) + [rows_spec, keys_spec, keys_spec, rows_spec, stats_spec,
                                   stats_spec]
    args = [q_offset, kv_len, q, k, v, do, lse, delta]
    if st.segments:
        in_specs += [pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)),
                     pl.BlockSpec((None, blocks.block_k), lambda j, b, h: (b, j))] + _range_specs()
        args += [q_seg, kv_seg, _segment_block_ranges(kv_seg, q_seg, blocks.block_k,
                                                       blocks.block_q)]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid=(kv_seq // blocks.block_k, batch, num_kv_heads),
        in_specs=in_specs,
        out_specs=[keys_spec, keys_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=st.interpret,
        name="flash_attention_backward_dkv",
    )(*args)


def _dq_call(st: _Static, q, k, v, do, lse, delta, q_seg, kv_seg, q_offset, kv_len):
    """dQ over a grid (query block, batch, head), like the forward."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_seq = k.shape[1]
    blocks, group = st.config.backward_dq, st.group
    q_spec = pl.BlockSpec((None, blocks.block_q, None, head_dim), lambda i, b, n: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, kv_seq, None, head_dim), lambda i, b, n: (b, 0, n // group, 0))
    row_stats = pl.BlockSpec((None, None, blocks.block_q), lambda i, b, n: (b, n, i))
    in_specs = _bounds_specs(1) + [q_spec, kv_spec, kv_spec, q_spec, row_stats, row_stats]
    args = [q_offset, kv_len, q, k, v, do, lse, delta]
    if st.segments:
        in_specs += [pl.BlockSpec((None, blocks.block_q), lambda i, b, n: (b, i)),
                     pl.BlockSpec((None, kv_seq), lambda i, b, n: (b, 0))] + _range_specs()
        args += [q_seg, kv_seg, _segment_block_ranges(q_seg, kv_seg, blocks.block_q,
                                                       blocks.block_k)]
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(q_len // blocks.block_q, batch, num_heads),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=st.interpret,
        name="flash_attention_backward_dq",
    )(*args)


def _backward(st: _Static, residuals, do):
    q, k, v, q_seg, kv_seg, q_offset, kv_len, out, lse = residuals
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
    if st.mosaic_backward:
        from pallas_kernels.flash_attention_mosaic import mosaic_backward
        dq, dk, dv = mosaic_backward(q, k, v, lse, delta, do, causal=st.causal,
                                     sm_scale=st.sm_scale)
        return dq, dk, dv, None, None, None, None
    args = (q, k, v, do.astype(q.dtype), lse, delta, q_seg, kv_seg, q_offset, kv_len)
    dk, dv = _dkv_call(st, *args)
    dq = _dq_call(st, *args)
    return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------- custom_vjp wrapper


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_seg, kv_seg, q_offset, kv_len, st):
    return _any_forward(q, k, v, q_seg, kv_seg, q_offset, kv_len, st)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, q_offset, kv_len, st):
    out, lse = _any_forward(q, k, v, q_seg, kv_seg, q_offset, kv_len, st)
    return out, (q, k, v, q_seg, kv_seg, q_offset, kv_len, out, lse)


def _any_forward(q, k, v, q_seg, kv_seg, q_offset, kv_len, st):
    """(out, lse) from the Triton forward or, with st.mosaic, the Mosaic GPU one (the same
    residual format, so the backward kernels are shared)."""
    if st.mosaic:
        from pallas_kernels.flash_attention_mosaic import mosaic_forward
        return mosaic_forward(q, k, v, causal=st.causal, sm_scale=st.sm_scale)
    return _forward(q, k, v, q_seg, kv_seg, q_offset, kv_len, st)


_flash.defvjp(_flash_fwd, _backward)


def _on_hopper() -> bool:
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and capability.startswith("9")


def _select_backends(st: _Static, q_shape, k_shape, dtype, *, kv_lengths: bool,
                     offsets: bool) -> tuple[bool, bool]:
    """Whether the forward and the backward run on Mosaic GPU; see FlashConfig.

    "auto" picks Mosaic GPU on a Hopper GPU for the cases it takes. An explicit "mosaic_gpu" that
    cannot run is an error naming the constraints; it never falls back silently.
    """
    from pallas_kernels.flash_attention_mosaic import supports
    problems = [name for name, present in (
        ("interpret mode", st.interpret), ("segment_ids", st.segments),
        ("sliding_window", st.window is not None), ("softcap", st.softcap is not None),
        ("kv_lengths", kv_lengths), ("q_offset", offsets),
        ("a GPU other than Hopper (sm_90)", not st.interpret and not _on_hopper())) if present]
    shape_problem = supports(q_shape, k_shape, dtype, causal=st.causal)
    if shape_problem is not None:
        problems.append(shape_problem)

    return (_mosaic_chosen("forward_backend", st.config.forward_backend, problems),
            _mosaic_chosen("backward_backend", st.config.backward_backend, problems))


def _mosaic_chosen(field: str, choice: str, problems: list[str]) -> bool:
    """Whether config.<field> = choice runs on Mosaic GPU, given why Mosaic GPU cannot take the
    case (problems; empty if it can). Shared with grouped_matmul.py."""
    if choice not in BACKENDS:
        raise ValueError(f"config.{field}={choice!r}; choose one of {BACKENDS}")
    if choice == "mosaic_gpu" and problems:
        raise ValueError(f"config.{field}='mosaic_gpu' does not take "
                         + ", ".join(problems) + "; use 'triton' or 'auto'")
    return choice == "mosaic_gpu" or choice == "auto" and not problems


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _fit(blocks: KernelBlocks, q_len: int, kv_len: int) -> KernelBlocks:
    """Shrink tiles for short sequences (to the next power of 2, at least MIN_BLOCK)."""
    def fit(block, n):
        return min(block, max(MIN_BLOCK, pl.next_power_of_2(n)))
    return dataclasses.replace(blocks, block_q=fit(blocks.block_q, q_len),
                               block_k=fit(blocks.block_k, kv_len))


def _check(q, k, v, config: FlashConfig):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B,T,N,H], k and v [B,S,K,H]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch and head_dim of q {q.shape} and k {k.shape} must match")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"num_heads {q.shape[2]} must be a multiple of num_kv_heads {k.shape[2]}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[3]} unsupported: the Triton kernels need one of "
                         f"{HEAD_DIMS}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in DTYPES:
        raise ValueError(f"q, k, v must share one dtype among bfloat16/float16/float32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    for name in ("forward", "backward_dkv", "backward_dq"):
        b = getattr(config, name)
        for size in (b.block_q, b.block_k):
            if size < MIN_BLOCK or size & (size - 1):
                raise ValueError(f"config.{name} block {size} must be a power of 2 >= {MIN_BLOCK}")


def _segments(segment_ids, q_len: int, kv_seq: int):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if q_len != kv_seq:
            raise ValueError(f"one segment_ids array needs T == S (self-attention), got T={q_len}, "
                             f"S={kv_seq}; pass (q_segment_ids, kv_segment_ids) instead")
        q_seg = kv_seg = segment_ids
    return jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)


@functools.partial(jax.jit, static_argnames=("causal", "sliding_window", "softcap", "sm_scale",
                                             "config", "interpret"))
def flash_attention(q, k, v, *, causal: bool = True, segment_ids=None, q_offset=None,
                    kv_lengths=None, sliding_window: Optional[int] = None,
                    softcap: Optional[float] = None, sm_scale: Optional[float] = None,
                    config: Optional[FlashConfig] = None, interpret: bool = False):
    """Attention [B,T,N,H] x [B,S,K,H] -> [B,T,N,H] under the module docstring's rules.

    q_offset: int or int array [B], absolute position of query 0 (>= 0; default 0).
    kv_lengths: int array [B] of valid key counts (default S). sm_scale defaults to H ** -0.5.
    config: FlashConfig (default `default_config(H)`); tiles shrink for short sequences.
    """
    _check(q, k, v, config or default_config(q.shape[-1]))
    batch, q_len, num_heads, head_dim = q.shape
    kv_seq, num_kv_heads = k.shape[1], k.shape[2]
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    config = config or default_config(head_dim)
    config = FlashConfig(*(_fit(b, q_len, kv_seq) for b in
                           (config.forward, config.backward_dkv, config.backward_dq)),
                         forward_backend=config.forward_backend,
                         backward_backend=config.backward_backend)
    blocks = (config.forward, config.backward_dkv, config.backward_dq)
    q_pad = _round_up(q_len, max(b.block_q for b in blocks))
    kv_pad = _round_up(kv_seq, max(b.block_k for b in blocks))

    q_seg, kv_seg = _segments(segment_ids, q_len, kv_seq)
    offsets = jnp.broadcast_to(jnp.asarray(0 if q_offset is None else q_offset, jnp.int32),
                               (batch,))
    lengths = jnp.full((batch,), kv_seq, jnp.int32) if kv_lengths is None else jnp.clip(
        jnp.asarray(kv_lengths, jnp.int32), 0, kv_seq)
    st = _Static(causal=causal, window=sliding_window,
                 softcap=None if softcap is None else float(softcap),
                 sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
                 segments=q_seg is not None,
                 mask_kv_length=kv_lengths is not None or kv_pad != kv_seq,
                 group=num_heads // num_kv_heads, config=config, interpret=interpret)
    mosaic, mosaic_backward = _select_backends(st, q.shape, k.shape, q.dtype,
                                               kv_lengths=kv_lengths is not None,
                                               offsets=q_offset is not None)
    st = dataclasses.replace(st, mosaic=mosaic, mosaic_backward=mosaic_backward)

    def pad(x, to):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, to - x.shape[1])
        return jnp.pad(x, widths)

    q, k, v = pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad)
    if st.segments:
        # Edge-padded: padded rows and keys (dropped, or masked by the key-length rule) then
        # widen no block's segment range.
        q_seg = jnp.pad(q_seg, ((0, 0), (0, q_pad - q_len)), mode="edge")
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, kv_pad - kv_seq)), mode="edge")
    out = _flash(q, k, v, q_seg, kv_seg, offsets, lengths, st)
    return out[:, :q_len]


# ----------------------------------------------------------------------------- reference


def flash_attention_reference(q, k, v, *, causal: bool = True, segment_ids=None, q_offset=None,
                              kv_lengths=None, sliding_window: Optional[int] = None,
                              softcap: Optional[float] = None, sm_scale: Optional[float] = None):
    """Same rules as `flash_attention`, materializing [B, N, T, S] scores in float32."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_seq, num_kv_heads = k.shape[1], k.shape[2]
    sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    offsets = jnp.broadcast_to(jnp.asarray(0 if q_offset is None else q_offset, jnp.int32),
                               (batch,))
    q_pos = offsets[:, None] + jnp.arange(q_len)[None, :]  # [B, T]
    k_pos = jnp.arange(kv_seq)[None, None, :]  # [1, 1, S]
    mask = jnp.ones((batch, q_len, kv_seq), bool)
    if causal:
        mask &= k_pos <= q_pos[:, :, None]
    if sliding_window is not None:
        mask &= q_pos[:, :, None] - k_pos < sliding_window
    if kv_lengths is not None:
        mask &= k_pos < jnp.asarray(kv_lengths)[:, None, None]
    q_seg, kv_seg = _segments(segment_ids, q_len, kv_seq)
    if q_seg is not None:
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]

    group = num_heads // num_kv_heads
    qf = q.astype(jnp.float32).reshape(batch, q_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) * sm_scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    mask = mask[:, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total == 0.0, 1.0, total)  # rows with no key: all zeros
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
