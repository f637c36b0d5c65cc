"""pallas_kernels/fused_decode.py (interpret mode on CPU) against model.forward's cached decode
step: logits and the cache it writes, for MHA, GQA and MQA, several programs and splits."""

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import decode, decode_steps, kv_cache, model
from jaxlm.config import ModelConfig, RopeScaling
from pallas_kernels import fused_decode, fused_decode_kernel

PROMPT, STEPS = 9, 3


def _config(kv_heads=2, dtype="float32", **extra):
    return ModelConfig(vocab_size=320, embed_dim=64, num_layers=2, num_heads=4,
                       num_kv_heads=kv_heads, head_dim=16, mlp_dim=96, max_seq_len=128,
                       compute_dtype=dtype, **extra)


def _params(cfg, seed=0):
    # Weights x6: peaked attention and logits far apart, so a wrong key or row shows.
    params = model.init_params(cfg, jax.random.key(seed))
    return jax.tree.map(lambda w: w * 6 if w.ndim >= 2 else w, params)


def _compare(cfg, params, plan_options, one_launch=False):
    """Max |logits - forward|, max |cache - forward's cache| / max |cache| over STEPS decode
    steps, and max |forward's logits|."""
    tokens = jax.random.randint(jax.random.key(1), (1, PROMPT + STEPS), 0, cfg.vocab_size)
    cache = kv_cache.init_cache(cfg, 1, 32)
    _, cache = model.forward(cfg, params, tokens[:, :PROMPT], cache=cache)
    ref_cache = jax.tree.map(jnp.copy, cache)
    plan = fused_decode.make_plan(cfg, cache, interpret=True, **plan_options)
    weights = fused_decode.prepare(cfg, params)
    step = jax.jit(lambda w, t, c: fused_decode.decode_token(cfg, w, t, c, plan=plan,
                                                             one_launch=one_launch))
    logit_error = cache_error = 0.0
    scale = 0.0
    for i in range(STEPS):
        token = tokens[0, PROMPT + i:PROMPT + i + 1]
        logits, cache = step(weights, token, cache)
        assert bool(jnp.all(jnp.isfinite(logits)))  # (a NaN would slip through max() below)
        ref, ref_cache = model.forward(cfg, params, token[None], cache=ref_cache)
        logit_error = max(logit_error, float(jnp.max(jnp.abs(logits - ref[:, 0]))))
        scale = max(scale, float(jnp.max(jnp.abs(ref))))
        for name in ("k", "v"):  # relative to the largest cached value
            assert bool(jnp.all(jnp.isfinite(cache[name].astype(jnp.float32))))
            ref_values = ref_cache[name].astype(jnp.float32)
            cache_error = max(cache_error, float(
                jnp.max(jnp.abs(cache[name].astype(jnp.float32) - ref_values))
                / jnp.max(jnp.abs(ref_values))))
    assert int(cache["lengths"][0]) == int(ref_cache["lengths"][0]) == PROMPT + STEPS
    return logit_error, cache_error, scale


@pytest.mark.parametrize("kv_heads,programs,splits", [
    (2, 3, 2),  # GQA: 2 query heads per kv head, rows split unevenly over 3 programs
    (4, 5, 3),  # MHA, 3 splits of the keys per head
    (1, 2, 4),  # MQA
])
def test_one_kernel_per_stage_matches_forward(kv_heads, programs, splits):
    cfg = _config(kv_heads)
    logit_error, cache_error, scale = _compare(cfg, _params(cfg),
                                               {"programs": programs, "splits": splits})
    assert scale > 1.0  # the logits are not all near 0
    assert logit_error < 2e-5 * scale
    assert cache_error < 1e-5


