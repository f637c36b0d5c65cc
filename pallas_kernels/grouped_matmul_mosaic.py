"""The grouped matmul's forward and dx kernels for Hopper in Pallas Mosaic GPU: wgmma, TMA, warp
specialization.

    out = mosaic_grouped_matmul(x, w, offsets, transpose_rhs=False)

The contract of `grouped_matmul._forward` for the cases `supports` takes: x [M, K] sorted by group,
w [G, K, N] ([G, N, K] with transpose_rhs: out = x @ w[g].T, the dx of the forward), offsets
[G + 1] int32 (group g owns rows [offsets[g], offsets[g + 1]); rows past offsets[G] come out
zero), bf16 or fp16, M a multiple of block_m, K of block_k, N of 2 * block_n.

Structure:
- work items: a jnp pre-pass (`work_items`) lists, in group order, each (row tile, group) pair
  where the group owns some of the tile's rows: at most M / block_m + G - 1 of them, plus the
  tiles past offsets[G], which a zero group stores zeros into. A tile that straddles a group
  boundary is one item per group, so no rows are masked in the product: each item computes the
  whole tile with its group's weights and stores only its own rows;
- persistent: one CTA per SM walks the (work item, 2 * block_n output columns) pairs, column
  tiles fastest; three warpgroups. Warpgroup 2 is the producer: it streams x's
  [block_m, block_k] and w[g]'s [block_k, 2 * block_n] blocks into a ring of `stages`
  shared-memory slots with TMA, and starts the next pair's loads while the consumers store the
  last one. Warpgroups 0 and 1 each own block_n columns and accumulate with wgmma in
  registers, keeping one wgmma in flight (a slot is released a step late);
- epilogue, per 64-row half of the tile: the accumulator's half goes to shared memory, then
  TMA stores the half's share of rows [lo, lo + rows) as a ladder of power-of-2 row counts (a
  TMA copy has a static shape: copies of 64, 32, ..., 1 rows cover any count up to 64 with at
  most 6 of them; a whole half is one).

The weight gradient stays on the Triton kernel of grouped_matmul.py: its contraction runs over a
group's rows, which TMA cannot mask at the group's edges.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention_mosaic import _launch, _pipeline, _smem_transforms

DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class MosaicGmmBlocks:
    """block_m: rows per CTA (both consumers); block_n: output columns per consumer warpgroup;
    block_k: the contracted chunk per pipeline step; stages: shared-memory slots of the ring."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 4


def supports(x_shape, w_shape, dtype, transpose_rhs: bool,
             blocks: MosaicGmmBlocks = MosaicGmmBlocks()):
    """None if `mosaic_grouped_matmul` takes these shapes, else the constraint they break."""
    rows, inner = x_shape
    cols = w_shape[1] if transpose_rhs else w_shape[2]
    if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
        return f"dtype {jnp.dtype(dtype).name} (needs bfloat16 or float16)"
    if rows % blocks.block_m:
        return f"M={rows} (needs a multiple of {blocks.block_m})"
    if inner % blocks.block_k:
        return f"K={inner} (needs a multiple of {blocks.block_k})"
    if cols % (2 * blocks.block_n):
        return f"N={cols} (needs a multiple of {2 * blocks.block_n})"
    return None


