"""muP: parameter roles, init scales, forward scalings, per-matrix Adam rates, coordinate check."""

import dataclasses
import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from jaxlm import model, mup, optim
from jaxlm.config import ConfigError, ModelConfig, TrainConfig, load_config

BASE = ModelConfig(vocab_size=257, embed_dim=96, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16,
                   mlp_dim=136, max_seq_len=32, compute_dtype="float32", init_std=0.02)
MUP = dataclasses.replace(BASE, parameterization="mup", mup_base_width=24)  # width multiplier 4


def _load_coord_check():
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "coord_check.py")
    spec = importlib.util.spec_from_file_location("coord_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roles_follow_the_parameter_declarations():
    roles = mup.roles(model.param_specs(MUP))
    assert roles["embed"] == "input" and roles["lm_head"] == "output" and roles["final_norm"] == "vector"
    assert roles["blocks"]["attn_norm"] == "vector"
    assert {roles["blocks"]["attn"][n] for n in ("q", "k", "v", "o")} == {"hidden"}
    assert {roles["blocks"]["mlp"][n] for n in ("gate", "up", "down")} == {"hidden"}


def test_mup_init_divides_hidden_std_by_sqrt_width_multiplier():
    params = model.init_params(MUP, jax.random.key(0))
    standard = model.init_params(BASE, jax.random.key(0))
    std = lambda x: float(np.std(np.asarray(x, np.float64)))  # noqa: E731
    assert std(params["blocks"]["attn"]["q"]) == pytest.approx(0.02 / 2, rel=0.05)
    assert std(params["blocks"]["mlp"]["down"]) == pytest.approx(0.02 / math.sqrt(2 * 2) / 2, rel=0.05)
    assert std(params["embed"]) == pytest.approx(0.02, rel=0.05)
    assert std(params["lm_head"]) == pytest.approx(0.02, rel=0.05)
    np.testing.assert_array_equal(params["embed"], standard["embed"])


def test_mup_forward_equals_standard_forward_with_rescaled_weights():
    """muP's forward = the standard one with q / sqrt(head_dim) and lm_head x multiplier / m."""
    cfg = dataclasses.replace(MUP, mup_output_multiplier=3.0)
    params = model.init_params(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 29), 0, cfg.vocab_size)
    rescaled = jax.tree.map(lambda x: x, params)
    rescaled["blocks"]["attn"]["q"] = params["blocks"]["attn"]["q"] / math.sqrt(16)
    rescaled["lm_head"] = params["lm_head"] * 3.0 / 4
    got, _ = jax.jit(model.forward, static_argnums=0)(cfg, params, tokens)
    want, _ = jax.jit(model.forward, static_argnums=0)(BASE, rescaled, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_mup_adam_scales_hidden_updates_by_one_over_width_multiplier():
    train = TrainConfig(lr=1e-3, warmup_steps=0, weight_decay=0.1, clip_norm=0.0)
    params = model.init_params(MUP, jax.random.key(3))
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(4), x.shape), params)
    standard_tx, mup_tx = optim.make_optimizer(BASE, train), optim.make_optimizer(MUP, train)
    standard, _ = jax.jit(standard_tx.update)(grads, standard_tx.init(params), params)
    scaled, _ = jax.jit(mup_tx.update)(grads, mup_tx.init(params), params)
    np.testing.assert_allclose(scaled["blocks"]["attn"]["q"], standard["blocks"]["attn"]["q"] / 4, rtol=1e-6)
    np.testing.assert_allclose(scaled["blocks"]["mlp"]["down"], standard["blocks"]["mlp"]["down"] / 4, rtol=1e-6)
    for name in ("embed", "lm_head", "final_norm"):
        np.testing.assert_array_equal(scaled[name], standard[name])


def test_bad_mup_configs_are_errors():
    with pytest.raises(ConfigError, match="tie_embeddings"):
        dataclasses.replace(MUP, tie_embeddings=True)
    with pytest.raises(ConfigError, match="mup_base_width=0"):
        dataclasses.replace(MUP, mup_base_width=0)
    with pytest.raises(ConfigError, match="not one of standard, mup"):
        load_config("tiny", ["--model.parameterization=mu"])


def test_coordinate_check_hidden_states_match_forward():
    coord_check = _load_coord_check()
    cfg = coord_check.width_config(64, "mup", 32)
    params = model.init_params(cfg, jax.random.key(5))
    tokens = jax.random.randint(jax.random.key(6), (2, 32), 0, cfg.vocab_size)
    states = jax.jit(coord_check.hidden_states, static_argnums=0)(cfg, params, tokens)
    logits, _ = jax.jit(model.forward, static_argnums=0)(cfg, params, tokens)
    np.testing.assert_allclose(states["logits"], logits, rtol=1e-5, atol=1e-6)
    assert list(states) == ["embedding", "layer 0", "layer 1", "logits"]


def test_coordinate_check_mup_stays_flat_and_standard_grows():
    """After 3 Adam steps at lr 3e-2, widths 16..64: muP activations within a factor 2 of each
    other, standard ones growing with width (measured: 11-16x from width 16 to 64)."""
    coord_check = _load_coord_check()
    widths = (16, 32, 64)
    results = coord_check.coordinate_check(widths, lr=3e-2, steps=4, seq_len=16)
    for name in ("layer 0", "layer 1", "logits"):
        mup_rms = [results["mup"][w][-1][name] for w in widths]
        standard_rms = [results["standard"][w][-1][name] for w in widths]
        assert max(mup_rms) / min(mup_rms) < 2, (name, mup_rms)
        assert standard_rms[0] < standard_rms[1] < standard_rms[2], (name, standard_rms)
        assert standard_rms[-1] / standard_rms[0] > 3, (name, standard_rms)
