"""Accounting against the real thing: init_params, XLA's cost and memory analyses, the CLI.

XLA's HloCostAnalysis counts a while loop's body once, so the FLOP comparisons compile models
with num_layers=1 (the preset's widths kept) and discount the loss scan's unseen chunks; see
accounting.xla_flops_per_token.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import pytest

from jaxlm import accounting, kv_cache, loss, model, sharding
from jaxlm.config import MeshConfig, load_config

# (preset, num_layers, batch, seq): short shapes so that each compiles in seconds on CPU.
COMPILED_SHAPES = {"tiny": ("tiny", 1, 2, 128), "125m": ("125m", 1, 1, 256),
                   "125m_full_remat": ("125m", 1, 1, 256), "125m_loss_chunk": ("125m", 1, 2, 256)}


def _loss(cfg, params, tokens):
    if cfg.loss_chunk:  # the chunked output layer + cross-entropy of the train step
        batch = {"inputs": tokens, "targets": tokens, "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
        return loss.mean_loss(cfg, params, batch)
    logits, _ = model.forward(cfg, params, tokens)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[..., None], axis=-1))


def _is_param_spec(x):
    return isinstance(x, model.ParamSpec)


def _first(analysis):
    return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


@pytest.fixture(scope="module", params=sorted(COMPILED_SHAPES))
def compiled(request):
    preset, num_layers, batch, seq = COMPILED_SHAPES[request.param]
    remat = "full" if request.param.endswith("full_remat") else "none"
    chunk = 64 if request.param.endswith("loss_chunk") else 0
    cfg = dataclasses.replace(load_config(preset).model, num_layers=num_layers, remat=remat,
                              loss_chunk=chunk)
    params = jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda p, t: _loss(cfg, p, t)))
    return request.param, cfg, batch, seq, step.lower(params, tokens).compile()


def test_param_count_matches_init_tiny():
    cfg = load_config("tiny").model
    params = model.init_params(cfg, jax.random.key(1))
    real = sum(leaf.size for leaf in jax.tree.leaves(params))
    assert accounting.count_params(cfg) == real
    assert sum(accounting.count_params_by_component(cfg).values()) == real


@pytest.mark.parametrize("preset", ["125m", "1b"])
def test_param_count_matches_eval_shape(preset):
    cfg = load_config(preset).model
    counts = accounting.count_params_by_component(cfg)
    total = accounting.count_params(cfg)
    assert sum(counts.values()) == total == accounting.count_params_from_init(cfg)
    assert accounting.count_params(cfg, include_embedding=False) == total - counts["embedding"]
    assert (counts["lm_head"] == 0) == cfg.tie_embeddings


def test_flops_match_xla_cost_analysis(compiled):
    name, cfg, batch, seq, executable = compiled
    xla = _first(executable.cost_analysis())["flops"] / (batch * seq)
    estimate = accounting.xla_flops_per_token(cfg, seq, cfg.remat)
    matmuls_only = accounting.hardware_flops_per_token(cfg, seq, cfg.remat)
    if cfg.loss_chunk:
        # XLA counts the loss scan's body, one chunk, once: of the output layer's three matmuls
        # (logits, their gradient to the hidden states and to the weight: 6 D V per token) it
        # sees 1 / chunks.
        unseen = 6 * cfg.embed_dim * cfg.vocab_size * (1 - cfg.loss_chunk / seq)
        estimate, matmuls_only = estimate - unseen, matmuls_only - unseen
    print(f"\n{name}: XLA {xla:.4g} FLOPs/token, estimate {estimate:.4g} ({estimate / xla - 1:+.2%}), "
          f"matmuls only {matmuls_only:.4g} ({matmuls_only / xla - 1:+.2%})")
    assert estimate == pytest.approx(xla, rel=0.05)
    if name != "tiny":  # at real widths elementwise work is noise: matmuls alone match
        assert matmuls_only == pytest.approx(xla, rel=0.05)


def test_memory_matches_xla_memory_analysis(compiled):
    name, cfg, batch, seq, executable = compiled
    analysis = _first(executable.memory_analysis())
    memory = accounting.training_memory_per_device(cfg, MeshConfig(), batch, seq)
    # Arguments are params + tokens and outputs grads + the loss, plus XLA's output tuple of
    # 8-byte pointers (one per output leaf): exact.
    num_leaves = len(jax.tree.leaves(model.param_specs(cfg), is_leaf=_is_param_spec))
    output_tuple = 8 * (num_leaves + 1)
    assert analysis.argument_size_in_bytes == memory["params"] + memory["batch"]
    assert analysis.output_size_in_bytes == memory["grads"] + 4 + output_tuple
    xla_total = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    estimate = memory["params"] + memory["batch"] + memory["grads"] + 4 + output_tuple + memory["activations"]
    temp, activations = analysis.temp_size_in_bytes, memory["activations"]
    print(f"\n{name}: XLA temp {temp / 2**20:.2f} MiB, activation estimate "
          f"{activations / 2**20:.2f} MiB ({activations / temp - 1:+.1%}); "
          f"total {xla_total / 2**20:.2f} vs {estimate / 2**20:.2f} MiB ({estimate / xla_total - 1:+.1%})")
    # 25%: XLA's buffer assignment reuses and fuses temporaries in ways a per-array list cannot
    # follow exactly; arguments and outputs, exact above, keep the total honest.
    assert estimate == pytest.approx(xla_total, rel=0.25)


def test_remat_save_grows_xla_temporaries_as_estimated():
    """The activations named in remat_save are really kept: XLA's temporaries grow by about
    what accounting adds for them (2 RMSNorm outputs and the SwiGLU hidden; roped q and k take
    the place of the q and k projections, so they add nothing)."""
    base = dataclasses.replace(load_config("125m").model, num_layers=2, remat="save_dots")
    tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    temps, estimates = [], []
    for save in ("", "mlp_hidden", "norm,rope,mlp_hidden"):
        cfg = dataclasses.replace(base, remat_save=save)
        params = jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.key(0))
        step = jax.jit(jax.value_and_grad(lambda p, t: _loss(cfg, p, t)))
        temps.append(_first(step.lower(params, tokens).compile().memory_analysis()).temp_size_in_bytes)
        estimates.append(accounting.activation_bytes_per_device(cfg, MeshConfig(), 2, 256)["layers"])
    for i in (1, 2):
        grown, estimated = temps[i] - temps[0], estimates[i] - estimates[0]
        print(f"\nremat_save step {i}: XLA temp +{grown / 2**20:.2f} MiB, estimate +{estimated / 2**20:.2f} MiB")
        # Buffer reuse lets XLA hold a little less than the sum of the arrays.
        assert 0.8 * estimated <= grown <= 1.05 * estimated


def test_training_flops_conventions():
    cfg = load_config("125m").model
    seq = 2048
    attention_full = 12 * cfg.num_layers * seq * cfg.num_heads * cfg.resolved_head_dim
    assert accounting.attention_flops_per_token(cfg, seq, causal=False) == attention_full
    assert accounting.attention_flops_per_token(cfg, seq) == attention_full / 2
    total = accounting.training_flops_per_token(cfg, seq)
    assert total == 6 * accounting.matmul_params(cfg) + attention_full / 2
    forward = accounting.forward_flops_per_token(cfg, seq)
    assert accounting.backward_flops_per_token(cfg, seq) == pytest.approx(2 * forward)
    # The embedding gather is free; the untied lm head is a V x D matmul.
    non_embedding = accounting.count_params(cfg, include_embedding=False)
    norms = accounting.count_params_by_component(cfg)["norms"]
    assert accounting.matmul_params(cfg) == non_embedding - norms


def test_mfu_helper():
    peak = accounting.PEAK_BF16_FLOPS["h100"]
    assert peak == accounting.PEAK_BF16_FLOPS["h200"] == 989e12
    assert accounting.mfu(1e5, 6e9, 8, peak) == pytest.approx(1e5 * 6e9 / (8 * 989e12))


def test_param_bytes_per_device_match_real_shardings():
    cfg = load_config("1b").model
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    shardings = jax.tree.leaves(model.param_shardings(cfg, mesh))
    specs = jax.tree.leaves(model.param_specs(cfg), is_leaf=_is_param_spec)
    real = sum(math.prod(s.shard_shape(spec.shape)) * 4 for s, spec in zip(shardings, specs))
    assert accounting.param_bytes_per_device(cfg, MeshConfig(fsdp=4, tensor=2)) == real


def test_kv_cache_bytes_match_init_cache():
    cfg = load_config("tiny").model
    cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, 3, 40))
    real = sum(cache[name].size * cache[name].dtype.itemsize for name in ("k", "v"))
    assert accounting.kv_cache_bytes(cfg, 3, 40) == real
    assert accounting.kv_cache_bytes(cfg, 4, 40, MeshConfig(data=2, tensor=2)) == real * 4 / 3 / 4


def test_remat_policies_order_activation_memory():
    cfg = load_config("125m").model
    parts = {p: accounting.activation_bytes_per_device(cfg, MeshConfig(), 8, 2048, p)["layers"]
             for p in accounting.REMAT_POLICIES}
    assert parts["full"] < parts["save_dots"] < parts["none"]
    assert parts["full"] == cfg.num_layers * 8 * 2048 * cfg.embed_dim * 2  # bf16 layer inputs


def test_cli_prints_report_and_json(capsys):
    assert accounting.main(["--config", "tiny", "--seq", "64", "--batch", "8", "--mesh", "fsdp=8",
                            "--model.num_layers=3", "--remat", "full", "--device", "a100"]) == 0
    text = capsys.readouterr().out
    assert "agrees" in text and "remat=full" in text and "A100" in text
    accounting.main(["--config", "tiny", "--json", "--dtype", "bfloat16"])
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["param_dtype"] == "bfloat16"
    assert report["memory_per_device"]["training"]["master_params"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--config", "nope"], "unknown preset 'nope'"),
    (["--config", "tiny", "--mesh", "fsdp=4", "--num-devices", "8"], "needs 4 devices but 8"),
    (["--config", "1b", "--mesh", "fsdp=3", "--batch", "3"], "not divisible"),
    (["--config", "tiny", "--model.num_layerz=3"], "unknown config key"),
])
def test_cli_bad_input_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        accounting.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_moe_total_and_active_parameters_by_hand():
    """moe_tiny: 2 MoE layers of 8 experts (gate, up, down of 48 x 40), top 2, one shared expert."""
    cfg = load_config("moe_tiny").model
    per_expert = 3 * 48 * 40
    routed = 2 * 8 * per_expert
    shapes = jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.key(0))
    total = accounting.count_params(cfg)
    assert total == model.count_params(shapes)
    counts = accounting.count_params_by_component(cfg)
    assert counts["experts"] == routed and counts["shared_experts"] == 2 * per_expert
    assert sum(counts.values()) == total
    active = accounting.count_active_params(cfg)
    assert active == total - routed + 2 * 2 * per_expert
    # N of 6N: the active weights minus what no matmul uses (embedding gather, norms, router bias).
    router_bias = 2 * 8
    assert accounting.matmul_params(cfg) == active - 512 * 48 - counts["norms"] - router_bias
    dense = load_config("tiny").model
    assert accounting.count_active_params(dense) == accounting.count_params(dense)
