"""Mixture-of-Experts: dispatch == a per-token loop, capacity drops, expert parallel == one device,
balancing loss by hand, decoding through MoE layers, and a tiny MoE run with balanced load."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import hf, kv_cache, loss, model, moe, sharding
from jaxlm.config import ConfigError, ModelConfig

# Prime-ish sizes; 8 experts split over an expert axis of 2 or 4; expert mlp 40 over tensor=2.
CFG = ModelConfig(vocab_size=262, embed_dim=48, num_layers=3, num_heads=6, num_kv_heads=2,
                  head_dim=8, mlp_dim=136, max_seq_len=64, compute_dtype="float32",
                  num_experts=8, top_k=2, expert_mlp_dim=40, first_dense_layers=1)
SEQ = 29


def _tokens(seed, batch=8, length=SEQ):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size, dtype=jnp.int32)


def _layer_params(cfg, seed=0):
    """One MoE layer's params (float32) with a random router bias."""
    params = model.init_params(cfg, jax.random.key(seed))
    p = jax.tree.map(lambda w: w[0], params["moe_blocks"]["moe"])
    p["router"] = p["router"] * 20.0  # spread the router so top-k choices are far from ties
    p["router_bias"] = 0.1 * jax.random.normal(jax.random.key(seed + 1), p["router_bias"].shape)
    return p


