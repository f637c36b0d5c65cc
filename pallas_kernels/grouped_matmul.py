"""Grouped matmul (the ragged dot of dropless MoE) in Pallas for the Triton GPU backend.

    out = grouped_matmul(x, w, group_sizes)    # x [M, K], w [G, K, N], group_sizes [G] -> [M, N]

Semantics of `jax.lax.ragged_dot(x, w, group_sizes)`: the rows of x are sorted by group; group g
owns rows [offsets[g], offsets[g + 1]) with offsets = [0, cumsum(group_sizes)], and
out[r] = x[r] @ w[g]. Rows past sum(group_sizes) (which must be <= M) are zeros, and receive zero
gradients. `transpose_rhs=True` takes w [G, N, K] and computes x[r] @ w[g].T (the dx of the
backward pass). Empty groups are allowed and get zero weight gradients. Accumulation is float32;
float32 inputs use IEEE products (no TF32), as in flash_attention.py.

Algorithm. Row tiles are fixed: block_m rows of x at multiples of block_m, so x and out are read
and written in place. A tile may straddle groups: a tiny jnp pre-pass (work over [M / block_m]
and [G]) gives each row tile the range of groups that own one of its rows. The forward program
(row tile, column tile) loops over that range and, per group, over K in block_k chunks; rows of
other groups are masked in the load of x (a masked load zero-fills), so one float32 accumulator
collects every group's rows. A group boundary inside a tile costs one extra pass over that tile:
at most G - 1 extra tile passes (6% at 64 groups and 1024 row tiles of 128 rows).
The alternative, megablocks-style padding of every group to a multiple of block_m in a scattered
buffer of M + G * (block_m - 1) rows, does as much padding work and also moves x and out
through memory once more each way; see docs/_notes_moe_gmm.md.

Backward (custom_vjp). For out = x @ w[g]: dx = grouped_matmul(dy, w, transpose_rhs=True) and
dw[g] = x_g^T dy_g, by a second kernel whose program (group, K tile, N tile) streams that
group's row tiles with dynamic loop bounds, masking rows of neighbouring groups; a group with
no rows runs no iteration (or one fully masked one) and writes zeros. The transposed form swaps
the roles: dx = grouped_matmul(dy, w), dw[g] = dy_g^T x_g.

On Hopper the forward and dx kernels run on Mosaic GPU instead (grouped_matmul_mosaic.py: wgmma,
TMA, warp specialization; `GmmConfig.backend`), the weight gradient on the Triton kernel.

Dims that are not tile multiples are padded with zeros in the wrapper (a no-op when aligned);
tiles shrink to the next power of 2 (>= 16) of small dims. `interpret=True` runs the kernels on
CPU; interpret mode fills outputs with NaN first, so an element no program writes shows up.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Shared with the attention kernels: fp32-accumulating dot (IEEE for fp32), ceil division and
# round-up on traced ints, the smallest tl.dot tile, the Hopper check and the backend choice.
from pallas_kernels.flash_attention import (MIN_BLOCK, _cdiv, _dot, _mosaic_chosen, _on_hopper,
                                            _round_up)
from pallas_kernels import grouped_matmul_mosaic as mosaic

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class GmmBlocks:
    """Tiles of one kernel (powers of 2, >= 16) and its Triton launch parameters.

    block_m: rows of x per tile; block_k: the contracted chunk (forward kernels) or the rows of
    dw (weight-gradient kernel); block_n: output columns.
    """
    block_m: int
    block_k: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """forward: x @ w[g]; forward_transposed: x @ w[g].T (also the dx of `forward`);
    weight_grad: dw[g] = a_g^T b_g (Triton tiles).

    backend, for forward and forward_transposed: "auto" runs them on the Mosaic GPU kernels of
    grouped_matmul_mosaic.py on Hopper (sm_90) for bf16/fp16 where `mosaic.supports` takes the
    padded shapes, else on Triton; "triton" or "mosaic_gpu" force one (forcing Mosaic GPU on a
    case it does not take is an error naming the constraint). The weight gradient is Triton."""
    forward: GmmBlocks
    forward_transposed: GmmBlocks
    weight_grad: GmmBlocks
    backend: str = "auto"


def default_config() -> GmmConfig:
    """Hopper tiles, the winners of `python tools/bench_moe.py --sweep` on an H200 (bf16,
    M 131072, K 2048, 64 groups; docs/benchmarks.md): forward 444 -> 546 TFLOP/s and transposed
    420 -> 500 at N 1024; the weight gradient 493 -> 564 at N 2048 (the fused gate|up)."""
    return GmmConfig(forward=GmmBlocks(128, 64, 256, 8, 3),
                     forward_transposed=GmmBlocks(128, 64, 256, 8, 3),
                     weight_grad=GmmBlocks(64, 128, 256, 8, 3))


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialize on (hashable: a nondiff argument of the custom_vjp)."""
    transpose_rhs: bool
    config: GmmConfig
    interpret: bool