@pytest.mark.parametrize("lookahead,data_waits,kv_heads", [
    (False, (), 2), (True, (), 2),
    (("qkv", "down"), (), 2),  # some stages' tiles early: qkv's crosses into the next layer
    (True, True, 4),  # attention, o-proj and down poll their inputs instead of a barrier (MHA)
    (("qkv",), ("o_proj", "down"), 2),
])
def test_one_launch_matches_forward(lookahead, data_waits, kv_heads):
    """The one-launch form (grid barriers; one program on CPU: interpret runs programs in turn),
    with weight tiles loaded at the barrier before their stage or one stage earlier, and with
    stages waiting on their input data instead of a barrier."""
    cfg = _config(kv_heads)
    options = {"programs": 1, "splits": 3, "lookahead": lookahead, "data_waits": data_waits}
    logit_error, cache_error, scale = _compare(cfg, _params(cfg), options, one_launch=True)
    # Every program arrived at every barrier once: one per stage that does not wait on its
    # data, and the output layer's.
    cache = kv_cache.init_cache(cfg, 1, 32)
    plan = fused_decode.make_plan(cfg, cache, interpret=True, **options)
    state = fused_decode.step_state(cfg, fused_decode.prepare(cfg, _params(cfg)),
                                    jnp.array([3]), cache, plan=plan, one_launch=True)
    barriers = len(fused_decode.STAGES) - len(plan.data_waits)
    assert int(state["counter"][0]) == barriers * cfg.num_layers + 1
    assert logit_error < 2e-5 * scale
    assert cache_error < 1e-5


@pytest.mark.parametrize("one_launch,programs", [(False, 3), (True, 1)])
def test_residual_stages_with_several_blocks_a_program(one_launch, programs):
    """o-proj and down with small tiles, so each program adds several row blocks to x (its
    rows of x then load a block ahead, with the weight tiles)."""
    cfg = _config(2)
    tiles = (("wo", 512), ("down", 512))
    for width in (cfg.num_heads * cfg.head_dim, cfg.mlp_dim):
        rows = fused_decode_kernel._row_block(cfg.embed_dim, width, programs, 512)
        assert -(-cfg.embed_dim // programs) > rows  # more than one block a program
    options = {"programs": programs, "splits": 2, "stage_tiles": tiles}
    logit_error, cache_error, scale = _compare(cfg, _params(cfg), options, one_launch=one_launch)
    assert logit_error < 2e-5 * scale
    assert cache_error < 1e-5


def test_llama3_rope_scaling():
    cfg = _config(2, rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=16))
    logit_error, _, scale = _compare(cfg, _params(cfg), {"programs": 2, "splits": 2})
    assert logit_error < 2e-5 * scale


def test_bf16_rounds_where_the_model_rounds():
    cfg = _config(2, dtype="bfloat16")
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), _params(cfg))
    logit_error, cache_error, scale = _compare(cfg, params, {"programs": 3, "splits": 2})
    # Same rounding points, different summation order: a few bf16 ulps of the logits.
    assert logit_error < 0.03 * scale
    assert cache_error < 0.01


def test_generate_and_stream_with_the_pallas_step_equal_generate():
    cfg = _config(2)
    params = _params(cfg, seed=3)
    prompt = [[5, 17, 42, 99, 3, 250]]
    expected = decode.generate(cfg, params, prompt, max_new_tokens=8, temperature=0.0)
    got = decode.generate(cfg, params, prompt, max_new_tokens=8, temperature=0.0,
                          pallas_step=True)
    assert got == expected
    assert len(got[0]) == 8
    streamed = list(decode.stream(cfg, params, prompt[0], max_new_tokens=8, temperature=0.0,
                                  pallas_step=True))
    assert streamed == expected[0]


