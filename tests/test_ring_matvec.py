"""The ring-streamed matrix-vector chain (pallas_kernels/ring_matvec.py), on CPU.

The chained kernels need a Hopper GPU: the grid barrier is a global semaphore, which neither of
Pallas' CPU interpreters runs, and the polling form writes its B tile through a second view of
shared memory, which Mosaic GPU's interpreter does not alias. Their numerics and a rerun's
bitwise agreement are checked on the GPU by tools/bench_ring_matvec.py (docs/benchmarks.md).
Here: the weight tiling, the float32 reference against float64 numpy, the split-K products in
Mosaic GPU's interpreter with race detection, the shapes refused, that every variant lowers for
CUDA (Mosaic GPU) on CPU, and the profiler trace reader.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ring_matvec as rm


def _weights(layers, d, seed=0):
    return (jax.random.normal(jax.random.key(seed), (layers, d, d)) / d ** 0.5).astype(jnp.bfloat16)


def test_reference_is_the_chain_of_products_in_float64():
    ws = _weights(4, 64, seed=1)
    x0 = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    got = np.asarray(rm.ring_matvec_chain_reference(ws, jnp.asarray(x0)))
    x = x0.astype(np.float64)
    for layer, w in enumerate(np.asarray(ws, np.float64)):
        x = w @ x
        np.testing.assert_allclose(got[layer], x, rtol=1e-5, atol=1e-5)


def test_weights_tiled_for_other_blocks_or_a_wrong_x0_are_refused():
    split = rm.SplitKBlocks(k_splits=2, k_slot=128, stages=2)
    tiled = rm.tile_weights_split_k(_weights(2, 512), split)
    with pytest.raises(ValueError, match="x0 of shape"):
        rm.split_k_matvec_chain(tiled, jnp.zeros(256), blocks=split)
    with pytest.raises(ValueError, match="tile them with tile_weights_split_k"):
        rm.split_k_matvec_chain(tiled, jnp.zeros(512), blocks=rm.SplitKBlocks(k_splits=4))
    assert "needs bfloat16" in rm.supports_split_k((2, 512, 512), jnp.float32, split)


# ----------------------------------------------------------------------------- split-K form


def _interpret_params():
    """Mosaic GPU's interpreter with race detection, or a skip where this JAX lacks it."""
    plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    if not hasattr(plgpu, "force_gpu_interpret_mode"):
        pytest.skip("this JAX has no Mosaic GPU interpreter")
    return plgpu, plgpu.InterpretGPUParams(detect_races=True)