def _x(seed, shape=(3, 11, CFG.embed_dim)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("router,renormalize,shared", [("softmax", True, 0), ("softmax", False, 1),
                                                       ("sigmoid", True, 2)])
def test_dropless_equals_loop_over_top_k_experts(router, renormalize, shared):
    cfg = dataclasses.replace(CFG, router=router, router_renormalize=renormalize,
                              num_shared_experts=shared, routed_scaling=2.5 if router == "sigmoid" else 1.0)
    p, x = _layer_params(cfg), _x(1)
    y, aux = jax.jit(moe.moe_mlp, static_argnums=0)(cfg, p, x)
    np.testing.assert_allclose(y, moe.reference_moe_mlp(cfg, p, x), rtol=1e-5, atol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(float(jnp.sum(aux["expert_load"])), 1.0, rtol=1e-6)


def test_dropless_gradients_equal_the_loop_reference():
    """The gather-only backward passes (custom_vjp) give autodiff's gradients of the plain loop,
    for the tokens, the expert weights and the router."""
    cfg = dataclasses.replace(CFG, num_shared_experts=1)
    p, x = _layer_params(cfg), _x(4, (1, 9, CFG.embed_dim))  # 18 assignments over 8 experts
    probe = jax.random.normal(jax.random.key(9), x.shape)  # fresh random cotangent

    def loss(fn, p, x):
        out = fn(cfg, p, x)
        return jnp.sum((out[0] if isinstance(out, tuple) else out) * probe)

    got = jax.jit(jax.grad(lambda p, x: loss(moe.moe_mlp, p, x), argnums=(0, 1)))(p, x)
    want = jax.grad(lambda p, x: loss(moe.reference_moe_mlp, p, x), argnums=(0, 1))(p, x)
    for name in ("gate", "up", "down", "router", "shared_gate"):
        np.testing.assert_allclose(got[0][name], want[0][name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)


def test_capacity_drops_exactly_the_assignments_past_capacity():
    cfg = dataclasses.replace(CFG, moe_dispatch="capacity", capacity_factor=0.5)
    p, x = _layer_params(cfg), _x(2)
    y, aux = jax.jit(moe.moe_mlp, static_argnums=0)(cfg, p, x)
    flat = np.asarray(x.reshape(-1, cfg.embed_dim))
    ids, weights, _, _ = moe.route(cfg, p["router"], p["router_bias"], jnp.asarray(flat))
    ids, weights = np.asarray(ids), np.asarray(weights)
    capacity = moe.capacity(cfg, flat.shape[0])
    # The documented order: rank 0 of every token (tokens in [B, T] order), then rank 1, ...
    used = np.zeros(cfg.num_experts, int)
    kept = np.zeros(ids.shape, bool)
    for rank in range(cfg.top_k):
        for token in range(flat.shape[0]):
            expert = ids[token, rank]
            kept[token, rank] = used[expert] < capacity
            used[expert] += 1
    assert 0 < (~kept).sum() < kept.size  # the test drops some, not all
    expected = np.zeros_like(flat)
    for token, rank in zip(*np.nonzero(kept)):
        e = ids[token, rank]
        h = jax.nn.silu(flat[token] @ p["gate"][e]) * (flat[token] @ p["up"][e])
        expected[token] += weights[token, rank] * np.asarray(h @ p["down"][e])
    np.testing.assert_allclose(np.asarray(y).reshape(flat.shape), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(aux["dropped_fraction"]), (~kept).mean(), rtol=1e-6)


def test_capacity_with_room_for_all_equals_dropless():
    p, x = _layer_params(CFG), _x(3)
    cfg = dataclasses.replace(CFG, moe_dispatch="capacity", capacity_factor=CFG.num_experts / CFG.top_k)
    y_dropless, _ = moe.moe_mlp(CFG, p, x)
    y_capacity, aux = moe.moe_mlp(cfg, p, x)
    np.testing.assert_allclose(y_capacity, y_dropless, rtol=1e-5, atol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0


def test_balance_loss_and_metrics_by_hand():
    """2 experts, top-1, 4 tokens: probs chosen so the counts and means are easy by hand."""
    cfg = dataclasses.replace(CFG, num_experts=2, top_k=1)
    ids = jnp.array([[0], [0], [0], [1]])
    probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    logits = jnp.log(probs)
    valid, kept = jnp.ones(4, bool), jnp.ones((4, 1), bool)
    aux = moe.losses_and_metrics(cfg, moe.router_stats(cfg, ids, probs, logits, valid, kept))
    # f = (3/4, 1/4); P = (2.4/4, 1.6/4) = (0.6, 0.4); loss = 2 * (0.75*0.6 + 0.25*0.4) = 1.1
    np.testing.assert_allclose(float(aux["balance_loss"]), 1.1, rtol=1e-6)
    np.testing.assert_allclose(aux["expert_load"], [0.75, 0.25], rtol=1e-6)
    entropy = -np.mean(np.sum(np.asarray(probs) * np.log(np.asarray(probs)), axis=1))
    np.testing.assert_allclose(float(aux["router_entropy"]), entropy, rtol=1e-6)
    np.testing.assert_allclose(float(aux["router_z_loss"]), 0.0, atol=1e-6)  # logsumexp(log p) = 0


@pytest.fixture(scope="module")
def params():
    p = model.init_params(CFG, jax.random.key(0))
    p["moe_blocks"]["moe"]["router"] = p["moe_blocks"]["moe"]["router"] * 20.0
    return p


def _loss_and_grads(cfg, params, tokens):
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
             "loss_mask": jnp.ones(tokens.shape, jnp.float32)}

    def objective(p):
        terms = loss.loss_terms(cfg, p, batch)
        return (terms["ce_sum"] + terms["z_sum"]) / terms["count"]

    return jax.jit(jax.value_and_grad(objective))(params)


@pytest.mark.parametrize("mesh_spec,dispatch,kernel,batch", [
    ("expert=4,fsdp=2", "dropless", "auto", 4),
    ("data=2,tensor=2,expert=2", "capacity", "auto", 8),
    ("data=2,fsdp=2,tensor=2", "dropless", "pallas_interpret", 4)])
def test_expert_parallel_equals_single_device(params, mesh_spec, dispatch, kernel, batch):
    """Batch 8 splits over (data, fsdp, expert); batch 4 does not divide expert=4,fsdp=2 and is
    replicated, each expert shard routing one chunk. The last case runs the Pallas grouped
    matmul (interpreted) in the shard_map, as a GPU does."""
    cfg = dataclasses.replace(CFG, moe_balance_loss=0.01, moe_z_loss=0.001, moe_dispatch=dispatch,
                              capacity_factor=4.0)
    tokens = _tokens(batch)
    expected_loss, expected_grads = _loss_and_grads(cfg, params, tokens)
    mesh = sharding.make_mesh(mesh_spec)
    moe.set_grouped_matmul(kernel)
    try:
        with jax.set_mesh(mesh):
            sharded = jax.device_put(params, model.param_shardings(cfg, mesh))
            got_loss, got_grads = _loss_and_grads(cfg, sharded, tokens)
    finally:
        moe.set_grouped_matmul("auto")
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_layer_layout_and_config_errors():
    cfg = dataclasses.replace(CFG, num_layers=7, first_dense_layers=1, moe_every=3)
    assert moe.layer_indices(cfg) == ([0, 1, 2, 4, 5], [3, 6])
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    assert shapes["blocks"]["mlp"]["gate"].shape == (5, 48, 136)
    assert shapes["moe_blocks"]["moe"]["gate"].shape == (2, 8, 48, 40)
    with pytest.raises(ConfigError, match="multiple of model.moe_every"):
        dataclasses.replace(CFG, num_layers=4, first_dense_layers=1, moe_every=2)
    with pytest.raises(ConfigError, match="top_k"):
        dataclasses.replace(CFG, top_k=9)


def test_interleaved_layers_equal_layer_by_layer_loop():
    """moe_every=2: the grouped scans run the layers in global order."""
    cfg = dataclasses.replace(CFG, num_layers=5, first_dense_layers=1, moe_every=2)
    params = model.init_params(cfg, jax.random.key(3))
    tokens = _tokens(6, batch=2)
    logits = jax.jit(model.forward, static_argnums=0)(cfg, params, tokens)[0]
    ctx = {"positions": jnp.broadcast_to(jnp.arange(SEQ), tokens.shape), "segment_ids": None,
           "plain_causal": True, "inverse_frequencies": model.rope_inverse_frequencies(
               cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)}
    dense_ids, moe_ids = moe.layer_indices(cfg)

    @jax.jit
    def loop(params):
        x = params["embed"][tokens]
        for layer in range(cfg.num_layers):
            if layer in moe_ids:
                p = jax.tree.map(lambda w: w[moe_ids.index(layer)], params["moe_blocks"])
                x = model._moe_block(cfg, ctx, x, (p, None))[0]
            else:
                p = jax.tree.map(lambda w: w[dense_ids.index(layer)], params["blocks"])
                x = model._block(cfg, ctx, x, (p, None))[0]
        return model.rms_norm(x, params["final_norm"], cfg.norm_eps) @ params["lm_head"]

    np.testing.assert_allclose(logits, loop(params), rtol=1e-5, atol=1e-5)


def test_cached_decoding_through_moe_layers(params):
    tokens = _tokens(5, batch=2)
    full = jax.jit(model.forward, static_argnums=0)(CFG, params, tokens)[0]
    cache = kv_cache.init_cache(CFG, batch_size=2, max_len=40, dtype=jnp.float32)
    step = jax.jit(model.forward, static_argnums=0)
    logits, cache = step(CFG, params, tokens[:, :20], cache=cache)
    np.testing.assert_allclose(logits, full[:, :20], rtol=1e-5, atol=1e-5)
    for t in range(20, 23):
        logits, cache = step(CFG, params, tokens[:, t:t + 1], cache=cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_router_bias_update_moves_toward_balance():
    bias = jnp.zeros((2, 4))
    load = jnp.array([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    new = moe.update_router_bias(bias, load, 0.01)
    np.testing.assert_allclose(new, [[-0.01, -0.01, 0.01, 0.01], [0, 0, 0, 0]])


# ---------------------------------------------------------------------------------------------
# Hugging Face: fixtures from tools/make_moe_fixtures.py


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_hf_logits_match_transformers_and_round_trip(name, tmp_path):
    folder = Path(__file__).parent / "golden" / "hf" / name
    cfg, params = hf.load_pretrained(folder)
    assert cfg.num_experts == 4 and cfg.top_k == 2
    expected = dict(np.load(folder / "reference.npz"))
    logits, _ = jax.jit(model.forward, static_argnums=0)(cfg, params, expected["input_ids"])
    assert float(np.abs(np.asarray(logits) - expected["logits"]).max()) < 1e-4
    hf.save_pretrained(cfg, params, tmp_path / "saved")
    reloaded_cfg, reloaded = hf.load_pretrained(tmp_path / "saved")
    assert reloaded_cfg == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reloaded)):
        np.testing.assert_array_equal(a, b)


def test_tiny_moe_trains_on_the_default_corpus_with_balanced_load(tmp_path):
    """The training CLI on moe_tiny with bias balancing: falling loss, max/mean expert load <= 1.5.

    The load is the mean over the last 20 of 250 steps of each MoE layer's max/mean token count
    per expert (one step's count over 512 tokens is noisy). About 50 s on 2 CPU cores.
    """
    command = [sys.executable, "-m", "jaxlm.train", "--config", "moe_tiny", "--steps", "250",
               "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
               "--train.batch_size=8", "--train.seq_len=64", "--train.default_corpus_bytes=300000",
               "--model.moe_bias_update_rate=0.01", "--train.eval_every=250",
               "--train.checkpoint_every=250", "--no-progress"]
    # One CPU device (not the suite's 8 emulated ones): the same run, 15 s faster on 2 cores.
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(records) == 250
    first, last = records[0]["loss"], np.mean([r["loss"] for r in records[-10:]])
    assert last < first - 2.0, (first, last)
    for layer in range(2):
        load = np.mean([r["expert_load_max_over_mean"][layer] for r in records[-20:]])
        assert load <= 1.5, (layer, load)
    assert all(max(r["dropped_fraction"]) == 0.0 for r in records)  # dropless dispatch