def test_speculative_decoding_with_a_pallas_step_draft():
    """speculative_generate with the draft's steps by the fused step (its cache rolled back by
    kv_cache.set_lengths after a rejection): greedy tokens equal the target's, and the draft
    proposes what XLA's step for it proposes (the same acceptance counts), with some drafted
    tokens accepted and some rejected."""
    cfg = _config(2)
    params = _params(cfg, seed=3)
    prompt = [[5, 17, 42, 99, 3, 250]]
    expected = decode.generate(cfg, params, prompt, max_new_tokens=8, temperature=0.0)
    draft = jax.tree.map(lambda w, n: w + 0.05 * n if w.ndim >= 2 else w, params,
                         _params(cfg, seed=4))
    runs = [decode.speculative_generate(cfg, params, cfg, draft, prompt, gamma=3,
                                        max_new_tokens=8, temperature=0.0, pallas_step=step)
            for step in (False, True)]
    assert runs[0][0] == runs[1][0] == expected
    assert runs[0][1] == runs[1][1]
    assert 0 < runs[1][1]["accepted"] < runs[1][1]["drafted"]


@pytest.mark.parametrize("change,call,message", [
    ({}, {"prompts": [[1, 2], [3]]}, "batch 2"),
    ({}, {"quantize_cache": True}, "int8 cache"),
    ({"qk_norm": True}, {}, "qk_norm"),
    ({"num_heads": 6, "num_kv_heads": 2}, {}, "powers of 2"),
    ({"compute_dtype": "float16"}, {}, "compute dtype"),
])
def test_generate_refuses_what_the_step_cannot_run(change, call, message):
    cfg = dataclasses.replace(_config(2), **change)
    params = model.init_params(cfg, jax.random.key(0))
    kwargs = {"prompts": [[1, 2, 3]], **call}
    with pytest.raises(ValueError, match=message):
        decode.generate(cfg, params, kwargs.pop("prompts"), max_new_tokens=2, pallas_step=True,
                        **kwargs)


def test_the_default_picks_the_pallas_step_only_where_it_runs_and_is_faster(monkeypatch):
    small = _config(2)
    assert not decode.use_pallas_step(small, 1)  # on CPU: XLA's step (interpret mode is slow)
    monkeypatch.setattr(decode_steps, "measured_gpu", lambda: True)  # as on an H100 or H200
    assert decode.use_pallas_step(small, 1)
    assert not decode.use_pallas_step(small, 2)  # batch 2
    assert not decode.use_pallas_step(small, 1, quantize_cache=True)  # int8 cache: unsupported
    assert not decode.use_pallas_step(dataclasses.replace(small, qk_norm=True), 1)
    wide = dataclasses.replace(small, embed_dim=decode.PALLAS_STEP_MAX_EMBED * 2)
    assert not decode.use_pallas_step(wide, 1)  # slower than XLA's step there
    assert decode.use_pallas_step(wide, 1, requested=True)  # unless asked for
    assert not decode.use_pallas_step(small, 1, requested=False)
    with pytest.raises(ValueError, match="batch 2"):
        decode.use_pallas_step(small, 2, requested=True)


def test_row_blocks_cover_every_row_once():
    """Each program's rows [lo, hi) in blocks of _row_block rows: a partition of all rows."""
    for rows, width, programs in [(2304, 768, 132), (768, 2048, 132), (50304, 768, 132),
                                  (96, 64, 5), (7, 64, 3)]:
        block = fused_decode_kernel._row_block(rows, width, programs)
        assert block & (block - 1) == 0 and block * width <= max(fused_decode.TILE_ELEMENTS, width)
        seen = np.zeros(rows, int)
        for pid in range(programs):
            lo, hi = pid * rows // programs, (pid + 1) * rows // programs
            for start in range(lo, hi, block):
                seen[start:min(start + block, hi)] += 1
        assert (seen == 1).all()


@pytest.mark.parametrize("one_launch,lookahead", [(False, False), (True, False), (True, True)])
def test_lowers_to_triton_ir(hopper_lowering, one_launch, lookahead):
    """Both forms lower for CUDA (Triton IR; PTX needs a GPU: tools/check_fused_decode.py)."""
    text = _cuda_ir(_config(2, dtype="bfloat16"), one_launch, programs=6, lookahead=lookahead)
    assert "fused_decode" in text


