"""Split-K decode attention (flash decoding) for Hopper in Pallas Mosaic GPU: TMA and wgmma.

    partial_out, lse = mosaic_partials(q_tile, k, v, offsets, group=G, q_len=T, splits=P, ...)

The same split-K contract as pallas_kernels/decode_attention.py's Triton kernel, whose
`decode_attention(..., backend="mosaic")` calls this one (Hopper; the cases `supports` takes;
slower than the Triton kernel today, docs/benchmarks.md, twenty-first session):
q_tile [B, K, 64, H] holds the T * G query rows of each kv head (row r = t * G + g, padded to
one wgmma M tile of 64); k, v [B, K, S, H] (or the stacked [L, B, K, S, H] cache with `layer`);
offsets [B] the slot of each sequence's first new token. Bottom-right causal per sequence, an
optional sliding window. Returns, per split, the partial output [B, K, P, R, H] (normalized)
and its log-sum-exp [B, K, P, R] (log2 units), R = T * G rounded up to 8 rows, which
decode_attention's combine merges.

Structure: one CTA per (kv head, split, sequence), two warpgroups. Warpgroup 1 streams key
and value blocks of `block_kv` positions into `stages` shared-memory slots with TMA
(`plgpu.emit_pipeline_warp_specialized`); warpgroup 0 holds the query tile and, per block,
computes S = Q K^T by wgmma, the online softmax in base 2, then O += P V. A split streams only
its blocks up to the sequence's last new token (and from the window's start), so the work
follows each sequence's own length; a split with none writes weight 0 (lse = MASK_VALUE).
Not here: int8 caches, head_dim other than 64 or 128, more than 64 query rows a kv head (the
Triton kernel takes those).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# (the Triton kernel's constants: its combine reads MASK_VALUE as weight 0 here too)
from pallas_kernels.decode_attention import LOG2E, MASK_VALUE
from pallas_kernels.flash_attention_mosaic import _smem_transforms

M_FLOOR = -1e29  # the running max starts here: exp2(MASK_VALUE - M_FLOOR) is 0
ROWS = 64  # the query tile: one wgmma M tile
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
BLOCK_KV = 128
STAGES = 2  # K/V slots: 2 (88 KB with the tiles at H = 64) measured faster than 4


def supports(q_len: int, group: int, head_dim: int, dtype, quantized: bool) -> Optional[str]:
    """None where mosaic_partials takes the case, else what it does not take."""
    if quantized:
        return "an int8 cache"
    if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
        return f"dtype {jnp.dtype(dtype).name} (needs bfloat16 or float16)"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (needs one of {HEAD_DIMS})"
    if q_len * group > ROWS:
        return f"{q_len} new tokens x {group} heads a kv head = {q_len * group} rows (> {ROWS})"
    return None


def out_rows(q_len: int, group: int) -> int:
    """Rows of each partial output: the real T * G, rounded up to 8."""
    return -(-q_len * group // 8) * 8


# CTAs decode_attention aims its splits at: one wave on 132 SMs (2 and 4 times as many
# splits measured slower at batch 8, docs/benchmarks.md).
TARGET_CTAS = 132


@functools.partial(jax.jit, static_argnames=("group", "q_len", "splits", "block_kv", "stages",
                                             "sm_scale", "window", "layer", "interpret"))
def mosaic_partials(q_tile, k, v, offsets, *, group: int, q_len: int, splits: int,
                    sm_scale: float, window: Optional[int] = None, layer: Optional[int] = None,
                    block_kv: int = BLOCK_KV, stages: int = STAGES, interpret: bool = False):
    """(partial outputs [B, K, splits, R, H] float32, lse [B, K, splits, R] float32, log2
    units); see the module docstring. S must be a multiple of block_kv * splits.
    interpret: Mosaic GPU's interpreter (CPU tests; P goes through shared memory there)."""
    batch, num_kv_heads, _, head_dim = q_tile.shape
    kv_len = k.shape[-2]
    problem = supports(q_len, group, head_dim, q_tile.dtype, False)
    if problem is not None:
        raise ValueError(f"the Mosaic GPU decode kernel does not take {problem}")
    if kv_len % (block_kv * splits):
        raise ValueError(f"S={kv_len} must be a multiple of block_kv x splits = "
                         f"{block_kv * splits}")
    dtype = q_tile.dtype
    rows_out = out_rows(q_len, group)
    per_split = kv_len // (block_kv * splits)  # blocks a split
    chunk = per_split * block_kv
    scale = sm_scale * LOG2E
    transforms = _smem_transforms(head_dim, dtype)
    # One int32 a lane: the kernel reads a sequence's offset as the max of 128 equal values.
    offsets_wide = jnp.broadcast_to(jnp.asarray(offsets, jnp.int32)[:, None], (batch, 128))

    def kernel(off_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, o_smem, lse_smem, bar,
               p_smem=None):
        h, s, b = (lax.axis_index(name) for name in ("kv_heads", "splits", "batch"))
        offset = jnp.max(plgpu.load(off_ref.at[b], layout=plgpu.Layout.WG_STRIDED((128,), 1)))
        first = s * chunk  # this split's first position
        # Blocks up to the last new token's slot, and (window) from the first one's window.
        visible = jnp.clip(offset + q_len - first, 0, chunk)
        hi = lax.div(visible + block_kv - 1, block_kv)
        lo = jnp.int32(0)
        if window is not None:
            lo = jnp.minimum(lax.div(jnp.clip(offset - window + 1 - first, 0, chunk), block_kv),
                             hi)
        base = s * per_split + lo  # the first block streamed

        def compute_context(run_pipeline):
            plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32),
                                    plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((ROWS,), M_FLOOR, jnp.float32),
                                  plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc, m, l = run_pipeline((acc, m, l))
            empty = l == 0.0  # no visible key in this split (or a padded row without one)
            safe = jnp.where(empty, 1.0, l)
            o_smem[...] = acc / lax.broadcast_in_dim(safe, acc.shape, [0])
            lse_smem[...] = jnp.where(empty, MASK_VALUE, m + jnp.log2(safe))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows_out)], o_ref.at[b, h, s])
            plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, rows_out)], lse_ref.at[b, h, s])
            plgpu.wait_smem_to_gmem(0)

        def step(indices, k_smem, v_smem, carry):
            (j,) = indices
            acc, m, l = carry
            shape = (ROWS, block_kv)

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.transpose((1, 0)))
                return acc_ref[...]

            sc = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32)) * scale
            # Row r (token t = r // G) sees position p = (base + j) * bk + c iff p <= offset + t,
            # that is t - c >= (base + j) * bk - offset (and, windowed, t - c < that + window).
            edge = (base + j) * block_kv - offset

            def masked(sc):
                layout = plgpu.Layout.WGMMA
                t = lax.div(plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=layout), group)
                t_minus_c = t - plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=layout)
                mask = t_minus_c >= edge
                if window is not None:
                    mask &= t_minus_c < edge + window
                return jnp.where(mask, sc, MASK_VALUE)

            # Only blocks that reach past the first new token (or, windowed, start before
            # the last one's window) hold a hidden key: the others skip the mask.
            partial = edge + block_kv - 1 > 0
            if window is not None:
                partial |= edge <= q_len - 1 - window
            sc = lax.cond(partial, masked, lambda sc: sc, sc)
            # m starts at M_FLOOR > MASK_VALUE, so a hidden score's exp2 is 0 even in a row
            # that has seen no visible key yet.
            m_new = jnp.maximum(m, sc.max(axis=1))
            p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, shape, [0]))
            alpha = jnp.exp2(m - m_new)
            l = l * alpha + p.sum(axis=1)

            def values(acc_ref):
                if interpret:  # (its wgmma takes operands from shared memory only)
                    p_smem[...] = p.astype(dtype)
                    plgpu.commit_smem()
                    plgpu.wgmma(acc_ref, p_smem, v_smem)
                else:
                    plgpu.wgmma(acc_ref, p.astype(dtype), v_smem)
                return acc_ref[...]

            pv = pl.run_scoped(values, plgpu.ACC((ROWS, head_dim), jnp.float32))
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l

        spec = plgpu.BlockSpec((block_kv, head_dim), lambda j: (base + j, 0),
                               transforms=transforms)
        plgpu.emit_pipeline_warp_specialized(
            step, grid=(hi - lo,), memory_registers=40, in_specs=[spec, spec],
            max_concurrent_steps=stages, wg_axis="wg", num_compute_wgs=1,
            compute_context=compute_context)(
                *(ref.at[b, h] if layer is None else ref.at[layer, b, h]
                  for ref in (k_ref, v_ref)))

    scratch = (plgpu.SMEM((ROWS, head_dim), dtype, transforms=transforms),
               plgpu.SMEM((ROWS, head_dim), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32),
               plgpu.Barrier(num_barriers=1))
    if interpret:
        scratch += (plgpu.SMEM((ROWS, block_kv), dtype, transforms=transforms),)

    def entry(*refs):
        pl.run_scoped(lambda *scratch_refs: kernel(*refs, *scratch_refs), *scratch,
                      collective_axes="wg")

    entry.__name__ = "decode_attention_mosaic"
    out_type = [jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows_out, head_dim),
                                     jnp.float32),
                jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows_out), jnp.float32)]
    call = plgpu.kernel(
        entry, out_type=out_type, grid=(num_kv_heads, splits, batch),
        grid_names=("kv_heads", "splits", "batch"), num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True))
    if not interpret:
        return tuple(call(offsets_wide, q_tile, k, v))
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=False)):
        return tuple(call(offsets_wide, q_tile, k, v))
