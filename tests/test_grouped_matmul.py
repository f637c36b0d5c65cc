"""Pallas grouped matmul (interpret mode on CPU) against an independent float64 numpy oracle.

Each case checks the output and dx, dw (jax.vjp with a random cotangent) of the kernel, and the
output of `grouped_matmul_reference`, against `numpy_grouped_matmul`, which loops over groups
and derives the gradients by hand. Tiles are 16 so small shapes still span several row tiles,
tiles straddle group boundaries, and dims that are not tile multiples exercise the padding.
Interpret mode fills kernel outputs with NaN before running, so an unwritten element fails.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import moe
from pallas_kernels.grouped_matmul import (GmmBlocks, GmmConfig, default_config,
                                           grouped_matmul, grouped_matmul_reference)
from pallas_kernels.grouped_matmul_mosaic import work_items

SMALL = GmmConfig(GmmBlocks(16, 16, 16, 4, 1), GmmBlocks(16, 16, 16, 4, 1),
                  GmmBlocks(16, 16, 16, 4, 1))


def numpy_grouped_matmul(x, w, sizes, dy, transpose_rhs):
    """float64 out, dx, dw of out[r] = x[r] @ W_g (W_g = w[g], or w[g].T when transposed)."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    out, dx, dw = np.zeros((x.shape[0], dy.shape[1])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        weight = w[g].T if transpose_rhs else w[g]  # [K, N]
        out[rows] = x[rows] @ weight
        dx[rows] = dy[rows] @ weight.T
        grad = x[rows].T @ dy[rows]  # [K, N]
        dw[g] = grad.T if transpose_rhs else grad
        start += size
    return out, dx, dw


def random_case(seed, rows, k_dim, n_dim, sizes, dtype, transpose_rhs):
    rng = np.random.default_rng(seed)
    w_shape = (len(sizes), n_dim, k_dim) if transpose_rhs else (len(sizes), k_dim, n_dim)
    x = jnp.asarray(rng.standard_normal((rows, k_dim)), dtype)
    w = jnp.asarray(rng.standard_normal(w_shape), dtype)
    dy = jnp.asarray(rng.standard_normal((rows, n_dim)), dtype)
    return x, w, dy


CASES = [
    # seed, M, K, N, group sizes, dtype, transpose_rhs
    (0, 61, 48, 40, [7, 0, 20, 3, 0, 11, 1, 5], jnp.float32, False),  # sum 47 < M, empty groups
    (1, 37, 48, 33, [37], jnp.float32, False),  # G = 1, every row
    (2, 50, 40, 48, [0, 16, 9, 0, 17, 8, 0, 0], jnp.float32, True),  # aligned and not, transposed
    (3, 61, 48, 40, [2, 13, 0, 30, 1, 0, 9, 6], jnp.bfloat16, False),  # sum 61 == M
    (4, 45, 32, 40, [5, 0, 0, 14, 3, 11, 7, 0], jnp.bfloat16, True),
]


@pytest.mark.parametrize("seed,rows,k_dim,n_dim,sizes,dtype,transpose_rhs", CASES)
def test_grouped_matmul_and_gradients_equal_float64_oracle(seed, rows, k_dim, n_dim, sizes,
                                                           dtype, transpose_rhs):
    x, w, dy = random_case(seed, rows, k_dim, n_dim, sizes, dtype, transpose_rhs)
    group_sizes = jnp.asarray(sizes, jnp.int32)

    @jax.jit
    def run(x, w, dy):
        out, vjp = jax.vjp(lambda x, w: grouped_matmul(
            x, w, group_sizes, transpose_rhs=transpose_rhs, config=SMALL, interpret=True), x, w)
        return (out, *vjp(dy))

    got = run(x, w, dy)
    expected = numpy_grouped_matmul(x, w, sizes, dy, transpose_rhs)
    reference = grouped_matmul_reference(x, w, group_sizes, transpose_rhs=transpose_rhs)
    for name, value, want in zip(("out", "dx", "dw", "reference"), (*got, reference),
                                 (*expected, expected[0])):
        assert value.dtype == dtype, name
        value = np.asarray(value, np.float64)
        if dtype == jnp.float32:
            np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5, err_msg=name)
        else:  # bf16 inputs are exact; the bf16 output rounding is 2^-8 relative
            np.testing.assert_allclose(value, want, rtol=1e-2, atol=1e-2 * np.abs(want).max(),
                                       err_msg=name)
    if sum(sizes) < rows:  # rows of no group: zero output and zero input gradient
        assert not np.any(np.asarray(got[0][sum(sizes):])) and not np.any(
            np.asarray(got[1][sum(sizes):]))