def _cuda_ir(cfg, one_launch, **plan_options) -> str:
    """The step's module lowered for CUDA (shapes only)."""
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, 1, 64))
    weights = jax.eval_shape(lambda p: fused_decode.prepare(cfg, p), params)
    plan = fused_decode.make_plan(cfg, cache, **plan_options)
    step = jax.jit(lambda w, t, c: fused_decode.step_state(cfg, w, t, c, plan=plan,
                                                           one_launch=one_launch))
    return step.trace(weights, jax.ShapeDtypeStruct((1,), jnp.int32), cache).lower(
        lowering_platforms=("cuda",)).as_text()


def test_plan_rejects_unknown_lookahead_stage():
    cfg = _config(1)
    with pytest.raises(ValueError, match="unknown stages.*'mlp'"):
        fused_decode.make_plan(cfg, kv_cache.init_cache(cfg, 1, 32), interpret=True,
                               lookahead=("qkv", "mlp"))
    with pytest.raises(ValueError, match=r"stage_tiles: \['dwn'\] are not tiled weights"):
        fused_decode.make_plan(cfg, kv_cache.init_cache(cfg, 1, 32), interpret=True,
                               stage_tiles=(("dwn", 8192),))


def test_an_input_never_written_ends_in_nan_not_a_hang(monkeypatch):
    """A stage waiting on data that never comes (here: gate/up left out) gives up after
    MAX_POLLS loads and computes with the NaN payload: NaN logits and the polls counted."""
    monkeypatch.setattr(fused_decode_kernel, "MAX_POLLS", 3)
    cfg = _config(2)
    cache = kv_cache.init_cache(cfg, 1, 32)
    plan = fused_decode.make_plan(cfg, cache, interpret=True, programs=1, splits=3,
                                  data_waits=("down",), skip=("gate_up",))
    state = fused_decode.step_state(cfg, fused_decode.prepare(cfg, _params(cfg)),
                                    jnp.array([3]), cache, plan=plan, one_launch=True)
    assert bool(jnp.isnan(state["logits"]).all())
    assert int(state["polls"][0]) >= 3 * cfg.num_layers
    with pytest.raises(ValueError, match=r"\['qkv'\] cannot wait on data"):
        fused_decode.make_plan(cfg, cache, interpret=True, data_waits=("qkv",))
    with pytest.raises(ValueError, match="attention wait hangs with grouped kv heads"):
        fused_decode.make_plan(cfg, cache, interpret=True, data_waits=("attention",))


