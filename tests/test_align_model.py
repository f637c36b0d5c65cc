"""Post-training on a tiny model: batch layout, log-probs, SFT masking and packing, the on-policy
invariant, sharded == single-device GRPO steps, microbatch invariance, DPO, and the CLIs."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import checkpoint, decode, loss, model, sharding, train
from jaxlm.align import common, dpo, grpo, grpo_train, sft, tasks
from jaxlm.config import Config, ModelConfig, TrainConfig

MODEL = ModelConfig(vocab_size=257, embed_dim=48, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
                    mlp_dim=136, max_seq_len=64, compute_dtype="float32")
TOKENIZER = tasks.byte_tokenizer()


@pytest.fixture(scope="module")
def params():
    return model.init_params(MODEL, jax.random.key(7))


def single_mesh():
    return sharding.make_mesh("", devices=jax.devices()[:1])


def log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_tokenize_prompt_and_output_layout():
    out = common.tokenize_prompt_and_output(["ab", "c"], ["xyz", "de"], TOKENIZER)
    np.testing.assert_array_equal(out["input_ids"], [[97, 98, 120, 121], [99, 100, 101, 0]])
    np.testing.assert_array_equal(out["labels"], [[98, 120, 121, 122], [100, 101, 0, 0]])
    np.testing.assert_array_equal(out["response_mask"], [[0, 1, 1, 1], [1, 1, 0, 0]])


def test_response_log_probs_match_float64_log_softmax(params):
    batch = common.tokenize_prompt_and_output(["12+3=", "7*8="], ["15", "56!"], TOKENIZER)
    out = common.response_log_probs(MODEL, params, batch["input_ids"], batch["labels"], with_entropy=True)
    logits, _ = model.forward(MODEL, params, jnp.asarray(batch["input_ids"]))
    expected = np.take_along_axis(log_softmax64(logits), batch["labels"][..., None], -1)[..., 0]
    np.testing.assert_allclose(out["log_probs"], expected, atol=1e-5)
    probs = np.exp(log_softmax64(logits))
    np.testing.assert_allclose(out["entropy"], -(probs * np.log(probs)).sum(-1), atol=1e-4)


def test_sft_loss_counts_response_tokens_only_and_packing_isolates_examples(params):
    examples = [("12+30=", "42"), ("5-9=", "-4"), ("3*7=", "21"), ("99+1=", "100"), ("8-8=", "0")]
    pairs = [(TOKENIZER.encode(p), TOKENIZER.encode(r) + [256]) for p, r in examples]
    packed = sft.pack_examples(pairs, seq_len=23)
    assert packed["truncated"] == 0 and len(packed["inputs"]) == 2  # 9+7+7 tokens, then 9+6
    assert packed["loss_mask"].sum() == sum(len(r) for _, r in pairs)
    batch = {k: v for k, v in packed.items() if k != "truncated"}
    # Independent oracle: each example alone, -log p of its response tokens, float64.
    total = count = 0.0
    for prompt, response in pairs:
        ids = np.array(prompt + response)
        logits, _ = model.forward(MODEL, params, jnp.asarray(ids[None, :-1]))
        log_probs = log_softmax64(logits)[0]
        for t in range(len(prompt) - 1, len(ids) - 1):
            total -= log_probs[t, ids[t + 1]]
            count += 1
    expected = total / count
    assert float(loss.mean_loss(MODEL, params, {k: jnp.asarray(v) for k, v in batch.items()})) == pytest.approx(
        expected, rel=1e-5)
    # The SFT update reports the same loss (computed before it changes the params).
    cfg = Config(model=MODEL, train=TrainConfig(steps=2, batch_size=2, seq_len=23, lr=1e-3, warmup_steps=0))
    mesh = single_mesh()
    state = common.state_from_params(cfg, mesh, params)
    _, metrics = common.run_update(train.make_train_step(cfg, mesh), state, batch, mesh, 1)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)


def test_rollout_log_probs_equal_recomputed_log_probs(params):
    prompts = [TOKENIZER.encode(p) for p in ("12+30=", "5-9=", "100*3=")]
    tokens, log_probs = decode.generate(MODEL, params, prompts, max_new_tokens=7, temperature=1.0, seed=3,
                                        return_log_probs=True)
    assert [len(t) for t in tokens] == [7, 7, 7] and [len(lp) for lp in log_probs] == [7, 7, 7]
    batch = common.pack_prompt_and_response_ids(prompts, tokens)
    recomputed = np.asarray(common.response_log_probs(MODEL, params, batch["input_ids"], batch["labels"])["log_probs"])
    for i, prompt in enumerate(prompts):
        start = len(prompt) - 1
        np.testing.assert_allclose(recomputed[i, start:start + 7], log_probs[i], atol=2e-5)


def test_rollouts_never_sample_ids_the_tokenizer_lacks():
    # A model vocab padded past the byte tokenizer's 257 ids: a random model puts most of its mass
    # on ids >= 257, which the tokenizer could not decode.
    padded = dataclasses.replace(MODEL, vocab_size=400)
    params = model.init_params(padded, jax.random.key(1))
    rollouts = grpo_train.rollout.sample_responses(padded, params, TOKENIZER, ["12+30="] * 8, max_new_tokens=8,
                                                   temperature=1.0, seed=2)
    ids = [i for r in rollouts for i in r.response_ids]
    assert len(ids) > 8 and max(ids) < TOKENIZER.vocab_size


def synthetic_rollout_batch(params, rows=16, seed=0):
    """A GRPO batch of random prompts/responses with rewards, advantages, old and reference log-probs."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, 256, size=rng.integers(3, 7))) for _ in range(rows)]
    responses = [list(rng.integers(1, 256, size=rng.integers(1, 9))) for _ in range(rows)]
    rollouts = [grpo_train.rollout.Rollout(tuple(p), tuple(r), (), "") for p, r in zip(prompts, responses)]
    raw = rng.integers(0, 2, size=rows).astype(np.float32)
    advantages = rng.normal(size=rows).astype(np.float32)
    config = grpo_train.GrpoConfig(prompts_per_step=rows // 4, group_size=4, max_new_tokens=8)
    batch = grpo_train.rollout_batch(rollouts, advantages, raw, config)
    current = np.asarray(common.response_log_probs_jit(MODEL, params, batch["inputs"], batch["targets"]))
    # Old log-probs off by up to +-0.4 so that some ratios leave [0.8, 1.2] and get clipped.
    batch["old_log_probs"] = ((current + rng.uniform(-0.4, 0.4, current.shape)) * batch["loss_mask"]).astype(np.float32)
    batch["ref_log_probs"] = ((current + rng.uniform(-0.2, 0.2, current.shape)) * batch["loss_mask"]).astype(np.float32)
    return batch


GRPO_LOSS = grpo.GrpoLoss("grpo_clip", cliprange=0.2, kl_coef=0.05)


def grpo_update(params, batch, mesh, grad_accum):
    cfg = Config(model=MODEL, train=TrainConfig(steps=4, batch_size=16, seq_len=8, grad_accum=grad_accum,
                                                lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0))
    cfg = common.policy_config(MODEL, mesh, cfg.train)
    state = common.state_from_params(cfg, mesh, params)
    state, metrics = common.run_update(train.make_train_step(cfg, mesh, GRPO_LOSS), state, batch, mesh, grad_accum)
    return jax.device_get(state["params"]), metrics


def assert_same_update(new_params, reference_params):
    # NOTE: Adam's first step is about lr * sign(g); where g is ~0 float noise moves it by up to
    # ~1e-5, while a wrong gradient would show up as ~lr = 1e-2.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), new_params, reference_params)


@pytest.fixture(scope="module")
def grpo_reference(params):
    batch = synthetic_rollout_batch(params)
    return batch, grpo_update(params, batch, single_mesh(), 1)


def test_grpo_step_loss_matches_independent_computation(params, grpo_reference):
    batch, (_, metrics) = grpo_reference
    log_probs = np.asarray(common.response_log_probs_jit(MODEL, params, batch["inputs"], batch["targets"]))
    mask = batch["loss_mask"]
    ratio = np.exp(log_probs - batch["old_log_probs"])
    adv = batch["advantages"]
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    delta = batch["ref_log_probs"] - log_probs
    kl = np.exp(delta) - delta - 1
    lengths = mask.sum(1)
    expected = np.mean(((per_token + 0.05 * kl) * mask).sum(1) / lengths)  # per sequence, then batch
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
    clipped = (np.clip(ratio, 0.8, 1.2) * adv < ratio * adv) & (mask > 0)
    assert 0 < clipped.sum() < mask.sum()
    assert float(metrics["sums"]["clipped"]) == clipped.sum()


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=4"])
def test_sharded_grpo_step_equals_single_device(params, grpo_reference, spec):
    batch, (reference_params, reference_metrics) = grpo_reference
    new_params, metrics = grpo_update(params, batch, sharding.make_mesh(spec), 1)
    assert float(metrics["loss"]) == pytest.approx(float(reference_metrics["loss"]), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(reference_metrics["grad_norm"]), rel=1e-4)
    assert_same_update(new_params, reference_params)


def test_grpo_step_does_not_depend_on_the_number_of_microbatches(params, grpo_reference):
    batch, (reference_params, reference_metrics) = grpo_reference
    new_params, metrics = grpo_update(params, batch, single_mesh(), 4)
    assert float(metrics["loss"]) == pytest.approx(float(reference_metrics["loss"]), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(reference_metrics["grad_norm"]), rel=1e-4)
    assert_same_update(new_params, reference_params)


def test_grpo_update_on_true_answers_equals_the_sft_update(params):
    # The GRPO path (rollout_batch layout, response mask, token weights, GrpoLoss) fed the true
    # answers with reward 1, no_baseline and token aggregation is SFT: -mean log p of the response
    # tokens. One optimizer step must equal SFT's on the same examples (packed its own way), so a
    # misaligned mask, a prompt token counted, padding or a wrong normalization would show here.
    examples = [("12+30=", "42"), ("5-9=", "-4"), ("3*7=", "21"), ("99+1=", "100")]
    pairs = [(TOKENIZER.encode(q), TOKENIZER.encode(a) + [256]) for q, a in examples]
    rollouts = [grpo_train.rollout.Rollout(tuple(q), tuple(a), (), "") for q, a in pairs]
    config = grpo_train.GrpoConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, loss_type="no_baseline",
                                   aggregation="token")
    grpo_batch = grpo_train.rollout_batch(rollouts, np.zeros(4, np.float32), np.ones(4, np.float32), config)
    sft_batch = {k: v for k, v in sft.pack_examples(pairs, seq_len=31).items() if k != "truncated"}
    mesh = single_mesh()
    train_cfg = TrainConfig(steps=2, batch_size=4, seq_len=8, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0,
                            weight_decay=0.0)
    cfg = common.policy_config(MODEL, mesh, train_cfg)
    grpo_state, grpo_metrics = common.run_update(train.make_train_step(cfg, mesh, grpo.GrpoLoss("no_baseline")),
                                                 common.state_from_params(cfg, mesh, params), grpo_batch, mesh, 1)
    sft_cfg = common.policy_config(MODEL, mesh, dataclasses.replace(train_cfg, batch_size=1, seq_len=31))
    sft_state, sft_metrics = common.run_update(train.make_train_step(sft_cfg, mesh),
                                               common.state_from_params(sft_cfg, mesh, params), sft_batch, mesh, 1)
    assert float(grpo_metrics["loss"]) == pytest.approx(float(sft_metrics["loss"]), rel=1e-5)
    assert float(grpo_metrics["grad_norm"]) == pytest.approx(float(sft_metrics["grad_norm"]), rel=1e-4)
    assert_same_update(jax.device_get(grpo_state["params"]), jax.device_get(sft_state["params"]))


