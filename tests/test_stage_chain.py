"""The decode-step chain of products (pallas_kernels/stage_chain.py), on CPU.

Here: the plan (splits, refusals), the weight tiling, the float32 reference against float64
numpy, the benchmark's XLA baseline against the reference, that the kernel lowers for CUDA,
and the kernel's logic run by Mosaic GPU's interpreter against the reference (its interpreted
form: polls by plain loads, x written into the B tile's wgmma view). The GPU form's volatile
polls and unswizzled B-tile view are checked on the GPU by tools/bench_stage_chain.py.
"""

from __future__ import annotations

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
    for loop in (bench.chained_calls(lambda t, x: sc.stage_chain(plan, t, x)[1][-1], tiled, 256),
                 bench.chained_calls_with_state(plan, tiled, 256)):
        text = loop(3).trace(x0).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


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