def test_trace_timeline_adds_up(hopper_lowering):
    """Plan.trace lowers (the timer is inline PTX), needs a GPU, and check_fused_decode.timeline
    splits a step into barrier and stage time that sum to the whole, across the timer's wrap."""
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    import check_fused_decode

    cfg = _config(1, dtype="bfloat16")
    assert "globaltimer_lo" in _cuda_ir(cfg, True, programs=3, trace=True)
    cache = kv_cache.init_cache(cfg, 1, 64)
    plan = fused_decode.make_plan(cfg, cache, programs=3, trace=True)
    with pytest.raises(ValueError, match="needs a GPU"):
        fused_decode.make_plan(cfg, cache, interpret=True, trace=True)

    # A barrier per stage and the head's. Program 1 is done 300 ns after programs 0 and 2, each
    # arrival's atomic takes 200 ns, the first release comes 500 ns after the last program is
    # done and program 1's 40 ns later; then 2 us of stage work each.
    count = fused_decode.barriers(plan)
    assert count == 5 * cfg.num_layers + 1
    trace = np.zeros((3, fused_decode.trace_columns(plan)), np.int64)
    now = 2 ** 32 - 5_000  # the 32-bit timer wraps during the step
    inside = 3 * count + 1  # then 4 stamps a layer inside attention
    for e in range(count):
        trace[:, 3 * e] = [now, now + 300, now]
        trace[:, 3 * e + 1] = [now + 200, now + 500, now + 200]
        trace[:, 3 * e + 2] = released = np.array([now + 800, now + 840, now + 800])
        if e % 5 == 1 and e < count - 1:  # attention of layer e // 5: programs 0 and 1 ran a
            column = inside + 4 * (e // 5)  # unit, program 2 none (its stamps stay 0)
            trace[0, column:column + 4] = released[0] + np.array([100, 1_100, 1_300, 2_000])
            trace[1, column:column + 4] = released[1] + np.array([150, 1_250, 1_450, 2_050])
        now += 800 + 2_000
    trace[:, inside - 1] = [now, now + 300, now]
    trace = (trace % 2 ** 32).astype(np.uint32).view(np.int32)
    result = check_fused_decode.timeline(plan, trace)
    stages = result["stages"]
    assert set(stages) == set(fused_decode.STAGES) | {"head"}
    assert stages["head"]["count"] == 1 and stages["qkv"]["count"] == cfg.num_layers
    for row in stages.values():
        n = row["count"]
        assert row["barrier"] == pytest.approx(0.5 * n)
        # from the first release to the last program done: 2,000 + 300 ns
        assert row["span"] == pytest.approx(2.3 * n)
        assert row["work_max"] == pytest.approx(2.26 * n)  # program 1: 840 -> 3,100
        assert row["work_median"] == pytest.approx(2.0 * n)
        assert row["atomic"] == pytest.approx(0.2 * n)
        assert row["release_spread"] == pytest.approx(0.04 * n)
    assert result["step_us"] == pytest.approx(sum(r["barrier"] + r["span"] for r in stages.values()))
    layers = cfg.num_layers  # inside attention, programs 0 and 1 only
    assert result["attention_parts"] == {
        name: {"median": pytest.approx(median * layers), "max": pytest.approx(top * layers)}
        for name, median, top in (("qkv_rope", 0.125, 0.15), ("blocks", 1.05, 1.1),
                                  ("partials", 0.2, 0.2), ("count_merge", 0.65, 0.7))}
    with pytest.raises(ValueError, match="columns"):
        check_fused_decode.timeline(plan, trace[:, :inside])


def test_ab_bench_runs_two_versions_side_by_side(monkeypatch):
    """tools/bench_fused_decode_ab.py loads a second copy of the step and its kernel module
    beside the package's; each copy plans and runs a step on its own (here: the same code,
    the same logits)."""
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    import bench_fused_decode_ab

    copy = bench_fused_decode_ab.load_version(str(bench_fused_decode_ab.PACKAGE_DIR), "copy")
    assert copy is not fused_decode and copy.Plan is not fused_decode.Plan
    assert copy._kernel is not fused_decode._kernel  # its own kernel module's
    assert sys.modules[bench_fused_decode_ab.KERNEL] is fused_decode_kernel  # put back
    cfg = _config(2)
    params = _params(cfg)
    logits = []
    for module in (fused_decode, copy):
        cache = kv_cache.init_cache(cfg, 1, 32)
        plan = module.make_plan(cfg, cache, interpret=True, programs=2, splits=2)
        logits.append(module.decode_token(cfg, module.prepare(cfg, params), jnp.array([7]),
                                          cache, plan=plan)[0])
    np.testing.assert_array_equal(logits[0], logits[1])
    with pytest.raises(SystemExit, match="neither fused_decode.py nor a directory"):
        bench_fused_decode_ab.load_version("/nonexistent/fused_decode.py", "missing")
    monkeypatch.setattr(sys, "argv", ["bench_fused_decode_ab.py", "--config", "tiny"])
    with pytest.raises(SystemExit, match="same code with the same plan"):
        bench_fused_decode_ab.main()  # nothing to compare: refused before any timing
