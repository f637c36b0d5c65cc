"""pallas_kernels/chain_step.py (the decode step as one stage_chain call) in Mosaic GPU's
interpreter against model.forward's cached decode step: logits over several steps (the cache
the chain extends itself), for GQA and MHA, with Llama 3's RoPE scaling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import decode_steps, kv_cache, model
from jaxlm.config import ModelConfig, RopeScaling
from pallas_kernels import chain_step

PROMPT, STEPS = 7, 2


def _config(kv_heads=2, **extra):
    return ModelConfig(vocab_size=640, embed_dim=256, num_layers=2, num_heads=4,
                       num_kv_heads=kv_heads, head_dim=64, mlp_dim=256, max_seq_len=256,
                       compute_dtype="float32", **extra)


def _params(cfg, seed=0):
    # Weights x4: peaked attention and logits far apart, so a wrong key or row shows.
    params = model.init_params(cfg, jax.random.key(seed))
    return jax.tree.map(lambda w: w * 4 if w.ndim >= 2 else w, params)


def _interpreter():
    plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    if not hasattr(plgpu, "force_gpu_interpret_mode"):
        pytest.skip("this JAX has no Mosaic GPU interpreter")
    return plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=False))


@pytest.mark.parametrize("kv_heads,extra", [
    (2, {}),  # GQA, 2 query heads a kv head
    (4, {"rope_scaling": RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_seq_len=64)}),  # MHA, Llama 3 RoPE
    (1, {"tie_embeddings": True}),  # MQA (4 query heads a kv head), the head is the embedding
])
def test_chain_step_matches_forward_over_steps(kv_heads, extra):
    cfg = _config(kv_heads, **extra)
    params = _params(cfg)
    assert chain_step.unsupported(cfg, 1, 256, num_ctas=2) is None
    tokens = jax.random.randint(jax.random.key(1), (1, PROMPT + STEPS), 0, cfg.vocab_size)
    cache = kv_cache.init_cache(cfg, 1, 256)
    _, cache = model.forward(cfg, params, tokens[:, :PROMPT], cache=cache)
    step = chain_step.prepare(cfg, params, 256, interpret=True)
    state = chain_step.init_state(step, cache)
    for i in range(STEPS):
        token = tokens[0, PROMPT + i:PROMPT + i + 1]
        own = {name: c[:, None] for name, c in zip(("k", "v"), state["cache"])}  # the chain's
        like_kernel = chain_step.reference_logits(cfg, params, int(token[0]), own, PROMPT + i,
                                                  256)
        with _interpreter():
            logits, state = chain_step.decode_token(step, token, state, PROMPT + i)
        want, cache = model.forward(cfg, params, token[None], cache=cache)
        want = want[:, 0]
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 1.0  # the logits are not all near 0
        assert bool(jnp.all(jnp.isfinite(logits)))
        # Against the reference that rounds to bf16 where the kernel does: summation order.
        assert float(jnp.max(jnp.abs(logits[0] - like_kernel))) < 1e-3 * scale
        # Against the float32 model: bf16 weights, x rounded to bf16 before each product and
        # attention's operands in bf16 cost up to about 5% here (MQA's peaked attention).
        assert float(jnp.max(jnp.abs(logits - want))) < 0.08 * scale
        assert int(jnp.argmax(logits)) == int(jnp.argmax(want))
        for name, written in zip(("k", "v"), state["cache"]):  # the new position's k and v
            ref = cache[name][:, 0, :, PROMPT + i].astype(jnp.float32)
            got = written[:, :, PROMPT + i].astype(jnp.float32)
            assert float(jnp.max(jnp.abs(got - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_chain_step_refuses_what_it_cannot_run():
    cfg = _config()
    assert "batch 2" in chain_step.unsupported(cfg, 2, 256, num_ctas=2)
    assert "int8" in chain_step.unsupported(cfg, 1, 256, quantize_cache=True, num_ctas=2)
    assert "head_dim 32" in chain_step.unsupported(
        dataclasses.replace(cfg, head_dim=32), 1, 256, num_ctas=2)
    assert "qk_norm" in chain_step.unsupported(dataclasses.replace(cfg, qk_norm=True), 1, 256,
                                               num_ctas=2)
    assert "query heads a kv head" in chain_step.unsupported(
        dataclasses.replace(cfg, num_heads=12, num_kv_heads=4), 1, 256, num_ctas=2)
    np.testing.assert_equal(chain_step.unsupported(cfg, 1, 256, num_ctas=2), None)


def test_generate_and_stream_with_the_chain_step_equal_generate():
    """decode.generate / stream with pallas_step="chain": prefill by model.forward, then the
    chain's steps (its interpreter on CPU) inside the generation loop; greedy tokens equal
    XLA's step's."""
    from jaxlm import decode

    cfg = _config()
    params = _params(cfg)
    prompt = [int(t) for t in jax.random.randint(jax.random.key(4), (6,), 0, cfg.vocab_size)]
    want = decode.generate(cfg, params, [prompt], max_new_tokens=3, temperature=0.0,
                           pallas_step=False)
    got = decode.generate(cfg, params, [prompt], max_new_tokens=3, temperature=0.0,
                          pallas_step="chain")
    assert got == want and len(want[0]) == 3
    assert list(decode.stream(cfg, params, prompt, max_new_tokens=3, temperature=0.0,
                              pallas_step="chain")) == want[0]
    # With eos: the steps run in a loop of known length inside the stop check's while loop
    # (decode.STEPS_PER_CHECK), the chain's state carried through both.
    eos = want[0][1]
    assert decode.generate(cfg, params, [prompt], max_new_tokens=3, temperature=0.0,
                           eos_id=eos, pallas_step="chain") == [
        want[0][:want[0].index(eos) + 1]]
    with pytest.raises(ValueError, match="batch 2"):
        decode.generate(cfg, params, [prompt, prompt], max_new_tokens=2, pallas_step="chain")


def test_speculative_decoding_with_a_chain_step_draft():
    """speculative_generate with the draft's steps by the chain (its state rolled back by
    position alone after a rejection): greedy tokens equal the target's, and the draft proposes
    what XLA's step for the draft proposes (the same acceptance counts), for the target itself
    as the draft (every token accepted) and a perturbed copy (some rejected)."""
    from jaxlm import decode

    cfg = _config()
    params = _params(cfg)
    prompt = [int(t) for t in jax.random.randint(jax.random.key(4), (6,), 0, cfg.vocab_size)]
    want = decode.generate(cfg, params, [prompt], max_new_tokens=6, temperature=0.0,
                           pallas_step=False)
    # (A perturbation this small, 3%, leaves near-ties where the chain's bf16 rounding and
    # XLA's float32 propose differently; at 10% they agree.)
    perturbed = jax.tree.map(lambda w, n: w + 0.1 * n if w.ndim >= 2 else w, params,
                             _params(cfg, seed=1))
    accepted = []
    for draft in (params, perturbed):
        runs = [decode.speculative_generate(cfg, params, cfg, draft, [prompt], gamma=2,
                                            max_new_tokens=6, temperature=0.0, pallas_step=step)
                for step in (False, "chain")]
        assert runs[0][0] == runs[1][0] == want
        assert runs[0][1] == runs[1][1]
        accepted.append(runs[1][1]["accepted"] / runs[1][1]["drafted"])
    assert accepted[0] == 1.0 and 0 < accepted[1] < 1


def test_the_chain_step_names_the_host_devices_its_interpreter_needs(monkeypatch):
    """With too few emulated host devices the CPU interpreter's polling threads were seen to
    wait forever: refused with the flag to set instead (the tests run with 8)."""
    from jaxlm import decode

    cfg = _config()
    monkeypatch.setattr(decode_steps, "INTERPRETER_MIN_DEVICES", jax.device_count() + 1)
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        decode.generate(cfg, _params(cfg), [[1, 2]], max_new_tokens=2, pallas_step="chain")


def test_the_chain_step_refuses_weights_with_nan_or_inf():
    """A NaN would keep the chain's stages waiting for each other forever (NaN is their
    "not written yet"): generate and stream name the weights instead of running."""
    from jaxlm import decode

    cfg = _config()
    params = _params(cfg)
    params["blocks"]["mlp"]["down"] = params["blocks"]["mlp"]["down"].at[1, 3, 5].set(jnp.nan)
    params["final_norm"] = params["final_norm"].at[0].set(jnp.inf)
    for run in (lambda: decode.generate(cfg, params, [[1, 2]], max_new_tokens=2,
                                        pallas_step="chain"),
                lambda: list(decode.stream(cfg, params, [1, 2], max_new_tokens=2,
                                           pallas_step="chain"))):
        with pytest.raises(ValueError, match=r"NaN or inf in .*'down'.*'final_norm'"):
            run()


def test_the_default_takes_the_chain_step_for_bf16_models_it_runs(monkeypatch):
    """pallas_step=None: on a Hopper GPU at batch 1, the chain step where it runs and the
    model computes in bf16; the fused step where only it runs; XLA's elsewhere."""
    from jaxlm import decode

    bf16 = dataclasses.replace(_config(), compute_dtype="bfloat16", param_dtype="bfloat16")
    assert decode.use_pallas_step(bf16, 1) is False  # on CPU: XLA's step
    monkeypatch.setattr(decode_steps, "measured_gpu", lambda: True)  # as on an H100 or H200
    assert decode.use_pallas_step(bf16, 1) == "chain"
    assert decode.use_pallas_step(_config(), 1) is True  # float32 compute: the fused step
    assert decode.use_pallas_step(dataclasses.replace(bf16, head_dim=32), 1) is True
    assert decode.use_pallas_step(bf16, 2) is False  # batch 2: neither runs it
    assert decode.use_pallas_step(bf16, 1, quantize_cache=True) is False  # int8: neither
    assert decode.use_pallas_step(bf16, 1, requested=True) is True  # an explicit choice stands
    assert decode.use_pallas_step(bf16, 1, requested=False) is False


def test_decode_cli_refuses_two_step_choices(capsys):
    from jaxlm import decode_cli

    with pytest.raises(SystemExit) as error:
        decode_cli.main(["--run-dir", "nowhere", "--prompt", "x", "--chain-step",
                         "--no-pallas-step"])
    assert error.value.code == 2
    assert "give one" in capsys.readouterr().err