def test_dpo_starts_at_log2_and_learns_the_preference(params):
    pairs = [(TOKENIZER.encode(f"{a}+{b}="), TOKENIZER.encode(str(a + b)) + [256],
              TOKENIZER.encode(str(a + b + 1)) + [256]) for a, b in [(3, 4), (10, 5), (21, 9), (7, 7)]]
    cfg = Config(model=MODEL, train=TrainConfig(steps=6, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=0,
                                                min_lr_ratio=1.0, weight_decay=0.0))
    mesh = single_mesh()
    _, records = dpo.run_dpo(common.policy_config(MODEL, mesh, cfg.train), mesh, params, pairs, beta=0.5,
                             progress=False)
    assert records[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert records[-1]["loss"] < records[0]["loss"] and records[-1]["reward_accuracy"] == 1.0


def test_cli_sft_then_grpo_then_eval(tmp_path, capsys):
    from jaxlm.align import evaluate

    sft_dir, grpo_dir = str(tmp_path / "sft"), str(tmp_path / "grpo")
    tiny = ["--model.num_layers=1", "--model.embed_dim=24", "--model.num_heads=2", "--model.num_kv_heads=1",
            "--model.mlp_dim=40"]
    assert sft.main(["--task", "arithmetic", "--num-examples", "200", "--run-dir", sft_dir, "--no-progress",
                     "--train.steps=2", "--train.batch_size=8", "--train.seq_len=31", *tiny,
                     "--model.compute_dtype=bfloat16"]) == 0
    # The start computes in bf16; GRPO computes it in float32 (--compute_dtype) and saves that.
    assert grpo_train.main(["--init", sft_dir, "--run-dir", grpo_dir, "--no-progress", "--steps=2",
                            "--prompts_per_step=2", "--group_size=4", "--eval_examples=8", "--eval_every=1",
                            "--epochs_per_rollout=2", "--reward=arithmetic_digits", "--compute_dtype=float32"]) == 0
    assert checkpoint.load_run(sft_dir)[0].compute_dtype == "bfloat16"
    assert checkpoint.load_run(grpo_dir)[0].compute_dtype == "float32"
    records = [json.loads(line) for line in open(os.path.join(grpo_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in ("reward", "format_reward", "answer_reward", "accuracy", "entropy", "clip_fraction",
                "response_length", "rollout_seconds", "update_seconds", "eval_accuracy", "eval_fixed",
                "eval_broken", "eval_p_value"):
        assert key in records[1], key
    # The trainer's recomputed log-probs equal the sampler's (the on-policy invariant, in the loop).
    assert records[1]["rollout_log_prob_gap"] < 1e-4
    capsys.readouterr()
    assert evaluate.main(["arithmetic", "--run-dir", grpo_dir, "--limit", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 8 and 0.0 <= report["accuracy"] <= 1.0
    assert evaluate.main(["arithmetic", "--run-dir", grpo_dir, "--limit", "8", "--pass-at", "4"]) == 0
    sampled = json.loads(capsys.readouterr().out)["sampled"]
    assert sampled["samples_per_problem"] == 4 and list(sampled["pass_at"]) == ["1", "2", "4"]
    assert sampled["pass_at"]["1"] == pytest.approx(sampled["sampled_accuracy"])  # pass@1 = mean
    assert sampled["pass_at"]["1"] <= sampled["pass_at"]["2"] <= sampled["pass_at"]["4"]
    assert evaluate.main(["arithmetic", "--run-dir", grpo_dir, "--pass-at", "4", "--temperature", "0"]) == 2
    assert evaluate.main(["gsm8k", "--run-dir", grpo_dir]) == 2  # --data missing: a clear error


def test_carried_second_moment_scales_the_first_update_by_the_old_gradient_history(params):
    # The source run's Adam: nu = 0.5 on every weight, 1000 steps taken. After carrying, the first
    # update must be Adam's with m = 0, that nu and that count (float64 formula below), not the
    # lr * sign(g) of a fresh Adam.
    pairs = [(TOKENIZER.encode(p), TOKENIZER.encode(r) + [256]) for p, r in (("12+30=", "42"), ("5-9=", "-4"))]
    batch = {k: v for k, v in sft.pack_examples(pairs, seq_len=23).items() if k != "truncated"}
    lr, count, nu0 = 1e-2, 1000, 0.5
    cfg = Config(model=MODEL, train=TrainConfig(steps=2, batch_size=1, seq_len=23, lr=lr, warmup_steps=0,
                                                min_lr_ratio=1.0, weight_decay=0.0, clip_norm=0.0))
    mesh = single_mesh()
    cfg = common.policy_config(MODEL, mesh, cfg.train)
    source = common.state_from_params(cfg, mesh, params)["opt_state"]
    is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)  # noqa: E731
    source = jax.tree.map(lambda node: node._replace(nu=jax.tree.map(lambda x: x + nu0, node.nu),
                                                     count=node.count + count) if is_adam(node) else node,
                          source, is_leaf=is_adam)
    state = common.carry_second_moment(common.state_from_params(cfg, mesh, params), source)
    new_state, _ = common.run_update(train.make_train_step(cfg, mesh), state, batch, mesh, 1)
    grads = jax.grad(lambda p: loss.mean_loss(MODEL, p, {k: jnp.asarray(v) for k, v in batch.items()}))(params)
    b1, b2, eps, t = cfg.train.beta1, cfg.train.beta2, cfg.train.eps, count + 1

    def expected(p, g):
        g = np.asarray(g, np.float64)
        m_hat = (1 - b1) * g / (1 - b1 ** t)
        v_hat = (b2 * nu0 + (1 - b2) * g * g) / (1 - b2 ** t)
        return np.asarray(p, np.float64) - lr * m_hat / (np.sqrt(v_hat) + eps)

    jax.tree.map(lambda new, p, g: np.testing.assert_allclose(new, expected(p, g), atol=1e-7),
                 jax.device_get(new_state["params"]), params, grads)
    with pytest.raises(ValueError, match="carry_adam"):
        common.carry_second_moment(state, source[1])
