"""Flash attention for Hopper in Pallas Mosaic GPU: wgmma, TMA, warp specialization.

    out, lse = mosaic_forward(q, k, v, causal=True, sm_scale=H ** -0.5)
    dq, dk, dv = mosaic_backward(q, k, v, lse, delta, do, causal=True, sm_scale=H ** -0.5)

The same contract as `flash_attention._forward` for the cases it takes (`supports`): q [B, T, N, H],
k/v [B, S, K, H] (GQA: query head n reads kv head n // G), bf16 or fp16, H 64 or 128, no
segments, window, softcap, offsets or key lengths, and `causal` only for T == S (top-left ==
bottom-right). Returns out [B, T, N, H] and the logsumexp [B, N, T] in float32 log2 units of the
scaled scores, the residual format both backwards (this file's and the Triton kernels') read.

Structure (the FlashAttention-3 recipe, Shah et al. 2024, sections 3.1-3.2, with the generic
warp-specialized pipeline of Pallas Mosaic GPU):
- one CTA per (query head, 2 * block_q query rows, batch); three warpgroups. Warpgroup 2 is the
  producer: it streams key and value blocks of block_kv rows into a ring of `stages` shared-
  memory slots with TMA (`plgpu.emit_pipeline_warp_specialized`). Warpgroups 0 and 1 are
  consumers, each owning block_q query rows, loaded once by TMA;
- per key block, each consumer computes S = Q K^T with wgmma from shared memory into registers,
  the online softmax in base 2 (scale folded into one multiply), then O += P V with P from
  registers; a slot is released to the producer once both consumers are done with it;
- causal: the pipeline stops at the CTA's last diagonal block (with block_kv = 2 * block_q both
  consumers need every block up to it), the mask is one compare per score against a per-block
  offset, and the CTAs with the most key blocks launch first;
- epilogue: O / l and lse to shared memory, then TMA stores.

The backward (`mosaic_backward`) has the same three-warpgroup shape; its docstring says how.
Not here: intra-warpgroup overlap of softmax with the next S = Q K^T and the ping-pong schedule
between the two consumers; see docs/design.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import LOG2E
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """block_q: query rows per consumer warpgroup (64: one wgmma M tile); block_kv: key rows per
    pipeline step; stages: shared-memory slots of the K/V ring."""
    block_q: int = 64
    block_kv: int = 128
    stages: int = 2


def _pipeline(step, compute_context, grid, in_specs, stages: int):
    """The pipeline of every kernel here: warpgroup 2 feeds `stages` shared-memory slots per input
    with TMA; warpgroups 0 and 1 run `step` on each slot, carrying what compute_context starts."""
    return plgpu.emit_pipeline_warp_specialized(
        step, grid=grid, memory_registers=40, in_specs=in_specs, max_concurrent_steps=stages,
        wg_axis="wg", num_compute_wgs=2, compute_context=compute_context)


def _smem_transforms(head_dim: int, dtype):
    """Tiling and swizzle of the [rows, head_dim] shared-memory tiles wgmma reads."""
    swizzle = plgpu.find_swizzle(head_dim * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def _launch(kernel, scratch, out_type, grid, grid_names, *args):
    """Run kernel(*input refs, *output refs, *scratch refs) on `grid` with three warpgroups."""
    def entry(*refs):
        pl.run_scoped(lambda *scratch_refs: kernel(*refs, *scratch_refs), *scratch,
                      collective_axes="wg")

    entry.__name__ = kernel.__name__  # the kernel's name in profiles

    return plgpu.kernel(entry, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=3,
                        thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                        )(*args)


def _query_tile(causal: bool, num_tiles: int):
    """This CTA's query tile; causal: the heaviest tiles (most key blocks) first, for a shorter
    tail of light ones."""
    tile = lax.axis_index("tiles")
    return num_tiles - 1 - tile if causal else tile


def _key_steps(causal: bool, first_row, rows: int, block_kv: int, kv_seq: int):
    """Key blocks the query tile [first_row, first_row + rows) reads: causal, up to the block
    holding its last row."""
    if not causal:
        return kv_seq // block_kv
    return lax.div(first_row + rows + block_kv - 1, jnp.asarray(block_kv, first_row.dtype))


def _iota_difference(shape, minuend_dim: int):
    """[m, n] int32 of (index along minuend_dim) - (index along the other dim), wgmma layout."""
    layout = plgpu.Layout.WGMMA
    a = plgpu.broadcasted_iota(jnp.int32, shape, minuend_dim, layout=layout)
    b = plgpu.broadcasted_iota(jnp.int32, shape, 1 - minuend_dim, layout=layout)
    return a - b


def supports(q_shape, k_shape, dtype, *, causal: bool, blocks: MosaicBlocks = MosaicBlocks()):
    """None if `mosaic_forward` and `mosaic_backward` take these shapes, else the constraint they
    break (a string)."""
    _, q_len, _, head_dim = q_shape
    kv_seq = k_shape[1]
    if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
        return f"dtype {jnp.dtype(dtype).name} (needs bfloat16 or float16)"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (needs one of {HEAD_DIMS})"
    if q_len % (2 * blocks.block_q):
        return f"T={q_len} (needs a multiple of {2 * blocks.block_q})"
    if kv_seq % blocks.block_kv:
        return f"S={kv_seq} (needs a multiple of {blocks.block_kv})"
    if causal and q_len != kv_seq:
        return f"causal with T={q_len} != S={kv_seq}"
    return None


def mosaic_forward(q, k, v, *, causal: bool, sm_scale: float,
                   blocks: MosaicBlocks = MosaicBlocks()):
    """(out [B, T, N, H], lse [B, N, T] float32, log2 units); see the module docstring."""
    problem = supports(q.shape, k.shape, q.dtype, causal=causal, blocks=blocks)
    if problem is not None:
        raise ValueError(f"the Mosaic GPU forward does not take {problem}")
    batch, q_len, num_heads, head_dim = q.shape
    kv_seq, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    block_q, block_kv = blocks.block_q, blocks.block_kv
    dtype = q.dtype
    scale = sm_scale * LOG2E  # scores in log2 units: exp2 instead of exp
    transforms = _smem_transforms(head_dim, dtype)
    rows_per_cta = 2 * block_q

    def forward_kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, q_smem, lse_smem, q_barrier):
        head, b = lax.axis_index("heads"), lax.axis_index("batch")
        kv_head = lax.div(head, jnp.asarray(group, head.dtype))
        cta_first_row = _query_tile(causal, q_len // rows_per_cta) * rows_per_cta
        num_steps = _key_steps(causal, cta_first_row, rows_per_cta, block_kv, kv_seq)

        def compute_context(run_pipeline):
            wg = lax.axis_index("wg")
            first_row = cta_first_row + wg * block_q
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(first_row, block_q), head],
                                    q_smem.at[wg], q_barrier.at[wg])
            plgpu.barrier_wait(q_barrier.at[wg])
            acc = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32),
                                    plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32),
                                  plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32),
                                  plgpu.Layout.WGMMA.reduce(1))
            acc, m, l = run_pipeline((acc, m, l))
            # Every row saw key 0 (causal) or all keys, so l > 0.
            q_smem[wg] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            lse_smem[wg] = m + jnp.log2(l)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], out_ref.at[b, pl.ds(first_row, block_q), head])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, head, pl.ds(first_row, block_q)])
            plgpu.wait_smem_to_gmem(0)

        def step(indices, k_smem, v_smem, carry):
            (j,) = indices
            acc, m, l = carry
            wg = lax.axis_index("wg")
            first_row = cta_first_row + wg * block_q
            row_minus_col = _iota_difference((block_q, block_kv), 0) if causal else None

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((block_q, block_kv), jnp.float32))
            if causal:  # key j * bk + c is visible to row first_row + r iff r - c >= offset
                offset = j * block_kv - first_row  # <= -block_kv: the whole block is visible
                s = jnp.where(row_minus_col >= offset, s, -jnp.inf)
            # The scale rides on the max and inside exp2's argument (one FMA per score).
            m_new = jnp.maximum(m, s.max(axis=1) * scale)
            p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
            alpha = jnp.exp2(m - m_new)
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

            def values(acc_ref):
                plgpu.wgmma(acc_ref, p.astype(dtype), v_smem)

            acc = pl.run_state(values)(plgpu.ACC.init(acc))
            return acc, m_new, l

        kv_spec = plgpu.BlockSpec((block_kv, head_dim), lambda j: (j, 0), transforms=transforms)
        _pipeline(step, compute_context, (num_steps,), [kv_spec, kv_spec], blocks.stages)(
            k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head])

    scratch = (plgpu.SMEM((2, block_q, head_dim), dtype, transforms=transforms),
               plgpu.SMEM((2, block_q), jnp.float32), plgpu.Barrier(num_barriers=2))
    out_type = [jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)]
    return tuple(_launch(forward_kernel, scratch, out_type, (num_heads, q_len // rows_per_cta, batch),
                         ("heads", "tiles", "batch"), q, k, v))


# ----------------------------------------------------------------------------- backward


@dataclasses.dataclass(frozen=True)
class MosaicBackwardBlocks:
    """dQ: 64 query rows per consumer, key blocks of dq_block_kv stream. dK/dV: 64 key rows per
    consumer, query blocks of dkv_block_q stream (all G query heads of the kv head in turn)."""
    dq_block_kv: int = 64
    dkv_block_q: int = 64
    stages: int = 2


def _row_vector(ref):
    """A [64] float32 vector from shared memory, one value per row of a wgmma accumulator."""
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1))


def _col_vector(ref):
    """A [n] float32 vector from shared memory, one value per column of a wgmma accumulator."""
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0))


def mosaic_backward(q, k, v, lse, delta, do, *, causal: bool, sm_scale: float,
                    blocks: MosaicBackwardBlocks = MosaicBackwardBlocks()):
    """(dq, dk, dv) of `mosaic_forward` from its lse (log2 units, [B, N, T]) and
    delta = rowsum(dO * O) ([B, N, T] float32, as the Triton backward computes it).

    The FlashAttention-2 backward (Dao 2023, algorithm 2) as two Mosaic GPU kernels with the
    forward's structure (one producer and two consumer warpgroups). dQ: a CTA owns 2 x 64 query rows and streams K/V blocks (S = Q K^T, P = exp2(S c - lse),
    dP = dO V^T, dS = P (dP - delta), dQ += dS K); dK/dV: a CTA owns 2 x 64 key rows of one kv
    head and streams Q/dO blocks of each of its G query heads (S^T = K Q^T, P^T, dV += P^T dO,
    dP^T = V dO^T, dK += dS^T Q), so GQA needs no atomics. Causal: both stop at the diagonal.
    """
    problem = supports(q.shape, k.shape, q.dtype, causal=causal)
    if problem is not None:
        raise ValueError(f"the Mosaic GPU backward does not take {problem}")
    batch, q_len, num_heads, head_dim = q.shape
    kv_seq, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    dtype = q.dtype
    scale = sm_scale * LOG2E
    rows = 64  # per consumer warpgroup: one wgmma M tile
    transforms = _smem_transforms(head_dim, dtype)
    do = do.astype(dtype)

    # ---- dQ: like the forward, with dO, lse and delta resident beside Q.
    block_kv = blocks.dq_block_kv

    def dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
                  q_smem, do_smem, lse_smem, delta_smem, barriers):
        head, b = lax.axis_index("heads"), lax.axis_index("batch")
        kv_head = lax.div(head, jnp.asarray(group, head.dtype))
        cta_first = _query_tile(causal, q_len // (2 * rows)) * 2 * rows
        num_steps = _key_steps(causal, cta_first, 2 * rows, block_kv, kv_seq)

        def compute_context(run_pipeline):
            wg = lax.axis_index("wg")
            first = cta_first + wg * rows
            sources = ((q_ref.at[b, pl.ds(first, rows), head], q_smem),
                       (do_ref.at[b, pl.ds(first, rows), head], do_smem),
                       (lse_ref.at[b, head, pl.ds(first, rows)], lse_smem),
                       (delta_ref.at[b, head, pl.ds(first, rows)], delta_smem))
            for i, (src, dst) in enumerate(sources):
                plgpu.copy_gmem_to_smem(src, dst.at[wg], barriers.at[4 * wg + i])
            for i in range(4):
                plgpu.barrier_wait(barriers.at[4 * wg + i])
            dq = plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            dq = run_pipeline((dq, _row_vector(lse_smem.at[wg]), _row_vector(delta_smem.at[wg])))[0]
            q_smem[wg] = (dq * sm_scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, pl.ds(first, rows), head])
            plgpu.wait_smem_to_gmem(0)

        def step(indices, k_smem, v_smem, carry):
            (j,) = indices
            dq, lse, delta = carry
            wg = lax.axis_index("wg")
            shape = (rows, block_kv)

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.transpose((1, 0)))
                return acc_ref[...]

            def dprobs(acc_ref):
                plgpu.wgmma(acc_ref, do_smem.at[wg], v_smem.transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
            p = jnp.exp2(s * scale - lax.broadcast_in_dim(lse, shape, [0]))
            if causal:  # query first + r sees key j * bk + c iff r - c >= j * bk - first
                offset = j * block_kv - (cta_first + wg * rows)
                p = jnp.where(_iota_difference(shape, 0) >= offset, p, 0.0)
            dp = pl.run_scoped(dprobs, plgpu.ACC(shape, jnp.float32))
            ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))

            def grad(acc_ref):
                plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem)

            return pl.run_state(grad)(plgpu.ACC.init(dq)), lse, delta

        kv_spec = plgpu.BlockSpec((block_kv, head_dim), lambda j: (j, 0), transforms=transforms)
        _pipeline(step, compute_context, (num_steps,), [kv_spec, kv_spec], blocks.stages)(
            k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head])

    rows_smem = plgpu.SMEM((2, rows, head_dim), dtype, transforms=transforms)
    vector_smem = plgpu.SMEM((2, rows), jnp.float32)
    dq = _launch(dq_kernel, (rows_smem, rows_smem, vector_smem, vector_smem,
                             plgpu.Barrier(num_barriers=8)),
                 jax.ShapeDtypeStruct(q.shape, dtype), (num_heads, q_len // (2 * rows), batch),
                 ("heads", "tiles", "batch"), q, k, v, do, lse, delta)

    # ---- dK, dV: K and V resident; Q, dO, lse and delta of each query head of the group stream.
    block_q = blocks.dkv_block_q
    q_blocks = q_len // block_q
    # Views in which one query head's [T, H] is a column block: q [B, T, N * H], lse [B, N * T].
    q_cols, do_cols = (x.reshape(batch, q_len, num_heads * head_dim) for x in (q, do))
    lse_flat, delta_flat = (x.reshape(batch, num_heads * q_len) for x in (lse, delta))

    def dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                   k_smem, v_smem, barriers):
        kv_head, tile, b = (lax.axis_index(name) for name in ("kv_heads", "tiles", "batch"))
        cta_first = tile * 2 * rows
        first_block = lax.div(cta_first, jnp.asarray(block_q, tile.dtype)) if causal else 0
        steps = q_blocks - first_block  # per query head

        def head_and_block(t):  # pipeline step -> (query head, query block)
            return kv_head * group + lax.div(t, steps), first_block + lax.rem(t, steps)

        def compute_context(run_pipeline):
            wg = lax.axis_index("wg")
            first = cta_first + wg * rows
            plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(first, rows), kv_head], k_smem.at[wg],
                                    barriers.at[2 * wg])
            plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(first, rows), kv_head], v_smem.at[wg],
                                    barriers.at[2 * wg + 1])
            plgpu.barrier_wait(barriers.at[2 * wg])
            plgpu.barrier_wait(barriers.at[2 * wg + 1])
            zeros = plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = run_pipeline((zeros, zeros))
            k_smem[wg] = (dk * sm_scale).astype(dtype)
            v_smem[wg] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[b, pl.ds(first, rows), kv_head])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, pl.ds(first, rows), kv_head])
            plgpu.wait_smem_to_gmem(0)

        def step(indices, q_smem, do_smem, lse_smem, delta_smem, carry):
            (t,) = indices
            dk, dv = carry
            wg = lax.axis_index("wg")
            shape = (rows, block_q)

            def scores(acc_ref):  # S^T [keys, queries]
                plgpu.wgmma(acc_ref, k_smem.at[wg], q_smem.transpose((1, 0)))
                return acc_ref[...]

            def dprobs(acc_ref):  # dP^T
                plgpu.wgmma(acc_ref, v_smem.at[wg], do_smem.transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
            p = jnp.exp2(s * scale - lax.broadcast_in_dim(_col_vector(lse_smem), shape, [1]))
            if causal:  # key first + r is seen by query i * bq + c iff c - r >= first - i * bq
                _, block = head_and_block(t)
                offset = cta_first + wg * rows - block * block_q
                p = jnp.where(_iota_difference(shape, 1) >= offset, p, 0.0)

            def values(acc_ref):
                plgpu.wgmma(acc_ref, p.astype(dtype), do_smem)

            dv = pl.run_state(values)(plgpu.ACC.init(dv))
            dp = pl.run_scoped(dprobs, plgpu.ACC(shape, jnp.float32))
            ds = p * (dp - lax.broadcast_in_dim(_col_vector(delta_smem), shape, [1]))

            def keys(acc_ref):
                plgpu.wgmma(acc_ref, ds.astype(dtype), q_smem)

            return pl.run_state(keys)(plgpu.ACC.init(dk)), dv

        def column_block(t):
            head, block = head_and_block(t)
            return block, head

        def flat_block(t):
            head, block = head_and_block(t)
            return (head * q_blocks + block,)

        qo_spec = plgpu.BlockSpec((block_q, head_dim), column_block, transforms=transforms)
        vec_spec = plgpu.BlockSpec((block_q,), flat_block)
        _pipeline(step, compute_context, (group * steps,), [qo_spec, qo_spec, vec_spec, vec_spec],
                  blocks.stages)(q_ref.at[b], do_ref.at[b], lse_ref.at[b], delta_ref.at[b])

    dk, dv = _launch(dkv_kernel, (rows_smem, rows_smem, plgpu.Barrier(num_barriers=4)),
                     [jax.ShapeDtypeStruct(k.shape, dtype)] * 2,
                     (num_kv_heads, kv_seq // (2 * rows), batch), ("kv_heads", "tiles", "batch"),
                     q_cols, k, v, do_cols, lse_flat, delta_flat)
    return dq, dk, dv