# ----------------------------------------------------------------------------- kernel helpers


def _row_mask(first_row, block_m: int, width: int, start, end):
    """Boolean [block_m, width]: rows first_row + i inside [start, end)."""
    # NOTE: broadcast the int rows before comparing: the Triton lowering fails on broadcasting
    # i1 tensors (see flash_attention.py).
    rows = jnp.broadcast_to(first_row + jnp.arange(block_m)[:, None], (block_m, width))
    return (rows >= start) & (rows < end)


def _compiler_params(blocks: GmmBlocks):
    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


# ----------------------------------------------------------------------------- forward kernel


def _forward_kernel(first_group_ref, end_group_ref, offsets_ref, x_ref, w_ref, o_ref, *,
                    blocks: GmmBlocks, transpose_rhs: bool):
    block_m, block_k, block_n = blocks.block_m, blocks.block_k, blocks.block_n
    cols = pl.ds(pl.program_id(0) * block_n, block_n)
    first_row = pl.program_id(1) * block_m
    num_k_blocks = x_ref.shape[1] // block_k

    def group_body(g, acc):
        start, end = offsets_ref[g], offsets_ref[g + 1]
        mask = _row_mask(first_row, block_m, block_k, start, end)

        def k_body(kb, acc):
            chunk = pl.ds(kb * block_k, block_k)
            x = plgpu.load(x_ref.at[:, chunk], mask=mask, other=0)  # [bm, bk]
            w = w_ref[g, cols, chunk] if transpose_rhs else w_ref[g, chunk, cols]
            return acc + _dot(x, w, tb=transpose_rhs)

        # An empty group between two others in this tile runs no K loop.
        return lax.fori_loop(0, num_k_blocks * (start < end).astype(jnp.int32), k_body, acc)

    acc = lax.fori_loop(first_group_ref[0], end_group_ref[0], group_body,
                        jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _tile_groups(offsets, num_rows: int, block_m: int):
    """Per row tile: the first group owning one of its rows and one past the last ([tiles])."""
    ends = offsets[1:]
    total = offsets[-1]
    first_row = jnp.arange(num_rows // block_m, dtype=jnp.int32) * block_m
    last_row = jnp.minimum(first_row + block_m, total) - 1
    first = jnp.searchsorted(ends, first_row, side="right").astype(jnp.int32)
    end = jnp.searchsorted(ends, last_row, side="right").astype(jnp.int32) + 1
    return first, jnp.where(first_row < total, end, first)  # tiles past the rows: no group


def _use_mosaic(x, w, st: _Static) -> bool:
    """Whether this forward (or transposed forward) runs on Mosaic GPU; see GmmConfig.backend."""
    problems = [name for name, present in (
        ("interpret mode", st.interpret),
        ("a GPU other than Hopper (sm_90)", not st.interpret and not _on_hopper())) if present]
    shape_problem = mosaic.supports(x.shape, w.shape, x.dtype, st.transpose_rhs)
    if shape_problem is not None:
        problems.append(shape_problem)
    return _mosaic_chosen("backend", st.config.backend, problems)


def _forward(x, w, offsets, st: _Static):
    """x [M, K] @ w[g] ([G, K, N], or [G, N, K] transposed) -> [M, N]; dims tile multiples."""
    if _use_mosaic(x, w, st):
        return mosaic.mosaic_grouped_matmul(x, w, offsets, transpose_rhs=st.transpose_rhs)
    blocks = st.config.forward_transposed if st.transpose_rhs else st.config.forward
    num_rows, inner = x.shape
    num_cols = w.shape[1] if st.transpose_rhs else w.shape[2]
    first_group, end_group = _tile_groups(offsets, num_rows, blocks.block_m)
    tile_spec = pl.BlockSpec((1,), lambda j, i: (i,))
    # NOTE: grid axis 0 is the fastest-launched one (blockIdx.x): column tiles go there, so the
    # programs that share a row tile of x run together and read it from L2, not HBM.
    return pl.pallas_call(
        functools.partial(_forward_kernel, blocks=blocks, transpose_rhs=st.transpose_rhs),
        grid=(num_cols // blocks.block_n, num_rows // blocks.block_m),
        in_specs=[tile_spec, tile_spec,
                  pl.BlockSpec(offsets.shape, lambda j, i: (0,)),
                  pl.BlockSpec((blocks.block_m, inner), lambda j, i: (i, 0)),
                  pl.BlockSpec(w.shape, lambda j, i: (0, 0, 0))],
        out_specs=pl.BlockSpec((blocks.block_m, blocks.block_n), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((num_rows, num_cols), x.dtype),
        compiler_params=_compiler_params(blocks),
        interpret=st.interpret,
        name="grouped_matmul_transposed" if st.transpose_rhs else "grouped_matmul",
    )(first_group, end_group, offsets, x, w)


# ----------------------------------------------------------------------------- weight gradient


def _weight_grad_kernel(offsets_ref, a_ref, b_ref, out_ref, *, blocks: GmmBlocks):
    block_m, block_k, block_n = blocks.block_m, blocks.block_k, blocks.block_n
    b_cols = pl.ds(pl.program_id(0) * block_n, block_n)
    a_cols = pl.ds(pl.program_id(1) * block_k, block_k)
    g = pl.program_id(2)
    start, end = offsets_ref[g], offsets_ref[g + 1]

    def body(t, acc):
        rows = pl.ds(t * block_m, block_m)
        a = plgpu.load(a_ref.at[rows, a_cols], other=0,
                       mask=_row_mask(t * block_m, block_m, block_k, start, end))
        b = plgpu.load(b_ref.at[rows, b_cols], other=0,
                       mask=_row_mask(t * block_m, block_m, block_n, start, end))
        return acc + _dot(a, b, ta=True)

    acc = lax.fori_loop(lax.div(start, block_m), _cdiv(end, block_m), body,
                        jnp.zeros((block_k, block_n), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _weight_grad(a, b, offsets, num_groups: int, dtype, st: _Static):
    """out[g] = a_g^T b_g: a [M, K], b [M, N] -> [G, K, N] (zeros for empty groups)."""
    blocks = st.config.weight_grad
    a_dim, b_dim = a.shape[1], b.shape[1]
    tile = pl.BlockSpec((None, blocks.block_k, blocks.block_n), lambda j, i, g: (g, i, j))
    whole = lambda array: pl.BlockSpec(array.shape, lambda j, i, g: (0,) * array.ndim)
    # Groups outermost (slowest): the programs reading one group's rows run together (L2).
    return pl.pallas_call(
        functools.partial(_weight_grad_kernel, blocks=blocks),
        grid=(b_dim // blocks.block_n, a_dim // blocks.block_k, num_groups),
        in_specs=[whole(offsets), whole(a), whole(b)],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct((num_groups, a_dim, b_dim), dtype),
        compiler_params=_compiler_params(blocks),
        interpret=st.interpret,
        name="grouped_matmul_weight_grad",
    )(offsets, a, b)


# ----------------------------------------------------------------------------- custom_vjp wrapper


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x, w, offsets, st: _Static):
    return _forward(x, w, offsets, st)


def _gmm_fwd(x, w, offsets, st: _Static):
    return _forward(x, w, offsets, st), (x, w, offsets)


def _gmm_bwd(st: _Static, residuals, dy):
    x, w, offsets = residuals
    dy = dy.astype(x.dtype)
    flipped = dataclasses.replace(st, transpose_rhs=not st.transpose_rhs)
    dx = _forward(dy, w, offsets, flipped)
    if st.transpose_rhs:  # out = x @ w[g].T: dw[g] = dy_g^T x_g, [N, K]
        dw = _weight_grad(dy, x, offsets, w.shape[0], w.dtype, st)
    else:
        dw = _weight_grad(x, dy, offsets, w.shape[0], w.dtype, st)
    return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _fit(blocks: GmmBlocks, rows: int, k_dim: int, n_dim: int) -> GmmBlocks:
    """Shrink tiles for small dims (to the next power of 2, at least MIN_BLOCK)."""
    def fit(block, n):
        return min(block, max(MIN_BLOCK, pl.next_power_of_2(n)))
    return GmmBlocks(fit(blocks.block_m, rows), fit(blocks.block_k, k_dim),
                     fit(blocks.block_n, n_dim), blocks.num_warps, blocks.num_stages)


def _fit_config(config: GmmConfig, rows: int, k_dim: int, n_dim: int) -> GmmConfig:
    """Dims of w's layout [G, k_dim, n_dim]: `forward` contracts k_dim, `forward_transposed`
    contracts n_dim, `weight_grad` makes [k_dim, n_dim] tiles."""
    return GmmConfig(forward=_fit(config.forward, rows, k_dim, n_dim),
                     forward_transposed=_fit(config.forward_transposed, rows, n_dim, k_dim),
                     weight_grad=_fit(config.weight_grad, rows, k_dim, n_dim),
                     backend=config.backend)


def _check(x, w, group_sizes, transpose_rhs: bool, config: GmmConfig):
    if x.ndim != 2 or w.ndim != 3 or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"expected x [M, K], w [G, K, N] and group_sizes [G]; got {x.shape}, "
                         f"{w.shape}, {group_sizes.shape}")
    contracted = w.shape[2] if transpose_rhs else w.shape[1]
    if contracted != x.shape[1]:
        layout = "[G, N, K] (transpose_rhs=True)" if transpose_rhs else "[G, K, N]"
        raise ValueError(f"x has K={x.shape[1]} columns but w {w.shape} is read as {layout}")
    if jnp.result_type(x.dtype, w.dtype) not in DTYPES:
        raise ValueError(f"x and w must be bfloat16/float16/float32; got {x.dtype}, {w.dtype}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")
    for name in ("forward", "forward_transposed", "weight_grad"):
        b = getattr(config, name)
        for size in (b.block_m, b.block_k, b.block_n):
            if size < MIN_BLOCK or size & (size - 1):
                raise ValueError(f"config.{name} block {size} must be a power of 2 >= {MIN_BLOCK}")


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "config", "interpret"))
def grouped_matmul(x, w, group_sizes, *, transpose_rhs: bool = False,
                   config: Optional[GmmConfig] = None, interpret: bool = False):
    """`jax.lax.ragged_dot(x, w, group_sizes)` as Pallas kernels (see the module docstring).

    x [M, K] sorted by group; w [G, K, N] ([G, N, K] with transpose_rhs); group_sizes [G] ints
    with sum <= M (larger sums are clipped to M). Returns [M, N] in the promoted dtype of x, w.
    """
    config = config or default_config()
    _check(x, w, group_sizes, transpose_rhs, config)
    dtype = jnp.result_type(x.dtype, w.dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    rows, (_, w_rows, w_cols) = x.shape[0], w.shape
    config = _fit_config(config, rows, w_rows, w_cols)
    # One padding serves all three kernels: the tiles are powers of 2, so max is their lcm.
    row_pad = _round_up(rows, max(b.block_m for b in (config.forward, config.forward_transposed,
                                                      config.weight_grad)))
    w_rows_pad = _round_up(w_rows, max(config.forward.block_k, config.forward_transposed.block_n,
                                       config.weight_grad.block_k))
    w_cols_pad = _round_up(w_cols, max(config.forward.block_n, config.forward_transposed.block_k,
                                       config.weight_grad.block_n))
    x_cols_pad = w_cols_pad if transpose_rhs else w_rows_pad
    x = jnp.pad(x, ((0, row_pad - rows), (0, x_cols_pad - x.shape[1])))
    w = jnp.pad(w, ((0, 0), (0, w_rows_pad - w_rows), (0, w_cols_pad - w_cols)))
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                               jnp.cumsum(group_sizes.astype(jnp.int32))])
    offsets = jnp.minimum(offsets, rows)
    st = _Static(transpose_rhs=transpose_rhs, config=config, interpret=interpret)
    return _gmm(x, w, offsets, st)[:rows, :w_rows if transpose_rhs else w_cols]


# ----------------------------------------------------------------------------- reference


def grouped_matmul_reference(x, w, group_sizes, *, transpose_rhs: bool = False):
    """Same result as `grouped_matmul`: a loop over groups, each a masked dense matmul (fp32)."""
    dtype = jnp.result_type(x.dtype, w.dtype)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes)])
    rows = jnp.arange(x.shape[0])[:, None]
    xf = x.astype(jnp.float32)
    out = None
    for g in range(w.shape[0]):
        wg = w[g].astype(jnp.float32)
        part = jnp.dot(xf, wg.T if transpose_rhs else wg, precision=lax.Precision.HIGHEST)
        part = jnp.where((rows >= offsets[g]) & (rows < offsets[g + 1]), part, 0.0)
        out = part if out is None else out + part
    return out.astype(dtype)
