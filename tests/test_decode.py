"""Decoding: cached logits == full forward, sharded == single device, sampling semantics,
transformers' greedy generate, speculative decoding's exactness, eos/max length, bad input."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import decode, hf, kv_cache, model, sharding
from jaxlm.config import ModelConfig

CFG = ModelConfig(vocab_size=262, embed_dim=48, num_layers=2, num_heads=6, num_kv_heads=2,
                  head_dim=8, mlp_dim=136, max_seq_len=64, compute_dtype="float32")
# A tiny vocabulary and sharp random weights for distribution tests.
SMALL = dataclasses.replace(CFG, vocab_size=11, embed_dim=24, num_heads=2, num_kv_heads=1,
                            head_dim=12, mlp_dim=40, num_layers=1, init_std=0.5)
PROMPTS = [[5, 9, 1, 33, 7], [100, 2], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
GOLDEN = Path(__file__).parent / "golden"


def _randomize(params, seed=7, scale=0.05):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


def _rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def params():
    return _randomize(model.init_params(CFG, jax.random.key(0)), scale=0.3)


def _full_logits(cfg, params, tokens):
    return np.asarray(jax.jit(model.forward, static_argnums=0)(cfg, params, tokens)[0])


def test_inference_params_cast_once_and_keep_the_logits(params):
    """float32 params with bf16 compute: pre-cast weights give bit-identical logits (same
    unstacked layer loop), and the
    matmul weights are bf16 (what a decoding loop reads each step); norm scales stay float32."""
    cfg = dataclasses.replace(CFG, compute_dtype="bfloat16")
    tokens = jnp.asarray([PROMPTS[2]], jnp.int32)
    cast = model.inference_params(cfg, params)
    np.testing.assert_array_equal(_full_logits(cfg, cast, tokens),
                                  _full_logits(cfg, model.unstack_layers(params), tokens))
    layer = cast["blocks"][0]
    assert isinstance(cast["blocks"], tuple) and len(cast["blocks"]) == CFG.num_layers
    assert {layer["attn"]["q"].dtype, layer["mlp"]["down"].dtype, cast["embed"].dtype} == {
        jnp.dtype(jnp.bfloat16)}
    assert cast["final_norm"].dtype == jnp.float32


def _check_cached_equals_full(cfg, params, quantize=False, tol=1e-5, unstacked=False):
    """Ragged prefill, then 1-token steps and a 3-token chunk at per-sequence positions.

    unstacked: decode with model.unstack_layers(params) (static layer indices, as generate does).
    """
    lengths = np.array([5, 12, 9])
    tokens = jax.random.randint(jax.random.key(1), (3, 20), 0, cfg.vocab_size, jnp.int32)
    full = _full_logits(cfg, params, tokens)
    params = model.unstack_layers(params) if unstacked else params
    rows = np.arange(3)
    cache = kv_cache.init_cache(cfg, 3, 32, quantize=quantize)
    padded = jnp.where(jnp.arange(16)[None] < lengths[:, None], tokens[:, :16], 0)
    last, cache = decode.prefill(cfg, params, padded, cache, jnp.asarray(lengths))
    assert _rel_error(last, full[rows, lengths - 1]) <= tol
    for step in range(2):
        position = lengths + step
        logits, cache = decode.decode_step(cfg, params, tokens[rows, position][:, None], cache)
        assert _rel_error(logits[:, 0], full[rows, position]) <= tol
    position = lengths[:, None] + 2 + np.arange(3)[None]
    logits, cache = decode.decode_step(cfg, params, tokens[rows[:, None], position], cache)
    assert _rel_error(logits, full[rows[:, None], position]) <= tol
    np.testing.assert_array_equal(np.asarray(cache["lengths"]), lengths + 5)


@pytest.mark.parametrize("num_kv_heads", [6, 2, 1])  # MHA, GQA, MQA
def test_cached_prefill_and_decode_equal_full_forward_ragged(num_kv_heads):
    cfg = dataclasses.replace(CFG, num_kv_heads=num_kv_heads)
    params = _randomize(model.init_params(cfg, jax.random.key(2)), scale=0.3)
    _check_cached_equals_full(cfg, params)


def test_pallas_decode_path_and_int8_cache(params):
    pallas_cfg = dataclasses.replace(CFG, attention_impl="pallas", head_dim=16, num_heads=4)
    pallas_params = _randomize(model.init_params(pallas_cfg, jax.random.key(3)), scale=0.3)
    _check_cached_equals_full(pallas_cfg, pallas_params)  # traced layer index: a slice
    # Static layer index (as generate runs): the kernel reads the stacked cache in place.
    _check_cached_equals_full(pallas_cfg, pallas_params, unstacked=True)
    # int8 rounding alone moves these logits by up to 3% (the xla path gives the same errors).
    _check_cached_equals_full(pallas_cfg, pallas_params, quantize=True, tol=4e-2, unstacked=True)
    _check_cached_equals_full(CFG, params, quantize=True, tol=2e-2)
    cache = kv_cache.init_cache(CFG, 2, 32, quantize=True)
    assert cache["k"].dtype == jnp.int8 and cache["k_scale"].shape == (2, 2, 2, 32)


def test_greedy_generate_equals_argmax_of_full_forward(params):
    out = decode.generate(CFG, params, PROMPTS, max_new_tokens=6, temperature=0.0)
    assert [len(t) for t in out] == [6, 6, 6]
    # Teacher forcing: the full forward over prompt + output predicts each output token.
    sequences = np.zeros((3, 19), np.int32)
    for b, (prompt, tokens) in enumerate(zip(PROMPTS, out)):
        sequences[b, :len(prompt) + 6] = prompt + tokens
    logits = _full_logits(CFG, params, jnp.asarray(sequences))
    for b, prompt in enumerate(PROMPTS):
        steps = len(prompt) - 1 + np.arange(6)
        assert np.argmax(logits[b, steps], -1).tolist() == out[b]


def test_sharded_generate_equals_single_device(params):
    expected = decode.generate(CFG, params, PROMPTS, max_new_tokens=5, temperature=0.0)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = jax.device_put(params, model.param_shardings(CFG, mesh))
    assert decode.generate(CFG, sharded, PROMPTS, max_new_tokens=5, temperature=0.0,
                           mesh=mesh) == expected
    cache = decode.init_cache(CFG, 4, 32, mesh)
    assert cache["k"].sharding.spec == jax.sharding.PartitionSpec(
        None, ("data", "fsdp", "expert"), "tensor", None, None)


def test_top_k_1_and_tiny_top_p_are_greedy_and_stream_equals_generate(params):
    greedy = decode.generate(CFG, params, PROMPTS, max_new_tokens=6, temperature=0.0)
    assert decode.generate(CFG, params, PROMPTS, max_new_tokens=6, top_k=1, seed=3) == greedy
    assert decode.generate(CFG, params, PROMPTS, max_new_tokens=6, top_p=1e-6, seed=4) == greedy
    sampled = decode.generate(CFG, params, PROMPTS[:1], max_new_tokens=4, temperature=1.3, seed=5)
    streamed = decode.stream(CFG, params, PROMPTS[0], max_new_tokens=4, temperature=1.3, seed=5)
    assert list(streamed) == sampled[0]


def test_vocab_limit_never_emits_ids_the_tokenizer_lacks(params):
    # The largest logits sit past the limit: unrestricted, greedy picks id 9 and sampling mostly 9/10.
    logits = jnp.array([1.0, 0.2, -0.5, 2.0, 0.0, 1.2, -1.0, 0.7, 0.3, 5.0, 4.0])
    sampling = decode.Sampling(1.0, vocab_limit=9)
    samples = np.asarray(decode.sample(jnp.tile(logits, (20000, 1)), jax.random.key(0), sampling))
    probs = np.concatenate([_expected_probs(logits[:9], 1.0), np.zeros(2)])
    assert _chi_square(samples, probs) < CHI2_CRITICAL
    assert int(decode.sample(logits[None], jax.random.key(0), decode.Sampling(0.0, vocab_limit=9))[0]) == 3
    np.testing.assert_allclose(decode.probabilities(logits, sampling), probs, atol=1e-6)
    # Through generate: the random model emits ids >= 100 unless limited.
    free = decode.generate(CFG, params, PROMPTS, max_new_tokens=12, temperature=1.0, seed=1)
    limited = decode.generate(CFG, params, PROMPTS, max_new_tokens=12, temperature=1.0, seed=1, vocab_limit=100)
    assert max(map(max, free)) >= 100 and max(map(max, limited)) < 100


def test_vocab_limit_of_reads_jaxlm_hf_style_and_bare_tokenizers():
    from jaxlm.align import tasks

    class Sized:  # Hugging Face style: len() counts added tokens, vocab_size does not
        vocab_size = 200

        def __len__(self):
            return 203

    class Bare:  # a wrapper that only encodes and decodes
        pass

    assert decode.vocab_limit_of(CFG, tasks.byte_tokenizer()) == 257
    assert decode.vocab_limit_of(CFG, Sized()) == 203
    assert decode.vocab_limit_of(CFG, Bare()) is None and decode.vocab_limit_of(CFG, None) is None
    assert decode.vocab_limit_of(dataclasses.replace(CFG, vocab_size=257), tasks.byte_tokenizer()) is None


def _expected_probs(logits, temperature, top_k=None, top_p=None):
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z)
    keep = np.zeros(z.shape, bool)
    keep[order[:top_k or len(z)]] = True
    if top_p is not None:
        p = np.exp(z[order] - z.max())
        p /= p.sum()
        before = np.cumsum(p) - p
        keep[order[before >= top_p]] = False
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    return probs / probs.sum()


# chi-square with 10 degrees of freedom (11 tokens): P(X > 29.59) = 0.001.
CHI2_CRITICAL = 29.59


def _chi_square(samples, probs):
    counts = np.bincount(samples, minlength=len(probs))
    expected = probs * len(samples)
    assert np.all(counts[probs == 0] == 0), "sampled a token the filters removed"
    nonzero = probs > 0
    return float(np.sum((counts[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, None), (1.5, 5, None),
                                                     (1.0, None, 0.8)])
def test_sampled_frequencies_follow_softmax(temperature, top_k, top_p):
    logits = jnp.array([1.0, 0.2, -0.5, 2.0, 0.0, 1.2, -1.0, 0.7, 0.3, -0.2, 1.6])
    sampling = decode.Sampling(temperature, top_k, top_p)
    samples = decode.sample(jnp.tile(logits, (20000, 1)), jax.random.key(0), sampling)
    probs = _expected_probs(logits, temperature, top_k, top_p)
    assert _chi_square(np.asarray(samples), probs) < CHI2_CRITICAL
    np.testing.assert_allclose(decode.probabilities(logits, sampling), probs, atol=1e-6)


def test_greedy_generate_equals_transformers():
    fixture = json.loads((GOLDEN / "decode" / "llama_greedy.json").read_text())
    cfg, params = hf.load_pretrained(GOLDEN / "hf" / "llama")
    out = decode.generate(cfg, params, fixture["prompts"], max_new_tokens=fixture["max_new_tokens"],
                          temperature=0.0)
    assert out == fixture["continuations"]


@pytest.mark.parametrize("steps_per_check", [1, 2, 8])
def test_eos_and_max_length(params, steps_per_check, monkeypatch):
    """Also for each loop form: the stop check after every step, every 2 (5 steps: two blocks
    and a rest of one, the eos inside the first) and every 8 (one block of 5)."""
    monkeypatch.setattr(decode, "STEPS_PER_CHECK", steps_per_check)
    monkeypatch.setattr(decode, "BATCHED_STEPS_PER_CHECK", steps_per_check)
    greedy = decode.generate(CFG, params, PROMPTS, max_new_tokens=6, temperature=0.0)
    eos = greedy[0][2]
    out = decode.generate(CFG, params, PROMPTS, max_new_tokens=6, temperature=0.0, eos_id=eos)
    for tokens, full in zip(out, greedy):
        expected = full[:full.index(eos) + 1] if eos in full else full
        assert tokens == expected
    assert out[0][-1] == eos and len(out[0]) <= 3
    assert [len(t) for t in decode.generate(CFG, params, PROMPTS, max_new_tokens=1)] == [1, 1, 1]
    streamed = list(decode.stream(CFG, params, PROMPTS[0], max_new_tokens=6, temperature=0.0,
                                  eos_id=eos))
    assert streamed == out[0]
    # One prompt goes through STEPS_PER_CHECK (a batch through BATCHED_STEPS_PER_CHECK).
    assert decode.generate(CFG, params, PROMPTS[:1], max_new_tokens=6, temperature=0.0,
                           eos_id=eos) == out[:1]
    # Sampled: the same tokens whatever the loop form (each step's key is folded from its index).
    sampled = decode.generate(CFG, params, PROMPTS, max_new_tokens=6, seed=3, eos_id=eos)
    monkeypatch.setattr(decode, "BATCHED_STEPS_PER_CHECK", 1)
    assert sampled == decode.generate(CFG, params, PROMPTS, max_new_tokens=6, seed=3, eos_id=eos)


@pytest.fixture(scope="module")
def small_models():
    target = _randomize(model.init_params(SMALL, jax.random.key(20)), scale=0.3)
    draft_cfg = dataclasses.replace(SMALL, embed_dim=12, head_dim=6, mlp_dim=20)
    draft = _randomize(model.init_params(draft_cfg, jax.random.key(21)), scale=0.3)
    return target, draft_cfg, draft


def test_speculative_greedy_equals_target_greedy(params):
    draft_cfg = dataclasses.replace(CFG, num_layers=1, embed_dim=24, mlp_dim=40)
    draft = model.init_params(draft_cfg, jax.random.key(9))
    expected = decode.generate(CFG, params, PROMPTS, max_new_tokens=6, temperature=0.0)
    out, stats = decode.speculative_generate(CFG, params, draft_cfg, draft, PROMPTS, gamma=3,
                                             max_new_tokens=6, temperature=0.0)
    assert out == expected
    assert 0.0 <= stats["acceptance_rate"] < 1.0 and stats["target_calls"] >= 2
    # The target drafting for itself accepts everything; eos cuts each sequence like generate.
    eos = expected[1][4]
    out, stats = decode.speculative_generate(CFG, params, CFG, params, PROMPTS, gamma=3,
                                             max_new_tokens=6, temperature=0.0, eos_id=eos)
    assert out == [t[:t.index(eos) + 1] if eos in t else t for t in expected]
    assert stats["acceptance_rate"] == 1.0


def test_speculative_sampling_matches_target_distribution(small_models):
    """Tokens 2 and 3 come from draft proposals, rejections and bonus tokens; their marginals
    must still be the target's, computed exactly from all 11^3 continuations."""
    target, draft_cfg, draft = small_models
    prompt, num = [3, 1, 4], 4000
    out, stats = decode.speculative_generate(SMALL, target, draft_cfg, draft, [prompt] * num,
                                             gamma=2, max_new_tokens=3, temperature=1.0, seed=1)
    assert 0.05 < stats["acceptance_rate"] < 0.95
    samples = np.array(out)
    vocab = SMALL.vocab_size
    grid = np.stack(np.meshgrid(*[np.arange(vocab)] * 2, indexing="ij"), -1).reshape(-1, 2)
    sequences = np.concatenate([np.tile(prompt, (len(grid), 1)), grid], axis=1)
    log_probs = jax.nn.log_softmax(_full_logits(SMALL, target, jnp.asarray(sequences)), -1)
    log_probs = np.asarray(log_probs, np.float64)
    first = np.exp(log_probs[0, len(prompt) - 1])  # [V]
    second = np.exp(log_probs[::vocab, len(prompt)])  # [V(t1), V]
    third = np.exp(log_probs[:, len(prompt) + 1]).reshape(vocab, vocab, vocab)
    joint = first[:, None, None] * second[:, :, None] * third
    assert _chi_square(samples[:, 1], joint.sum((0, 2))) < CHI2_CRITICAL
    assert _chi_square(samples[:, 2], joint.sum((0, 1))) < CHI2_CRITICAL


