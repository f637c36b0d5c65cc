"""Grouped matmul on Hopper through JAX's bundled Mosaic GPU kernels, with ragged_dot semantics.

    out = mosaic_grouped_matmul(x, w, group_sizes)   # x [M, K], w [G, K, N] -> [M, N], bf16/fp16

JAX ships persistent wgmma + TMA grouped matmuls for Hopper in
`jax.experimental.pallas.ops.gpu`: `ragged_dot_mgpu.ragged_dot` (x @ w[g] over row groups, and
with `transpose_rhs` the dx of the backward) and `transposed_ragged_dot_mgpu` (the per-group
x_g^T dy_g of the weight gradient). This module only wraps them: a custom_vjp with the same
semantics as `jax.lax.ragged_dot` and grouped_matmul.py (rows past sum(group_sizes) are zeros
and get zero gradients), tile choices per kernel, and shape checks with clear errors. It is
the "mosaic" choice of `jaxlm.moe.set_grouped_matmul`; grouped_matmul.py (Pallas on Triton)
stays the portable path (Ampere, CPU interpret mode, float32, any shape).

Constraints (checked): a GPU with Mosaic GPU support (sm90), bf16 or fp16 inputs, K a multiple
of the forward block_k, and for the weight gradient K and N multiples of its block_m and
block_n. The kernels are experimental in JAX: a JAX upgrade can change their signatures, which
`tests/test_moe.py` cannot see on CPU; tools/bench_moe.py --impl mosaic checks values and
gradients against ragged_dot on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
    """Tiles of one bundled kernel: block sizes, pipeline depth and the grid's N grouping."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 1


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    forward: MosaicTiles = MosaicTiles()
    forward_transposed: MosaicTiles = MosaicTiles()  # dx = dy @ w[g].T
    weight_grad: MosaicTiles = MosaicTiles(block_m=64, block_n=128, block_k=64)  # dw[g] = x_g^T dy_g


def _kernels():
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
    except ImportError as error:  # an older or newer JAX without them
        raise RuntimeError(f"the Mosaic GPU grouped matmul needs jax.experimental.pallas.ops.gpu."
                           f"ragged_dot_mgpu (JAX 0.11): {error}; use set_grouped_matmul('pallas')") from None
    return ragged_dot_mgpu.ragged_dot, transposed_ragged_dot_mgpu.transposed_ragged_dot


def _tile_kwargs(tiles: MosaicTiles) -> dict:
    return dataclasses.asdict(tiles)


def _zero_rows_past_groups(out, group_sizes):
    valid = jnp.arange(out.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], out, jnp.zeros((), out.dtype))


def _forward(x, w, group_sizes, tiles: MosaicTiles, transpose_rhs: bool):
    ragged_dot, _ = _kernels()
    out = ragged_dot(x, w, group_sizes=group_sizes, transpose_rhs=transpose_rhs, **_tile_kwargs(tiles))
    return _zero_rows_past_groups(out, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x, w, group_sizes, config: MosaicConfig):
    return _forward(x, w, group_sizes, config.forward, transpose_rhs=False)


def _gmm_fwd(x, w, group_sizes, config: MosaicConfig):
    return _gmm(x, w, group_sizes, config), (x, w, group_sizes)


def _gmm_bwd(config: MosaicConfig, residuals, dy):
    x, w, group_sizes = residuals
    _, transposed_ragged_dot = _kernels()
    dy = dy.astype(x.dtype)
    dx = _forward(dy, w, group_sizes, config.forward_transposed, transpose_rhs=True)
    # Rows past the groups belong to no group: the kernel leaves them out of every dw[g].
    dw = transposed_ragged_dot(x, dy, group_sizes=group_sizes, **_tile_kwargs(config.weight_grad))
    return dx, dw.astype(w.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def check_shapes(x, w, group_sizes, config: MosaicConfig) -> None:
    """Raise ValueError naming the constraint a shape breaks."""
    if x.ndim != 2 or w.ndim != 3 or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"expected x [M, K], w [G, K, N], group_sizes [G]; got {x.shape}, {w.shape}, "
                         f"{group_sizes.shape}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} columns but w has K={w.shape[1]} rows")
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"the Mosaic GPU grouped matmul takes bf16 or fp16 x and w of one dtype, got "
                         f"{x.dtype} and {w.dtype}; use set_grouped_matmul('pallas') for float32")
    k_dim, n_dim = w.shape[1], w.shape[2]
    fwd, dx, dw = config.forward, config.forward_transposed, config.weight_grad
    problems = []
    if k_dim % fwd.block_k:
        problems.append(f"K={k_dim} is not a multiple of the forward block_k={fwd.block_k}")
    if n_dim % dx.block_k:
        problems.append(f"N={n_dim} is not a multiple of the dx block_k={dx.block_k}")
    if k_dim % dw.block_m or n_dim % dw.block_n:
        problems.append(f"K={k_dim}, N={n_dim} are not multiples of the weight-gradient tiles "
                        f"{dw.block_m} x {dw.block_n}")
    for name, tiles, cols in (("forward", fwd, n_dim), ("dx", dx, k_dim), ("weight_grad", dw, n_dim)):
        if name != "weight_grad" and cols % (tiles.block_n * tiles.grid_block_n):
            problems.append(f"{name}: {cols} output columns are not a multiple of block_n x grid_block_n "
                            f"= {tiles.block_n * tiles.grid_block_n}")
    if problems:
        raise ValueError("Mosaic GPU grouped matmul: " + "; ".join(problems)
                         + " (pad the dims, change MosaicConfig, or use set_grouped_matmul('pallas'))")


@functools.partial(jax.jit, static_argnames=("config",))
def mosaic_grouped_matmul(x, w, group_sizes, *, config: Optional[MosaicConfig] = None):
    """`jax.lax.ragged_dot(x, w, group_sizes)` with JAX's Mosaic GPU kernels (module docstring)."""
    config = config or MosaicConfig()
    check_shapes(x, w, group_sizes, config)
    return _gmm(x, w, group_sizes.astype(jnp.int32), config)