def work_items(offsets, num_rows: int, block_m: int):
    """[4, num_rows / block_m + G] int32: per item its row tile, group, first row in the tile and
    row count, in group order. Group G (one past the last) is the rows past offsets[G], stored as
    zeros; unused items have row count 0."""
    num_groups = offsets.shape[0] - 1
    offsets = jnp.minimum(offsets.astype(jnp.int32), num_rows)
    starts = jnp.concatenate([offsets[:-1], offsets[-1:]])
    ends = jnp.concatenate([offsets[1:], jnp.full((1,), num_rows, jnp.int32)])
    first_tile = starts // block_m
    count = jnp.where(ends > starts, (ends - 1) // block_m - first_tile + 1, 0)
    item_end = jnp.cumsum(count)
    num_items = num_rows // block_m + num_groups
    item = jnp.arange(num_items, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(item_end, item, side="right"), num_groups)
    tile = first_tile[group] + item - (item_end[group] - count[group])
    first_row = tile * block_m
    lo = jnp.maximum(starts[group], first_row) - first_row
    rows = jnp.minimum(ends[group], first_row + block_m) - first_row - lo
    used = item < item_end[-1]
    return jnp.stack([jnp.where(used, tile, 0), group, jnp.where(used, lo, 0),
                      jnp.where(used, rows, 0)]).astype(jnp.int32)


def _num_sms() -> int:
    device = jax.devices()[0]
    return device.core_count if device.platform == "gpu" else 132  # H100/H200 when lowering on CPU


def mosaic_grouped_matmul(x, w, offsets, *, transpose_rhs: bool = False,
                          blocks: MosaicGmmBlocks = MosaicGmmBlocks()):
    """x [M, K] @ w[g] per group -> [M, N] in x's dtype; see the module docstring."""
    problem = supports(x.shape, w.shape, x.dtype, transpose_rhs, blocks)
    if problem is not None:
        raise ValueError(f"the Mosaic GPU grouped matmul does not take {problem}")
    num_rows, inner = x.shape
    num_groups = w.shape[0]
    num_cols = w.shape[1] if transpose_rhs else w.shape[2]
    block_m, block_n, block_k = blocks.block_m, blocks.block_n, blocks.block_k
    epi_rows = min(64, block_m)  # rows per epilogue store: half the shared memory of a whole tile
    dtype = x.dtype
    items = work_items(offsets, num_rows, block_m)
    col_tiles = num_cols // (2 * block_n)
    transforms = _smem_transforms(block_k, dtype)

    def step(indices, x_smem, w_smem, acc_ref):
        wg = lax.axis_index("wg")
        if transpose_rhs:
            rhs = w_smem.at[pl.ds(wg * block_n, block_n)].transpose((1, 0))
        else:
            rhs = w_smem.at[:, pl.ds(wg * block_n, block_n)]
        plgpu.wgmma(acc_ref, x_smem, rhs)
        plgpu.wgmma_wait(1)  # the previous step's wgmma is done: its slot can go
        return acc_ref

    def pipeline(compute_context, tile, col_tile):
        x_spec = plgpu.BlockSpec((block_m, block_k), lambda k: (tile, k), transforms=transforms,
                                 delay_release=1)
        w_block = (2 * block_n, block_k) if transpose_rhs else (block_k, 2 * block_n)
        w_spec = plgpu.BlockSpec(w_block, (lambda k: (col_tile, k)) if transpose_rhs else
                                 (lambda k: (k, col_tile)), transforms=transforms, delay_release=1)
        return _pipeline(step, compute_context, (inner // block_k,), [x_spec, w_spec],
                         blocks.stages)

    def gmm_kernel(items_ref, x_ref, w_ref, out_ref, out_smem):
        # The pipeline's shared memory, allocated once for every pair below.
        pl.run_scoped(functools.partial(walk, items_ref, x_ref, w_ref, out_ref, out_smem),
                      allocations=pipeline(None, 0, 0).get_allocations(x_ref, w_ref.at[0]),
                      collective_axes="wg")
        plgpu.wait_smem_to_gmem(0)

    def walk(items_ref, x_ref, w_ref, out_ref, out_smem, allocations):
        wg = lax.axis_index("wg")

        # Persistent: each CTA walks the (item, column tile) pairs, column tiles fastest (an
        # x tile is read by consecutive pairs); the producer streams the next pair's blocks
        # while the consumers store the last one.
        @plgpu.nd_loop((items.shape[1] * col_tiles,), collective_axes="sm")
        def _pairs(loop_info):
            (pair,) = loop_info.index
            item, col_tile = lax.div(pair, col_tiles), lax.rem(pair, col_tiles)
            tile, group = items_ref[0, item], items_ref[1, item]
            lo, rows = items_ref[2, item], items_ref[3, item]

            def store(values):
                """This consumer's [block_m, block_n] values, rows [lo, lo + rows) only, as TMA
                copies of power-of-2 row counts through epi_rows-row shared-memory tiles."""
                wg = lax.axis_index("wg")
                cols = pl.ds(col_tile * 2 * block_n + wg * block_n, block_n)
                for half in range(block_m // epi_rows):
                    first = jnp.maximum(lo, half * epi_rows)
                    count = jnp.maximum(jnp.minimum(lo + rows, (half + 1) * epi_rows) - first, 0)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the slot's last copies
                    out_smem[wg] = values[half * epi_rows:(half + 1) * epi_rows].astype(dtype)
                    plgpu.commit_smem()
                    start, size = first, epi_rows
                    while size >= 1:
                        @pl.when((count & size) != 0)
                        def _copy(start=start, size=size):
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, pl.ds(start - half * epi_rows, size)],
                                out_ref.at[pl.ds(tile * block_m + start, size), cols])
                        start = start + (count & size)
                        size //= 2

            def compute_context(run_pipeline):
                def scope(acc_ref):
                    run_pipeline(acc_ref)
                    return acc_ref[...]
                store(pl.run_scoped(scope, plgpu.ACC((block_m, block_n), jnp.float32)))

            @pl.when(group < num_groups)
            def _compute():
                pipeline(compute_context, tile, col_tile)(x_ref, w_ref.at[group],
                                                          allocations=allocations)

            @pl.when((group == num_groups) & (rows > 0) & (wg < 2))
            def _zeros():  # rows past the last group
                store(plgpu.layout_cast(jnp.zeros((block_m, block_n), jnp.float32),
                                        plgpu.Layout.WGMMA))

    scratch = (plgpu.SMEM((2, epi_rows, block_n), dtype),)
    out_type = jax.ShapeDtypeStruct((num_rows, num_cols), dtype)
    return _launch(gmm_kernel, scratch, out_type, (_num_sms(),), ("sm",), items, x, w)