def test_split_k_tiling_gives_each_cta_its_rows_and_split():
    blocks = rm.SplitKBlocks(k_splits=2, k_slot=128, stages=2)
    ws = _weights(2, 512, seed=3)
    tiled = np.asarray(rm.tile_weights_split_k(ws, blocks))
    assert tiled.shape == (2, 512 // 64 * 2, 2, 64, 128)  # [L, CTAs, slots, 64, k_slot]
    w = np.asarray(ws)
    for layer, block, split, slot in [(0, 0, 0, 0), (1, 3, 1, 1), (0, 7, 1, 0), (1, 5, 0, 1)]:
        cols = slice(split * 256 + slot * 128, split * 256 + (slot + 1) * 128)
        np.testing.assert_array_equal(tiled[layer, block * 2 + split, slot],
                                      w[layer, block * 64:(block + 1) * 64, cols])


@pytest.mark.parametrize("shape, blocks, words", [
    ((2, 512, 1024), rm.SplitKBlocks(k_splits=2), "[L, D, D]"),
    ((2, 512, 512), rm.SplitKBlocks(k_splits=2, k_slot=96), "multiple of 64"),
    ((2, 512, 512), rm.SplitKBlocks(k_splits=2, k_slot=192), "each split a multiple of k_slot"),
    ((2, 512, 512), rm.SplitKBlocks(k_splits=16, k_slot=64), "at most 8"),
    ((2, 4096, 4096), rm.SplitKBlocks(k_splits=4), "every CTA must be resident"),
    ((2, 2048, 2048), rm.SplitKBlocks(k_splits=2, k_slot=128, stages=14), "shared memory"),
    ((2, 512, 512), rm.SplitKBlocks(k_splits=2, store="shared"), "tma or generic"),
])
def test_split_k_refuses_what_it_cannot_tile(shape, blocks, words):
    problem = rm.supports_split_k(shape, jnp.bfloat16, blocks, num_sms=132)
    assert problem is not None and words in problem
    with pytest.raises(ValueError, match="split_k_matvec_chain does not take"):
        rm.tile_weights_split_k(jnp.zeros(shape, jnp.bfloat16), blocks)


@pytest.mark.parametrize("store", ["tma", "generic"])
def test_split_k_products_match_float64_in_the_interpreter_without_races(store):
    """The flat form (no grid barrier: Pallas' interpreter has no global semaphores) runs the
    whole ring: producer, TMA slots, release barriers, the B tile copied in with TMA, wgmma
    from shared memory, the partials' bf16 stores and the wrapper's sum."""
    plgpu, params = _interpret_params()
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    splits = 2
    blocks = rm.SplitKBlocks(k_splits=splits, k_slot=128, stages=2, store=store)
    ws = _weights(3, 512, seed=4)
    x0 = jax.random.normal(jax.random.key(5), (splits, 512))  # x as two partials
    with plgpu.force_gpu_interpret_mode(params):
        got = np.asarray(rm.split_k_matvec_chain(rm.tile_weights_split_k(ws, blocks), x0,
                                                 blocks=blocks, chain=False))
        assert not gpu_callbacks.get_races().races_found
        zeros = np.asarray(rm.split_k_matvec_chain(rm.tile_weights_split_k(ws, blocks), x0,
                                                   blocks=blocks, chain=False, math=False))
    # x enters the products as bf16 partials, which the tensor cores add (the B tile's
    # columns); each split's partial sums are stored in bf16 and the wrapper adds the splits:
    # so the float64 partials, each within half a bf16 ulp.
    x = np.asarray(x0.astype(jnp.bfloat16), np.float64).sum(axis=0)
    w = np.asarray(ws, np.float64).reshape(3, 512, splits, 256)
    parts = np.einsum("lisj,sj->lsi", w, x.reshape(splits, 256))
    ulp = 2.0 ** (np.floor(np.log2(np.abs(parts) + 1e-30)) - 7)
    np.testing.assert_array_less(np.abs(got - parts.sum(axis=1)), ulp.sum(axis=1) / 2 + 1e-6)
    np.testing.assert_array_equal(zeros, 0.0)


@pytest.mark.parametrize("chain, math, store", [(True, True, "tma"), (False, False, "tma"),
                                               (True, True, "generic")])
def test_split_k_lowers_to_mosaic_gpu_for_hopper(chain, math, store):
    blocks = rm.SplitKBlocks(store=store)
    tiled = jax.ShapeDtypeStruct((3, 2048 // 64 * 4, 2048 // 4 // 128, 64, 128), jnp.bfloat16)
    x0 = jax.ShapeDtypeStruct((2048,), jnp.float32)
    run = jax.jit(lambda w, x: rm.split_k_matvec_chain(w, x, blocks=blocks, chain=chain,
                                                      math=math))
    assert "mosaic_gpu" in run.trace(tiled, x0).lower(lowering_platforms=("cuda",)).as_text()


def test_bench_cases_parse_and_refuse_what_the_kernel_does_not_take():
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    import bench_ring_matvec as bench

    d, layers, blocks, kernel, ctas = bench.parse_case("sk:2048:64:4:128:8")
    assert (d, layers, blocks.k_splits, blocks.store, kernel, ctas) == (
        2048, 64, 4, "tma", rm.split_k_matvec_chain, 128)
    assert bench.parse_case("sk:2048:64:4:128:8:generic")[2].store == "generic"
    for bad, words in [("2048:64:16:24:256", "want sk:"), ("sk:2048:64:4", "want sk:"),
                       ("sk:2048:64:4:128:x", "want sk:"),
                       ("sk:4096:4:4:128:8", "every CTA must be resident"),
                       ("sk:2048:64:4:128:8:smem", "want sk:"),
                       ("pk:2048:64:4:128:8", "want sk:")]:  # (the polling form: stage_chain)
        with pytest.raises(ValueError, match=words):
            bench.parse_case(bad)


def _trace(threads):
    """A profiler trace (the JSON Mosaic GPU writes) from {thread: [(name, begin, end), ...]}
    in cycles, nested scopes as given."""
    events = []
    for (pid, tid), scopes in threads.items():
        marks = []
        for name, begin, end in scopes:
            marks += [(begin, 0, name), (end, 1, name)]
        for ts, end, name in sorted(marks, key=lambda m: (m[0], -m[1])):
            events.append({"name": name, "ph": "E" if end else "B", "ts": ts / 1e3,
                           "pid": pid, "tid": tid})
    return {"displayTimeUnit": "ns", "traceEvents": events}


def test_profile_phases_takes_scopes_one_level_deep_and_layer_starts_per_warpgroup():
    # Two consumer warpgroups (CTAs), three layers each; the second CTA's "wait" holds a
    # nested "wait" (a scope inside a conditional), which must not count twice, and its
    # products hold a "load" (reported as "products/load") that holds a "poll" (too deep).
    first = [("x", 0, 100), ("products", 100, 400), ("store", 400, 500), ("arrive", 500, 520),
             ("wait", 520, 900), ("x", 900, 1000), ("products", 1000, 1300),
             ("store", 1300, 1400), ("arrive", 1400, 1420), ("wait", 1420, 1800),
             ("x", 1800, 1900)]
    second = [("x", 50, 170), ("products", 170, 470), ("store", 470, 570), ("arrive", 570, 600),
              ("wait", 600, 1000), ("wait", 650, 990), ("x", 1000, 1100),
              ("products", 1100, 1400), ("load", 1150, 1210), ("poll", 1160, 1200),
              ("store", 1400, 1500), ("arrive", 1500, 1530),
              ("wait", 1530, 1850), ("x", 1850, 1950)]
    phases = rm.profile_phases(_trace({(1, 1): first, (2, 3): second}))
    assert phases["wait"] == {"cycles": 380.0, "count": 4}  # 380, 380, 400, 320
    assert phases["x"] == {"cycles": 100.0, "count": 6}
    assert phases["products"] == {"cycles": 300.0, "count": 4}
    assert phases["arrive"] == {"cycles": 25.0, "count": 4}  # 20, 20, 30, 30
    assert phases["layer"] == {"cycles": 900.0, "count": 4}  # 900, 900, 950, 850
    assert phases["products/load"] == {"cycles": 60.0, "count": 1}
    assert set(phases) == {"wait", "x", "products", "store", "arrive", "layer", "products/load"}


def test_profile_phases_reads_what_the_mosaic_gpu_profiler_writes():
    """A trace written by Mosaic GPU's own ProfilerSpec.dump from a raw event buffer (two
    CTAs of two warpgroups; the producer's records nothing), read back by profile_phases."""
    import io
    import json

    profiler = pytest.importorskip("jax.experimental.mosaic.gpu.profiler")
    entries = 64
    spec = profiler.ProfilerSpec(entries)
    ids = {name: spec.intern_name(name) for name in ("x", "products", "store")}
    buffer = np.zeros((2, 2, entries), np.uint32)  # [CTA, warpgroup, entries]
    # (regions 1 cycle apart: the dump subtracts the smallest gap less 1 per event as the
    # profiler's own overhead, and moves an event that does not come after the last)
    for cta, offset in ((0, 0), (1, 7)):
        times = [("x", 10), ("products", 111), ("store", 412), ("x", 1010),
                 ("products", 1111), ("store", 1412)]
        events = []
        for i, (name, begin) in enumerate(times):
            length = {"x": 100, "products": 300, "store": 100 + 10 * cta}[name]
            events += [ids[name] | spec.ENTER, begin + offset,
                       ids[name] | spec.EXIT, begin + offset + length]
        buffer[cta, 0, :3] = (1000 * cta, cta, len(events))  # start time, SM, entries used
        buffer[cta, 0, 3:3 + len(events)] = events
    out = io.StringIO()
    spec.dump(buffer.reshape(-1), out, grid=(2,), block=(256,))
    phases = rm.profile_phases(json.loads(out.getvalue()))
    assert phases["products"] == {"cycles": 300.0, "count": 4}
    assert phases["x"]["count"] == 4 and phases["layer"] == {"cycles": 1000.0, "count": 2}
    assert phases["store"] == {"cycles": 105.0, "count": 4}  # 100, 100, 110, 110