def test_kernels_lower_to_triton_ir(hopper_lowering):
    """Lower forward+backward for CUDA on CPU, up to Triton IR (no PTX): catches constructs the
    Triton lowering rejects that interpret mode accepts."""
    x = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4, 256, 512), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)

    def grads(x, w, sizes):
        return jax.grad(lambda x, w: grouped_matmul(x, w, sizes).astype(jnp.float32).sum(),
                        argnums=(0, 1))(x, w)

    text = jax.jit(grads).trace(x, w, sizes).lower(lowering_platforms=("cuda",)).as_text()
    # Names in the Triton custom calls: forward, dx and dW.
    for name in ("grouped_matmul", "grouped_matmul_transposed", "grouped_matmul_weight_grad"):
        assert f'name = "{name}"' in text, name


def test_grouped_matmul_equals_ragged_dot_with_default_tiles():
    """Same semantics as jax.lax.ragged_dot, with the (shrunk) default Hopper tiles."""
    sizes = [9, 0, 40, 17, 0, 3]
    x, w, _ = random_case(5, 80, 64, 24, sizes, jnp.float32, False)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    got = grouped_matmul(x, w, group_sizes, interpret=True)
    want = jax.lax.ragged_dot(x, w, group_sizes, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dropless_moe_with_the_kernel_equals_the_per_token_loop():
    """moe.set_grouped_matmul("pallas_interpret") routes dropless dispatch through the kernel.
    Outputs and gradients."""
    from jaxlm.config import ModelConfig

    cfg = ModelConfig(vocab_size=257, embed_dim=48, num_heads=6, num_kv_heads=2, head_dim=8,
                      num_layers=1, mlp_dim=40, num_experts=6, top_k=2, expert_mlp_dim=40,
                      compute_dtype="float32")
    rng = np.random.default_rng(6)
    normal = lambda *shape: jnp.asarray(0.3 * rng.standard_normal(shape), jnp.float32)
    p = {"router": normal(48, 6), "router_bias": jnp.zeros((6,), jnp.float32),
         "gate": normal(6, 48, 40), "up": normal(6, 48, 40), "down": normal(6, 40, 48)}
    x = normal(2, 13, 48)
    expected = moe.reference_moe_mlp(cfg, p, x)

    moe.set_grouped_matmul("pallas_interpret")
    try:  # fresh functions: the kernel choice is read at trace time
        y = jax.jit(lambda p, x: moe.moe_mlp(cfg, p, x)[0])(p, x)
        grads = jax.jit(jax.grad(lambda p, x: jnp.sum(moe.moe_mlp(cfg, p, x)[0] ** 2),
                                 argnums=(0, 1)))(p, x)
        jaxpr = str(jax.make_jaxpr(lambda p, x: moe.moe_mlp(cfg, p, x))(p, x))
    finally:
        moe.set_grouped_matmul("auto")
    assert "grouped_matmul" in jaxpr and "ragged_dot" not in jaxpr
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    reference_grads = jax.grad(lambda p, x: jnp.sum(moe.reference_moe_mlp(cfg, p, x) ** 2),
                               argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bad_shapes_and_choices_raise_clear_errors():
    x = jnp.ones((8, 16), jnp.float32)
    with pytest.raises(ValueError, match="x has K=16 columns"):
        grouped_matmul(x, jnp.ones((2, 12, 16)), jnp.asarray([4, 4]), interpret=True)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(x, jnp.ones((2, 16, 8)), jnp.asarray([8]), interpret=True)
    with pytest.raises(ValueError, match="power of 2"):
        grouped_matmul(x, jnp.ones((2, 16, 8)), jnp.asarray([4, 4]), interpret=True,
                       config=GmmConfig(GmmBlocks(24, 16, 16, 4, 1), SMALL.forward,
                                        SMALL.weight_grad))
    with pytest.raises(ValueError, match="choose one of"):
        moe.set_grouped_matmul("megablocks")


@pytest.mark.parametrize("num_rows,sizes", [
    (512, [0, 130, 5, 0, 200, 40]),  # boundaries inside tiles, empty groups, rows past the end
    (384, [128, 128, 128]),  # aligned: one item per tile
    (256, [0, 0, 0]),  # no rows at all: the zero group stores every row
    (512, [300, 0, 300]),  # sum past M: clipped
    (1024, "random"),
])
def test_mosaic_work_items_store_each_row_once_with_its_group(num_rows, sizes):
    """The Mosaic GPU kernels' schedule (work_items) against a direct assignment of rows to
    groups: each item's rows [lo, lo + rows) of its tile are stored with its group's weights, so
    every row must belong to exactly one item, of its own group (group G: rows past the last
    group, stored as zeros), within the static item count."""
    if sizes == "random":
        sizes = np.random.default_rng(8).multinomial(1000, np.ones(24) / 24)
        sizes[[3, 4, 17]] = 0
    num_groups = len(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    items = np.asarray(work_items(jnp.asarray(offsets), num_rows, 128))
    assert items.shape == (4, num_rows // 128 + num_groups)
    owner = np.full(num_rows, -1)
    for tile, group, lo, rows in items.T:
        assert 0 <= lo and lo + rows <= 128
        span = slice(tile * 128 + lo, tile * 128 + lo + rows)
        assert (owner[span] == -1).all(), "a row stored twice"
        owner[span] = group
    want = np.searchsorted(np.cumsum(sizes), np.arange(num_rows), side="right")
    np.testing.assert_array_equal(owner, np.minimum(want, num_groups))


def test_mosaic_kernels_lower_for_hopper_where_they_apply(hopper_lowering, monkeypatch):
    """On Hopper the "auto" backend runs the forward and dx on Mosaic GPU and the weight gradient
    on Triton; float32 (not a Mosaic case) and backend="triton" stay on Triton. Lowered for CUDA
    on CPU (no PTX): the CPU suite cannot run Mosaic GPU kernels, so their numerics are checked
    on the GPU (docs/benchmarks.md). Shapes unique to this test: the kernel choice is read at
    trace time and jit caches traces by shape."""
    gm = importlib.import_module("pallas_kernels.grouped_matmul")
    monkeypatch.setattr(gm, "_on_hopper", lambda: True)
    sizes = jax.ShapeDtypeStruct((3,), jnp.int32)
    triton = ('name = "grouped_matmul"', 'name = "grouped_matmul_transposed"')

    def lowered(dtype, config=None):
        x = jax.ShapeDtypeStruct((384, 192), dtype)
        w = jax.ShapeDtypeStruct((3, 192, 768), dtype)

        def grads(x, w, sizes):
            loss = lambda x, w: grouped_matmul(x, w, sizes, config=config).astype(
                jnp.float32).sum()
            return jax.grad(loss, argnums=(0, 1))(x, w)

        return jax.jit(grads).trace(x, w, sizes).lower(lowering_platforms=("cuda",)).as_text()

    text = lowered(jnp.bfloat16)
    assert "mosaic_gpu" in text and 'name = "grouped_matmul_weight_grad"' in text
    assert not any(name in text for name in triton)
    for text in (lowered(jnp.float32), lowered(jnp.float16, dataclasses.replace(
            default_config(), backend="triton"))):
        assert "mosaic_gpu" not in text and all(name in text for name in triton)


def test_forced_mosaic_backend_names_what_it_does_not_take():
    x, w, sizes = jnp.ones((256, 64), jnp.float32), jnp.ones((2, 64, 256)), jnp.asarray([100, 50])
    forced = dataclasses.replace(default_config(), backend="mosaic_gpu")
    with pytest.raises(ValueError, match=r"does not take a GPU other than Hopper \(sm_90\), "
                                         r"dtype float32 .*use 'triton' or 'auto'"):
        grouped_matmul(x, w, sizes, config=forced)
    with pytest.raises(ValueError, match="interpret mode"):
        grouped_matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), sizes, config=forced,
                       interpret=True)
    with pytest.raises(ValueError, match="choose one of"):
        grouped_matmul(x, w, sizes, config=dataclasses.replace(forced, backend="cuda"))
