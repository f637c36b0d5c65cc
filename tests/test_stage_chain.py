"""The decode-step chain of products (pallas_kernels/stage_chain.py), on CPU.

Here: the plan (splits, refusals), the weight tiling, the float32 reference against float64
numpy, the benchmark's XLA baseline against the reference, that the kernel lowers for CUDA,
and the kernel's logic run by Mosaic GPU's interpreter against the reference (its interpreted
form: polls by plain loads, x written into the B tile's wgmma view). The GPU form's volatile
polls and unswizzled B-tile view are checked on the GPU by tools/bench_stage_chain.py.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import load_config
from pallas_kernels import stage_chain as sc

SMALL = sc.ChainPlan(layer=(sc.Stage(384, 256, 2), sc.Stage(256, 384, 3)),
                     tail=(sc.Stage(640, 256, 1),), num_layers=3, ctas=8)


def _weights(plan, seed=0):
    rng = np.random.default_rng(seed)
    layer = [(rng.standard_normal((plan.num_layers, st.rows, st.cols)) / st.cols ** 0.5)
             for st in plan.layer]
    tail = [rng.standard_normal((st.rows, st.cols)) / st.cols ** 0.5 for st in plan.tail]
    return ([jnp.asarray(w, jnp.bfloat16) for w in layer],
            [jnp.asarray(w, jnp.bfloat16) for w in tail])


def test_plan_for_125m_has_the_models_shapes_and_the_least_work_splits():
    plan = sc.chain_plan_for(load_config("125m"), num_ctas=132)
    # qkv (12 + 2 x 12 heads of 64), o-proj, gate/up (2 x 2048), down, the output layer
    assert [(st.rows, st.cols) for st in plan.layer + plan.tail] == [
        (2304, 768), (768, 768), (4096, 768), (768, 2048), (50304, 768)]
    assert plan.num_layers == 12 and len(plan.steps()) == 49
    # Worked by hand: busiest CTA's units x (slots a unit + 1). qkv: 3 splits -> 108 units of
    # 2 slots (3 a CTA) beats 2 (72 units of 3: 4) and 6 (216 of 1: 2 x 2 = 4); o-proj 6 -> 72
    # of 1 (2); gate/up 2 -> 128 of 3 (4); down 8 -> 96 of 2 (3); head 1 -> 786 of 6, 6 a CTA.
    assert [st.splits for st in plan.layer + plan.tail] == [3, 6, 2, 8, 1]
    assert sc.check_plan(plan, 132) is None
    for st in plan.layer + plan.tail:  # no other valid split gives the busiest CTA less work
        def work(s, st=st):
            return -(-st.rows // 64 * s // 132) * (st.cols // s // 128 + sc.UNIT_COST)
        valid = [s for s in range(1, 17) if st.cols % s == 0 and (st.cols // s) % 128 == 0]
        assert work(st.splits) == min(work(s) for s in valid)


@pytest.mark.parametrize("plan, words", [
    (sc.ChainPlan(layer=(sc.Stage(100, 256, 1),)), "multiple of 64"),
    (sc.ChainPlan(layer=(sc.Stage(256, 256, 4),)), "multiple of k_slot (128) and of 128"),
    (sc.ChainPlan(layer=(sc.Stage(256, 512, 1),)), "reads 512 values; the stage before gives 256"),
    (sc.ChainPlan(layer=(sc.Stage(256, 256, 1), sc.Stage(2048, 256, 2)),
                  tail=(sc.Stage(64, 8192, 1),)), "reads 8192 values"),
    (sc.ChainPlan(layer=(sc.Stage(8192, 8192, 64), sc.Stage(8192, 8192, 1))),
     "would poll 4096 values of 64 partials"),
    (sc.ChainPlan(layer=(sc.Stage(256, 256, 1),), k_slot=96), "k_slot 96"),
    (sc.ChainPlan(layer=(sc.Stage(256, 256, 1),), ring=14, k_slot=256), "shared memory"),
    (sc.ChainPlan(layer=()), "no layer stages"),
])
def test_plans_the_kernel_cannot_run_are_refused_with_the_reason(plan, words):
    problem = sc.check_plan(plan, 132)
    assert problem is not None and words in problem
    with pytest.raises(ValueError, match="stage_chain does not take"):
        sc.tile_chain(plan, [], [])


def test_tile_chain_puts_each_units_slot_in_one_contiguous_block():
    plan = SMALL
    layer_ws, tail_ws = _weights(plan)
    tiled = [np.asarray(t) for t in sc.tile_chain(plan, layer_ws, tail_ws)]
    assert tiled[0].shape == (3, 384 // 64 * 2, 1, 64, 128)
    assert tiled[2].shape == (1, 10, 2, 64, 128)
    for k, (t, st) in enumerate(zip(tiled, plan.layer + plan.tail)):
        w = np.asarray(layer_ws[k] if k < len(plan.layer) else tail_ws[0][None])
        for layer in range(t.shape[0]):
            for unit in range(st.units):
                r, s = divmod(unit, st.splits)
                for q in range(st.part // 128):
                    cols = slice(s * st.part + q * 128, s * st.part + (q + 1) * 128)
                    np.testing.assert_array_equal(t[layer, unit, q],
                                                  w[layer, 64 * r:64 * (r + 1), cols])
    with pytest.raises(ValueError, match="want"):
        sc.tile_chain(plan, [w[:, :, :128] for w in layer_ws], tail_ws)
    with pytest.raises(ValueError, match="1 layer and 1 tail weights"):
        sc.tile_chain(plan, layer_ws[:1], tail_ws)


def test_reference_is_the_chain_in_float64():
    plan = SMALL
    layer_ws, tail_ws = _weights(plan, seed=3)
    x0 = np.random.default_rng(4).standard_normal(256)
    outs, tails = sc.stage_chain_reference(plan, layer_ws, tail_ws, jnp.asarray(x0, jnp.float32))
    x = x0
    for layer in range(plan.num_layers):
        for k, w in enumerate(layer_ws):
            w = np.asarray(w, np.float64)[layer]
            x = w @ x[:w.shape[1]]
            np.testing.assert_allclose(np.asarray(outs[k][layer]), x, rtol=1e-4, atol=1e-4)
    x = np.asarray(tail_ws[0], np.float64) @ x[:256]
    np.testing.assert_allclose(np.asarray(tails[0]), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prologues", [False, True])
def test_benchmarks_xla_baseline_is_the_same_chain(prologues):
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    import bench_stage_chain as bench

    plan = MLP if prologues else SMALL
    layer_ws, tail_ws = bench.random_weights(plan, seed=5)
    norms = bench.random_norms(plan, seed=6) if prologues else None
    x0 = jax.random.normal(jax.random.key(6), (256,), jnp.float32)
    want = sc.stage_chain_reference(plan, layer_ws, tail_ws, x0, norms)[1][-1]
    got = bench.xla_chain(plan, (layer_ws, tail_ws), x0, norms)  # x in bf16 at each product
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 0.03


@pytest.mark.parametrize("name", ["small", "125m"])
def test_kernel_lowers_to_mosaic_gpu_for_hopper(name):
    """Up to the Mosaic GPU module (no PTX): what Pallas' lowering rejects (dynamic unit loops,
    shared-memory views, layouts) fails here."""
    plan = SMALL if name == "small" else sc.chain_plan_for(load_config("125m"), num_ctas=132,
                                                           num_layers=2)
    tiled = tuple(jax.ShapeDtypeStruct((plan.num_layers if i < len(plan.layer) else 1, st.units,
                                        st.part // plan.k_slot, 64, plan.k_slot), jnp.bfloat16)
                  for i, st in enumerate(plan.layer + plan.tail))
    x0 = jax.ShapeDtypeStruct((plan.layer[0].cols,), jnp.float32)
    run = jax.jit(lambda t, x: sc.stage_chain(plan, t, x))
    assert "mosaic_gpu" in run.trace(tiled, x0).lower(lowering_platforms=("cuda",)).as_text()
    # With a carried state (no arming pass): the partials become in-out operands of the kernel.
    state = jax.eval_shape(lambda: sc.init_chain_state(plan))
    run = jax.jit(lambda t, x, st: sc.stage_chain(plan, t, x, state=st))
    text = run.trace(tiled, x0, state).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "output_operand_alias" in text
    with pytest.raises(ValueError, match="x0 of shape"):
        sc.stage_chain(plan, tiled, jnp.zeros(plan.layer[0].cols + 64))
    with pytest.raises(ValueError, match="tile them with tile_chain"):
        sc.stage_chain(plan, tiled[::-1], jnp.zeros(plan.layer[0].cols))


def test_chain_state_starts_with_both_parities_armed_and_is_checked_against_the_plan():
    state = sc.init_chain_state(SMALL)
    assert [p.shape for p in state["parts"]] == [(2, 3, 2, 6, 64), (2, 3, 3, 4, 64),
                                                (2, 1, 1, 10, 64)]
    assert all(bool(jnp.all(jnp.isnan(p))) for p in state["parts"]) and int(state["parity"]) == 0
    other = sc.init_chain_state(sc.ChainPlan(layer=SMALL.layer, num_layers=3, ctas=8))
    tiled = sc.tile_chain(SMALL, *_weights(SMALL))
    with pytest.raises(ValueError, match="make it with init_chain_state"):
        sc.stage_chain(SMALL, tiled, jnp.zeros(256), state=other)


def test_benchmarks_chained_loops_lower_for_cuda():
    """The benchmark's timed loops (with and without the carried state) trace and lower: a
    carry whose types change between calls, or a state the kernel cannot alias, fails here."""
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    import bench_stage_chain as bench

    plan = SMALL
    tiled = sc.tile_chain(plan, *_weights(plan))
    x0 = jax.ShapeDtypeStruct((256,), jnp.float32)
    for static in (False, True):  # the call count traced (one compile) or one compile a count
        for loop in (bench.chained_calls(lambda t, x: sc.stage_chain(plan, t, x)[1][-1], tiled,
                                         256, static=static),
                     bench.chained_calls_with_state(plan, tiled, 256, static=static)):
            text = jax.jit(loop(3)).trace(x0).lower(lowering_platforms=("cuda",)).as_text()
            assert "mosaic_gpu" in text
            assert (loop(3).func is loop(5).func) == (not static)


MLP = sc.ChainPlan(layer=(sc.Stage(384, 256, 2, "norm"), sc.Stage(256, 256, 2),
                          sc.Stage(1024, 256, 2, "norm"), sc.Stage(256, 512, 4, "swiglu")),
                   tail=(sc.Stage(640, 256, 1, "norm"),), num_layers=2, ctas=8, norm_eps=1e-5)


def _norms(plan, seed=7):
    rng = np.random.default_rng(seed)
    out = []
    for i, st in enumerate(plan.layer + plan.tail):
        shape = (st.cols,) if i >= len(plan.layer) else (plan.num_layers, st.cols)
        out.append(jnp.asarray(1 + 0.1 * rng.standard_normal(shape), jnp.float32)
                   if st.prologue == "norm" else None)
    return out


def test_reference_with_prologues_is_a_pre_norm_block_in_float64():
    """Residual stream, RMS norms before qkv, gate/up and the output layer, SwiGLU before down
    (o-proj reads q where attention would be), against a float64 numpy transcription."""
    plan = MLP
    layer_ws, tail_ws = _weights(plan, seed=8)
    norms = _norms(plan)
    x0 = np.random.default_rng(9).standard_normal(256)
    got = sc.stage_chain_reference(plan, layer_ws, tail_ws, jnp.asarray(x0, jnp.float32), norms)
    w = [np.asarray(v, np.float64) for v in layer_ws]
    g = [None if v is None else np.asarray(v, np.float64) for v in norms]

    def rms(h, weight):
        return h / np.sqrt(np.mean(h * h) + 1e-5) * weight

    h = x0
    for layer in range(2):
        qkv = w[0][layer] @ rms(h, g[0][layer])
        o = w[1][layer] @ qkv[:256]
        h = h + o
        gu = w[2][layer] @ rms(h, g[2][layer])
        gate, up = gu[:512], gu[512:]
        down = w[3][layer] @ (gate / (1 + np.exp(-gate)) * up)
        h = h + down
        for k, want in enumerate([qkv, o, gu, down]):
            np.testing.assert_allclose(np.asarray(got[0][k][layer]), want, rtol=2e-4, atol=2e-4)
    logits = np.asarray(tail_ws[0], np.float64) @ rms(h, g[4])
    np.testing.assert_allclose(np.asarray(got[1][0]), logits, rtol=2e-4, atol=2e-4)


def test_plan_for_125m_with_prologues_norms_qkv_gate_up_and_the_head():
    plan = sc.chain_plan_for(load_config("125m"), num_ctas=132, prologues=True)
    assert [st.prologue for st in plan.layer + plan.tail] == ["norm", "sum", "norm", "swiglu",
                                                             "norm"]
    assert plan.norm_eps == load_config("125m").model.norm_eps
    assert sc.check_plan(plan, 132) is None


@pytest.mark.parametrize("plan, words", [
    (sc.ChainPlan(layer=(sc.Stage(256, 256, 1, "gelu"),)), "prologue 'gelu'"),
    (sc.ChainPlan(layer=(sc.Stage(256, 256, 1, "norm"), sc.Stage(256, 256, 1, "swiglu"))),
     "reads 512 values; the stage before gives 256"),
    (sc.ChainPlan(layer=(sc.Stage(512, 256, 1), sc.Stage(256, 256, 1, "norm"))),
     "without a norm first stage"),
    (sc.ChainPlan(layer=(sc.Stage(512, 256, 1, "norm"), sc.Stage(256, 512, 1, "norm"))),
     "different widths"),
])
def test_prologue_plans_the_kernel_cannot_run_are_refused(plan, words):
    problem = sc.check_plan(plan, 132)
    assert problem is not None and words in problem


@pytest.mark.parametrize("name", ["mlp", "125m"])
def test_prologue_kernel_lowers_with_and_without_state(name):
    plan = MLP if name == "mlp" else sc.chain_plan_for(load_config("125m"), num_ctas=132,
                                                       num_layers=2, prologues=True)
    tiled = tuple(jax.ShapeDtypeStruct((plan.num_layers if i < len(plan.layer) else 1, st.units,
                                        st.part // plan.k_slot, 64, plan.k_slot), jnp.bfloat16)
                  for i, st in enumerate(plan.layer + plan.tail))
    norms = [None if g is None else jax.ShapeDtypeStruct(g.shape, g.dtype) for g in _norms(plan)]
    x0 = jax.ShapeDtypeStruct((plan.layer[0].cols,), jnp.float32)
    run = jax.jit(lambda t, x, g: sc.stage_chain(plan, t, x, norms=g))
    lowered = run.trace(tiled, x0, norms).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
    state = jax.eval_shape(lambda: sc.init_chain_state(plan))
    assert len(state["residuals"]) == 3  # qkv's, gate/up's, the head's
    run = jax.jit(lambda t, x, g, st: sc.stage_chain(plan, t, x, norms=g, state=st))
    text = run.trace(tiled, x0, norms, state).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "output_operand_alias" in text


def test_norm_weights_are_checked_against_the_plan():
    tiled = sc.tile_chain(MLP, *_weights(MLP))
    x0 = jnp.zeros(256)
    with pytest.raises(ValueError, match="need norms"):
        sc.stage_chain(MLP, tiled, x0)
    bad = _norms(MLP)
    bad[2] = bad[2][0]
    with pytest.raises(ValueError, match=r"norm weights of stage 2: \(256,\), want \(2, 256\)"):
        sc.stage_chain(MLP, tiled, x0, norms=bad)
    with pytest.raises(ValueError, match="without norm stages"):
        sc.stage_chain(SMALL, sc.tile_chain(SMALL, *_weights(SMALL)), x0, norms=_norms(MLP))


def _interpreted(plan, norms, calls=2):
    """`calls` chained calls of the interpreted kernel on one state -> (outputs, states)."""
    plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    if not hasattr(plgpu, "force_gpu_interpret_mode"):
        pytest.skip("this JAX has no Mosaic GPU interpreter")
    layer_ws, tail_ws = _weights(plan, seed=11)
    x0 = jnp.asarray(np.random.default_rng(12).standard_normal(plan.layer[0].cols), jnp.float32)
    tiled = sc.tile_chain(plan, layer_ws, tail_ws)
    want = sc.stage_chain_reference(plan, layer_ws, tail_ws, x0, norms)
    state, outs, states = sc.init_chain_state(plan), [], []
    # Two CTAs: the interpreter runs a cluster's CTAs as Python threads, and more of them
    # spinning in their polls starve the ones they wait for.
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=False)):
        for _ in range(calls):
            out, state = sc.stage_chain(plan, tiled, x0, norms=norms, state=state,
                                        interpret=True)
            outs.append(out)
            states.append(state)
    return want, outs, states


@pytest.mark.parametrize("name", ["plain", "prologues"])
def test_interpreted_kernel_matches_the_reference_over_both_parities(name):
    """The kernel's own logic, run by Mosaic GPU's interpreter: units dealt over the CTAs, ring
    slots, polls, the prologues and residual stream (pre-norm block), and the carried state
    (each call writes the parity the call before armed, and arms the other)."""
    import dataclasses
    plan = dataclasses.replace(SMALL if name == "plain" else MLP, ctas=2)
    want, outs, states = _interpreted(plan, None if name == "plain" else _norms(plan))
    for (layer_outs, tail_outs), state, parity in zip(outs, states, (1, 0)):
        for got, ref in zip(list(layer_outs) + list(tail_outs), list(want[0]) + list(want[1])):
            scale = float(jnp.max(jnp.abs(ref)))
            assert float(jnp.max(jnp.abs(got - ref))) < 0.02 * scale  # x rounds to bf16
        assert int(state["parity"]) == parity
        for buffer in (*state["parts"], *state["residuals"]):  # the next call's parity: armed
            assert bool(jnp.all(jnp.isnan(buffer[parity])))
            assert not bool(jnp.any(jnp.isnan(buffer[1 - parity])))
    with pytest.raises(ValueError, match="needs a state"):
        sc.stage_chain(plan, sc.tile_chain(plan, *_weights(plan)), jnp.zeros(256),
                       norms=None if name == "plain" else _norms(plan), interpret=True)


def _attention_plan(heads, kv_heads, max_len=256, swizzle_q=False, ctas=2, merge_splits=None,
                    **options):
    d = 256
    qkv = (heads + 2 * kv_heads) * 64
    merge_splits = merge_splits or max(1, heads // 2)
    return sc.ChainPlan(
        layer=(sc.Stage(qkv, d, 2, "norm"), sc.attention_stage(heads, kv_heads, max_len),
               sc.Stage(d, heads * 64, merge_splits, "merge"), sc.Stage(512, d, 2, "norm"),
               sc.Stage(d, 256, 2, "swiglu")),
        tail=(sc.Stage(640, d, 1, "norm"),), num_layers=2, ctas=ctas, swizzle_q=swizzle_q,
        **options)


def test_swizzled_q_rows_land_where_the_swizzled_tile_reads_them_and_rope_commutes():
    """A model of the 128-byte swizzle (row r of a [8, 64] bf16 tile keeps its 16-byte chunk c
    at chunk c ^ r): rows stored plainly in swizzle_rows' order read back in the model's
    order; and RoPE by the shifted load with rope_tables' swizzled rows equals the model's
    rotate-half RoPE, reordered."""
    group, pos = 8, 37
    inv_freq = 1.0 / 10000.0 ** (np.arange(32) / 32)
    rng = np.random.default_rng(3)
    q = rng.standard_normal((group, 64))  # one kv head's query heads, the model's order
    order = np.asarray(sc.swizzle_rows(group * 64, group))
    stored = q.reshape(-1)[order].reshape(group, 8, 8)  # plain stores, swizzle order
    chunks = np.arange(8)
    read = np.stack([stored[r][chunks ^ r] for r in range(group)]).reshape(group, 64)
    np.testing.assert_array_equal(read, q)
    assert sorted(order) == list(range(group * 64))
    np.testing.assert_array_equal(order[order], np.arange(group * 64))  # its own inverse
    plan = _attention_plan(16, 2, swizzle_q=True)  # (group 8)
    cos, sin = (np.asarray(t[pos]) for t in sc.rope_tables(plan, inv_freq))
    x = stored.reshape(group, 64)
    doubled = np.concatenate([x, x], 1)
    got = x * cos + doubled[:, 32:96] * sin  # the kernel's `rotated`
    want = np.asarray(sc.rotate_half_rope(jnp.asarray(q, jnp.float32), pos, inv_freq))
    np.testing.assert_allclose(got, want.reshape(-1)[order].reshape(group, 64), atol=1e-5)


def test_attention_reference_is_softmax_attention_in_float64():
    st = sc.attention_stage(4, 2, 256)
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal(st.cols)
    k_cache, v_cache = rng.standard_normal((2, 2, 256, 64))
    pos, inv_freq = 100, 1.0 / 10000.0 ** (np.arange(32) / 32)
    got, k_new, v_new = sc.attention_reference(st, jnp.asarray(qkv, jnp.float32),
                                               jnp.asarray(k_cache, jnp.float32),
                                               jnp.asarray(v_cache, jnp.float32), pos, inv_freq)

    def rope(x):
        angle = np.concatenate([pos * inv_freq] * 2)
        return x * np.cos(angle) + np.concatenate([-x[..., 32:], x[..., :32]], -1) * np.sin(angle)

    q = rope(qkv[:256].reshape(4, 64))
    k = rope(qkv[256:384].reshape(2, 64))
    v = qkv[384:].reshape(2, 64)
    want = []
    for head in range(4):
        kv = head // 2
        keys = np.concatenate([k_cache[kv, :pos], k[kv][None]])
        values = np.concatenate([v_cache[kv, :pos], v[kv][None]])
        s = keys @ q[head] / 8.0
        p = np.exp(s - s.max())
        want.append(p @ values / p.sum())
    np.testing.assert_allclose(np.asarray(got), np.concatenate(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(k_new), k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(v_new), v, rtol=1e-6)


def test_attention_plans_are_checked():
    assert sc.check_plan(_attention_plan(4, 2), 2) is None
    bad = _attention_plan(4, 2)
    layer = list(bad.layer)
    layer[2] = sc.Stage(256, 256, 2, "sum")
    import dataclasses
    assert "merge" in sc.check_plan(dataclasses.replace(bad, layer=tuple(layer)), 2)
    assert "query heads a kv head" in sc.check_plan(_attention_plan(12, 4), 2)
    plan = sc.chain_plan_for(load_config("1b"), prologues=True, max_len=768, num_ctas=132)
    assert [st.prologue for st in plan.layer] == ["norm", "attention", "merge", "norm", "swiglu"]
    assert plan.layer[1].units == 8 * 7 and plan.layer[1].group == 4
    assert sc.shared_memory(plan) <= sc.SHARED_MEMORY and sc.check_plan(plan, 132) is None
    # The default shares the attention staging only where the separate one leaves the ring
    # fewer than 6 slots: 1b (5 -> 6), not 125m (6).
    assert plan.shared_staging and plan.ring == 6
    separate = sc.chain_plan_for(load_config("1b"), prologues=True, max_len=768, num_ctas=132,
                                 shared_staging=False)
    assert not separate.shared_staging and separate.ring == 5
    small = sc.chain_plan_for(load_config("125m"), prologues=True, max_len=768, num_ctas=132)
    assert not small.shared_staging and small.ring == 6
    # o-proj's merge polls merge_values a thread at once: a split of 8 heads (1b) takes 8 a
    # chunk partial, so at least 8, and at most 192 (registers).
    assert "merge_values 4 " in sc.check_plan(dataclasses.replace(plan, merge_values=4), 132)
    assert "merge_values 256 " in sc.check_plan(dataclasses.replace(plan, merge_values=256), 132)
    fewer = dataclasses.replace(plan, layer=(plan.layer[0], plan.layer[1],
                                             dataclasses.replace(plan.layer[2], splits=1),
                                             *plan.layer[3:]))
    assert "32 values a thread, over merge_values 16" in sc.check_plan(
        dataclasses.replace(fewer, merge_values=16), 132)
    assert sc.check_plan(dataclasses.replace(plan, merge_values=128), 132) is None
    with pytest.raises(ValueError, match="needs prologues"):
        sc.chain_plan_for(load_config("1b"), max_len=768)


@pytest.mark.parametrize("heads,kv_heads,pos,shared,max_len,merge_values", [
    (4, 2, 130, False, 256, 64), (2, 2, 5, False, 256, 64), (8, 1, 200, False, 256, 64),
    (2, 2, 130, True, 256, 64), (8, 1, 200, True, 256, 64), (8, 1, 300, False, 1024, 64),
    (8, 1, 900, False, 1024, 24), (8, 1, 900, False, 1024, 128)])
def test_interpreted_attention_block_matches_the_reference_and_writes_the_cache(
        heads, kv_heads, pos, shared, max_len, merge_values):
    """The whole pre-norm block with attention in Mosaic GPU's interpreter: qkv, attention over
    a cache (RoPE, GQA or MHA, a chunk partly filled and one empty), the merge in o-proj's
    prologue, the MLP and a normed head, against the float32 reference; the new token's k
    (after RoPE) and v land in the cache at pos. shared: ChainPlan.shared_staging (MHA, and 8
    query heads a kv head: rows 8..15 full). The 1,024-position case merges its 9 chunk
    partials in two groups (8 heads a split), the second wholly past pos: it hung the GPU (a
    NaN merge is never ready to its pollers) before the merge kept one running max. With
    ChainPlan.merge_values 24 the partials come in three groups of 3 (at pos 900, every
    chunk but the last full), with 128 in one."""
    plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    if not hasattr(plgpu, "force_gpu_interpret_mode"):
        pytest.skip("this JAX has no Mosaic GPU interpreter")
    plan = _attention_plan(heads, kv_heads, max_len, shared_staging=shared,
                           merge_splits=1 if max_len > 256 else None, merge_values=merge_values)
    assert sc.check_plan(plan, 2) is None
    rng = np.random.default_rng(21)
    layer_ws, tail_ws = _weights(dataclasses_replace_layer(plan), seed=13)
    layer_ws[1] = None
    norms = _norms(plan)
    cache = tuple(jnp.asarray(rng.standard_normal((2, kv_heads, max_len, 64)), jnp.bfloat16)
                  for _ in range(2))
    inv_freq = 1.0 / 10000.0 ** (np.arange(32) / 32)
    x0 = jnp.asarray(rng.standard_normal(256), jnp.float32)
    want = sc.stage_chain_reference(plan, layer_ws, tail_ws, x0, norms, cache=cache, pos=pos,
                                    inv_freq=inv_freq)
    like = sc.stage_chain_reference(plan, layer_ws, tail_ws, x0, norms, cache=cache, pos=pos,
                                    inv_freq=inv_freq, like_kernel=True)
    tiled = sc.tile_chain(plan, layer_ws, tail_ws)
    state = sc.init_chain_state(plan, cache)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=False)):
        (layer_outs, tails), state = sc.stage_chain(
            plan, tiled, x0, norms=norms, state=state, pos=pos,
            rope=sc.rope_tables(plan, inv_freq), interpret=True)
    for got, ref in zip(list(layer_outs) + list(tails), list(want[0]) + list(want[1])):
        scale = float(jnp.max(jnp.abs(ref)))
        assert float(jnp.max(jnp.abs(got - ref))) < 0.03 * scale  # bf16 operands
    for got, ref in zip(list(layer_outs) + list(tails), list(like[0]) + list(like[1])):
        # rounded where the kernel rounds: summation order, per-chunk softmax and the odd bf16
        # rounding that flips with them (amplified over two layers)
        assert float(jnp.max(jnp.abs(got - ref))) < 5e-3 * float(jnp.max(jnp.abs(ref)))
    att = plan.layer[1]
    for layer in range(2):
        _, k_new, v_new = sc.attention_reference(att, want[0][0][layer], cache[0][layer],
                                                 cache[1][layer], pos, inv_freq)
        for new, written in ((k_new, state["cache"][0]), (v_new, state["cache"][1])):
            got = written[layer, :, pos].astype(jnp.float32)
            assert float(jnp.max(jnp.abs(got - new))) < 0.03 * float(jnp.max(jnp.abs(new)))
        for old, now in zip(cache, state["cache"]):  # nothing else written
            mask = np.ones(max_len, bool)
            mask[pos] = False
            np.testing.assert_array_equal(np.asarray(now[layer][:, mask], np.float32),
                                          np.asarray(old[layer][:, mask], np.float32))


def dataclasses_replace_layer(plan):
    """The plan with the attention stage as a weighted stand-in, for drawing weights."""
    import dataclasses
    layer = list(plan.layer)
    layer[plan.attention] = sc.Stage(64, 64, 1)
    return dataclasses.replace(plan, layer=tuple(layer))


@pytest.mark.parametrize("shared,max_len,merge_values", [(False, 768, 64), (True, 768, 64),
                                                         (True, 4096, 128)])
def test_whole_step_kernel_lowers_for_hopper_and_checks_its_inputs(shared, max_len,
                                                                   merge_values):
    """1b's step with attention (GQA, swizzled q rows, 768 or 4,096 positions) up to the
    Mosaic GPU module; and its attention inputs are checked."""
    plan = sc.chain_plan_for(load_config("1b"), prologues=True, max_len=max_len, num_ctas=132,
                             num_layers=2, shared_staging=shared)
    plan = dataclasses.replace(plan, merge_values=merge_values)
    assert plan.ring == (6 if shared else 5)  # (the one staging leaves a slot more)
    stages = plan.layer + plan.tail
    tiled = [None if not st.weighted else jax.ShapeDtypeStruct(
        (plan.num_layers if i < len(plan.layer) else 1, st.units, st.part // plan.k_slot, 64,
         plan.k_slot), jnp.bfloat16) for i, st in enumerate(stages)]
    norms = [None if st.prologue != "norm" else jax.ShapeDtypeStruct(
        (st.cols,) if i >= len(plan.layer) else (plan.num_layers, st.cols), jnp.float32)
        for i, st in enumerate(stages)]
    x0 = jax.ShapeDtypeStruct((plan.layer[0].cols,), jnp.float32)
    state = jax.eval_shape(lambda: sc.init_chain_state(plan))
    rope = jax.eval_shape(lambda: sc.rope_tables(plan, jnp.ones(32)))
    run = jax.jit(lambda t, x, g, st, pos, r: sc.stage_chain(plan, t, x, norms=g, state=st,
                                                             pos=pos, rope=r))
    text = run.trace(tiled, x0, norms, state, jax.ShapeDtypeStruct((), jnp.int32),
                     rope).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "output_operand_alias" in text
    # The checks (before any launch): the weights as shapes, the rest real.
    norms = [None if g is None else jnp.ones(g.shape) for g in norms]
    x0, state = jnp.zeros(x0.shape), sc.init_chain_state(plan)
    rope = sc.rope_tables(plan, jnp.ones(32))
    with pytest.raises(ValueError, match="needs a state with the cache"):
        sc.stage_chain(plan, tiled, x0, norms=norms)
    with pytest.raises(ValueError, match="needs pos"):
        sc.stage_chain(plan, tiled, x0, norms=norms, state=state)
    with pytest.raises(ValueError, match="rope tables"):
        sc.stage_chain(plan, tiled, x0, norms=norms, state=state, pos=3,
                       rope=(rope[0], rope[1][:-1]))
    with pytest.raises(ValueError, match="outside the cache"):
        sc.stage_chain(plan, tiled, x0, norms=norms, state=state, pos=max_len, rope=rope)
    with pytest.raises(ValueError, match="want .* bfloat16"):
        sc.init_chain_state(plan, (jnp.zeros((2, 8, max_len, 64)),) * 2)


def _profiled(units, starts, inset=1, counter=None):
    """A trace as Mosaic GPU's ProfilerSpec.dump writes it from a raw event buffer: per CTA
    (units: {cta: [(begin, ready, end), ...]}) an "x" scope to ready, "products" from ready +
    inset to end - inset and a one-tick "store" at end, in times that counter(cta, t) turns
    into the CTA's cycles (default: the times are cycles); starts: {cta: global timer, ns}.
    The producer warpgroup records one scope 1 cycle long, so the least gap between two
    events is 1 and the dump takes no profiling overhead off."""
    import io
    import json

    profiler = pytest.importorskip("jax.experimental.mosaic.gpu.profiler")
    counter = counter or (lambda cta, t: t)
    spec = profiler.ProfilerSpec(256)
    ids = {name: spec.intern_name(name) for name in ("x", "products", "store")}
    buffer = np.zeros((len(units), 2, 256), np.uint32)  # [CTA, warpgroup, entries]
    for cta, triples in units.items():
        events = []
        for begin, ready, end in triples:
            for name, lo, hi in (("x", begin, ready), ("products", ready + inset, end - inset),
                                 ("store", end, end + 1)):
                events += [ids[name] | spec.ENTER, counter(cta, lo),
                           ids[name] | spec.EXIT, counter(cta, hi)]
        buffer[cta, 0, :3] = (starts[cta], cta, len(events))
        buffer[cta, 0, 3:3 + len(events)] = events
        buffer[cta, 1, :7] = (starts[cta], cta, 4, ids["x"] | spec.ENTER, 5,
                              ids["x"] | spec.EXIT, 6)
    out = io.StringIO()
    spec.dump(buffer.reshape(-1), out, grid=(len(units),), block=(256,))
    return json.loads(out.getvalue())


def test_stage_timeline_puts_all_ctas_on_the_global_clock():
    """A trace written by Mosaic GPU's ProfilerSpec.dump (two CTAs; events in SM cycles from
    each CTA's global-timer start), read by the benchmark's stage_timeline: units matched to
    (layer, stage) by the round robin, times in ns on one clock, per-stage medians. Expected
    values worked by hand at 2 cycles a ns (the comments below)."""
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    import bench_stage_chain as bench

    # Stage 0: 2 units (one a CTA); stage 1: 1 unit (CTA 0's); three layers.
    plan = sc.ChainPlan(layer=(sc.Stage(128, 128, 1), sc.Stage(64, 128, 1)), num_layers=3,
                        ctas=2)
    assert bench.unit_sequence(plan, 0, 2) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert bench.unit_sequence(plan, 1, 2) == [(0, 0), (1, 0), (2, 0)]
    # (first cycle, ready, last cycle) a unit; scopes 1 cycle apart or more (the dump then
    # takes no profiling overhead off).
    cycles = {0: [(0, 100, 400), (402, 1000, 1200), (1202, 1400, 1600), (1602, 2400, 2600),
                  (2602, 2800, 3000), (3002, 3800, 4000)],  # (layer 2: layer 1, 1,400 on)
              1: [(0, 300, 500), (502, 1600, 1900), (1902, 3000, 3300)]}
    starts = {0: 1000, 1: 1100}  # global timer (ns) at each CTA's start

    got = bench.stage_timeline(_profiled(cycles, starts), plan, clock_ghz=2.0)
    # In ns from 1000 (a unit's end is its store's end, cycle end + 1; CTA 1 starts 100 later):
    # stage 0's ends: layer 0 {200.5, 350.5}, layer 1 {800.5, 1050.5}; stage 1's: 600.5, 1300.5.
    # Readies: stage 0 layer 1 {700, 900}; stage 1 {500, 1200}. Layer 2 is layer 1 700 later.
    assert got["0:sum"] == {"done_after_prev_us": 0.45, "ready_after_prev_us": 0.3,
                            "spread_us": 0.25}
    assert got["1:sum"] == {"done_after_prev_us": 0.25, "ready_after_prev_us": 0.15,
                            "spread_us": 0.0}
    assert got["layer_us"] == 0.7
    # A trace cut short (the profiler keeps a CTA's first scopes only): CTA 1's layer-2 unit
    # is missing, so layer 2's stage 0 is not counted (with only CTA 0's end it would read
    # 0.2 us, and its median with layer 1's 0.325).
    cut = bench.stage_timeline(_profiled({0: cycles[0], 1: cycles[1][:2]}, starts), plan,
                               clock_ghz=2.0)
    assert cut["0:sum"] == got["0:sum"] and cut["layer_us"] == 0.7
    # The first layer only: stage 1 (after layer 0's stage 0), no stage 0 (nothing before
    # it), no layer step.
    first = bench.stage_timeline(_profiled(cycles, starts), plan, clock_ghz=2.0, layers=1)
    assert first == {"1:sum": got["1:sum"], "layer_us": None, "cta_clock_GHz": [2.0, 2.0]}
    with pytest.raises(ValueError, match="CTA 0 of 2 ran more units"):
        bench.stage_timeline(_profiled(cycles, starts), dataclasses.replace(plan, num_layers=2),
                             clock_ghz=2.0)


def test_stage_timeline_fits_each_ctas_cycle_counter_to_its_norm_units_inputs():
    """SMs' cycle counters need not advance at one rate (on an H200 some counted 14% more
    cycles than others between the same moments). Three CTAs with a norm unit each a layer,
    which get their input at the same moments; CTA 2's counter runs 10% fast and starts
    late. On the nominal clock its ends would drift 0.1 us a layer and stage 0 would
    spread; stage_timeline's common_clock fits its rate (2.2 GHz) from the norm units'
    inputs and gives the times as they were."""
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    import bench_stage_chain as bench

    plan = sc.ChainPlan(layer=(sc.Stage(192, 128, 1, "norm"), sc.Stage(64, 128, 1)),
                        num_layers=5, ctas=3)
    ghz = {0: 2.0, 1: 2.0, 2: 2.2}
    starts = {0: 1000, 1: 1000, 2: 1040}  # ns; CTA 2's first event 40 ns after the others'

    # true ns from 1000: every norm unit's input at 300 + 1000 l; CTA 0 also runs stage 1
    units = {cta: [(1000 * l + (40 if cta == 2 else 0) + 20 * cta, 1000 * l + 300,
                    1000 * l + 500 + 10 * cta) for l in range(5)] for cta in range(3)}
    units[0] = [unit for l in range(5) for unit in (units[0][l], (1000 * l + 600,
                                                                  1000 * l + 800,
                                                                  1000 * l + 900))]

    trace = _profiled(units, starts, inset=5,  # counters: cycles from the start, own rates
                      counter=lambda cta, t: round((t + 1000 - starts[cta]) * ghz[cta]))
    got = bench.stage_timeline(trace, plan, clock_ghz=2.0)
    # stage 0's ends 500, 510, 520 a layer, 0.4 us after stage 1's end (900 a layer before);
    # stage 1 0.38 us after stage 0's last end (520).
    assert got["0:norm"] == {"done_after_prev_us": 0.62, "ready_after_prev_us": 0.4,
                             "spread_us": 0.02}
    assert got["1:sum"] == {"done_after_prev_us": 0.38, "ready_after_prev_us": 0.28,
                            "spread_us": 0.0}
    assert got["layer_us"] == 1.0 and got["cta_clock_GHz"] == [2.0, 2.2]