@pytest.mark.parametrize("prompts,kwargs,message", [
    ([[1] * 60], {"max_new_tokens": 5}, "65 > max_seq_len=64"),
    ([[1, 2], []], {"max_new_tokens": 5}, "prompt 1 is empty"),
    ([[1, 262]], {"max_new_tokens": 5}, r"token id 262 outside the vocabulary \[0, 262\)"),
    ([[1, -1]], {"max_new_tokens": 5}, "token id -1 outside"),
    ([[1]], {"max_new_tokens": 5, "temperature": -0.5}, "temperature must be >= 0"),
    ([[1]], {"max_new_tokens": 5, "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ([[1]], {"max_new_tokens": 5, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ([[1]], {"max_new_tokens": 5, "top_k": 0}, "top_k must be in"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ([], {"max_new_tokens": 5}, "non-empty list"),
    ([[1]], {"max_new_tokens": 5, "vocab_limit": 263}, r"vocab_limit must be in \[1, vocab_size=262\]"),
])
def test_bad_requests_raise_clear_errors(params, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        decode.generate(CFG, params, prompts, **kwargs)


def test_weights_with_nan_or_inf_are_refused_by_every_entry_point(params):
    """XLA's step would sample from NaN logits (argmax returns some token, silently): generate,
    stream and speculative_generate (target and draft) name the bad weights instead."""
    bad = jax.tree.map(lambda x: x, params)
    bad["blocks"]["attn"]["q"] = bad["blocks"]["attn"]["q"].at[0, 1, 2].set(jnp.nan)
    bad["embed"] = bad["embed"].at[3, 4].set(-jnp.inf)
    calls = [
        lambda: decode.generate(CFG, bad, [[1, 2]], max_new_tokens=2, pallas_step=False),
        lambda: list(decode.stream(CFG, bad, [1, 2], max_new_tokens=2, pallas_step=False)),
        lambda: decode.speculative_generate(CFG, bad, CFG, params, [[1, 2]], max_new_tokens=2),
        lambda: decode.speculative_generate(CFG, params, CFG, bad, [[1, 2]], max_new_tokens=2),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="a diverged or damaged checkpoint") as error:
            call()
        assert "'q'" in str(error.value) and "'embed'" in str(error.value)
    assert decode.generate(CFG, params, [[1, 2]], max_new_tokens=2, pallas_step=False)


def test_non_finite_logits_are_an_error_not_tokens(params):
    """Finite weights whose logits overflow (an output layer near float32's largest value):
    stream stops at the first such token and generate raises after its loop, each naming the
    token, instead of returning tokens sampled from NaN."""
    huge = jax.tree.map(lambda x: x, params)
    huge["lm_head"] = jnp.full_like(params["lm_head"], 3e38)
    with pytest.raises(ValueError, match="logits held NaN or inf at new token 0"):
        list(decode.stream(CFG, huge, [1, 2], max_new_tokens=3))
    for kwargs in ({}, {"eos_id": 5}, {"return_log_probs": True, "temperature": 0.0}):
        with pytest.raises(ValueError, match="logits held NaN or inf at new token 0"):
            decode.generate(CFG, huge, [[1, 2], [3]], max_new_tokens=3, pallas_step=False,
                            **kwargs)


def _inject_nan_logits(monkeypatch, mask):
    """model.forward, with NaN logits wherever mask(cfg, tokens) (broadcast to tokens' [B, T])
    is true. Callers use a config of their own: a cached trace would skip the fault."""
    forward = model.forward

    def faulty(cfg, p, tokens, **kwargs):
        logits, cache = forward(cfg, p, tokens, **kwargs)
        return jnp.where(mask(cfg, tokens)[..., None], jnp.nan, logits), cache

    monkeypatch.setattr(model, "forward", faulty)


def test_generate_names_the_first_decode_step_whose_logits_overflow(params, monkeypatch):
    """Finite logits at first, non-finite ones from a later step on: the error names that
    step, not 0, and a sequence already done (past eos) is not checked. The fault is injected
    into the model's decode steps: logits all NaN where the token fed in is the greedy
    output's second token (so from new token 2 on), under a config of this test's own (its
    jit cache entry is not shared)."""
    prompt = [1, 2]
    got = decode.generate(CFG, params, [prompt], max_new_tokens=4, temperature=0.0,
                          pallas_step=False)[0]
    assert got[1] not in prompt + got[:1]  # (so only decode step 2 is fed it)
    # (decode steps only, not the prefill)
    _inject_nan_logits(monkeypatch, lambda c, tokens: (tokens == got[1]) & (tokens.shape[1] == 1))
    cfg = dataclasses.replace(CFG, max_seq_len=CFG.max_seq_len + 1)
    with pytest.raises(ValueError, match="at new token 2 "):
        decode.generate(cfg, params, [prompt], max_new_tokens=4, temperature=0.0,
                        pallas_step=False)
    # A batch: the error comes from the sequence that overflows, whatever the others do.
    with pytest.raises(ValueError, match="at new token 2 "):
        decode.generate(cfg, params, [prompt, [7, 8, 9]], max_new_tokens=4, temperature=0.0,
                        pallas_step=False)
    # Done before the overflow: eos is the first new token, so nothing after it is checked.
    assert decode.generate(cfg, params, [prompt], max_new_tokens=4, temperature=0.0,
                           eos_id=got[0], pallas_step=False) == [[got[0]]]


def test_the_mesh_padding_rows_are_done_from_the_start(params, monkeypatch):
    """3 prompts on a batch of 4 shards: the fourth row is padding. NaN logits in that row
    alone (a fault injected into the decode steps) raise nothing, and the real rows' tokens
    are the single-device ones; the same NaN in a real row raises."""
    cfg = dataclasses.replace(CFG, max_seq_len=CFG.max_seq_len + 2)  # (its own jit entries)
    expected = decode.generate(cfg, params, PROMPTS, max_new_tokens=4, temperature=0.0)
    row = {"bad": 3}
    _inject_nan_logits(monkeypatch, lambda c, tokens: (  # (decode steps)
        (jnp.arange(tokens.shape[0])[:, None] == row["bad"]) & (tokens.shape[1] == 1)))
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = jax.device_put(params, model.param_shardings(cfg, mesh))
    assert decode.generate(cfg, sharded, PROMPTS, max_new_tokens=4, temperature=0.0,
                           mesh=mesh) == expected
    row["bad"] = 1  # (a real row; a new trace: the where is baked in at tracing)
    with pytest.raises(ValueError, match="at new token 1 "):
        decode.generate(cfg, sharded, PROMPTS, max_new_tokens=5, temperature=0.0, mesh=mesh)


def test_speculative_padding_rows_and_overflow(params, monkeypatch):
    """speculative_generate on a mesh whose batch is padded (3 prompts, 4 shards): the padding
    row is done from the start, so the greedy tokens and the acceptance counts equal the
    single device's (padding rows used to count). And NaN in a real row's verification
    logits is a ValueError naming the first new token it spoils (1: the first verified)."""
    cfg = dataclasses.replace(CFG, max_seq_len=CFG.max_seq_len + 3)  # (its own jit entries)
    draft_cfg = dataclasses.replace(cfg, num_layers=1, embed_dim=24, mlp_dim=40)
    draft = model.init_params(draft_cfg, jax.random.key(9))
    kwargs = dict(gamma=3, max_new_tokens=6, temperature=0.0)
    single = decode.speculative_generate(cfg, params, draft_cfg, draft, PROMPTS, **kwargs)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = jax.device_put(params, model.param_shardings(cfg, mesh))
    draft_sharded = jax.device_put(draft, model.param_shardings(draft_cfg, mesh))
    assert decode.speculative_generate(cfg, sharded, draft_cfg, draft_sharded, PROMPTS,
                                       mesh=mesh, **kwargs) == single
    _inject_nan_logits(monkeypatch, lambda c, tokens: (  # the target's verification (gamma + 1)
        (jnp.arange(tokens.shape[0])[:, None] == 2) & (c is cfg and tokens.shape[1] == 4)))
    with pytest.raises(ValueError, match="at new token 1 "):
        decode.speculative_generate(cfg, params, draft_cfg, draft, PROMPTS, gamma=3,
                                    max_new_tokens=7, temperature=0.0)
