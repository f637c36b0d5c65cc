"""The optimizer against a float64 numpy AdamW with warmup + cosine, clipping and decay mask."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config, model, optim

MODEL = dataclasses.replace(config.load_preset("tiny").model, vocab_size=257, num_layers=1)
TRAIN = config.TrainConfig(steps=100, lr=3e-2, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.3,
                           clip_norm=0.5, beta1=0.8, beta2=0.9, eps=1e-6)


def reference_lr(train, step):
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = min((step - train.warmup_steps) / (train.steps - train.warmup_steps), 1.0)
    floor = train.lr * train.min_lr_ratio
    return floor + (train.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def reference_adamw(params, grads_per_step, mask, train):
    """Plain numpy, float64: clip the global norm, Adam moments with bias correction, decoupled decay."""
    params = [p.astype(np.float64) for p in params]
    mu = [np.zeros_like(p) for p in params]
    nu = [np.zeros_like(p) for p in params]
    for step, grads in enumerate(grads_per_step):
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
        scale = min(1.0, train.clip_norm / norm)
        lr = reference_lr(train, step)
        for i, g in enumerate(grads):
            g = g.astype(np.float64) * scale
            mu[i] = train.beta1 * mu[i] + (1 - train.beta1) * g
            nu[i] = train.beta2 * nu[i] + (1 - train.beta2) * g * g
            mu_hat = mu[i] / (1 - train.beta1 ** (step + 1))
            nu_hat = nu[i] / (1 - train.beta2 ** (step + 1))
            update = mu_hat / (np.sqrt(nu_hat) + train.eps) + (train.weight_decay * params[i] if mask[i] else 0)
            params[i] = params[i] - lr * update
    return params


def test_schedule_warmup_cosine_floor():
    lrs = [float(optim.learning_rate(TRAIN, s)) for s in range(120)]
    np.testing.assert_allclose(lrs, [reference_lr(TRAIN, s) for s in range(120)], rtol=1e-6)
    assert math.isclose(lrs[0], TRAIN.lr / 10, rel_tol=1e-6) and math.isclose(lrs[9], TRAIN.lr, rel_tol=1e-6)
    np.testing.assert_allclose(lrs[100:], TRAIN.lr * TRAIN.min_lr_ratio, rtol=1e-6)


def test_decay_mask_excludes_norms_and_biases():
    cfg = dataclasses.replace(MODEL, qkv_bias=True, qk_norm=True, tie_embeddings=True)
    mask = optim.decay_mask(cfg)
    assert mask["embed"] and mask["blocks"]["attn"]["q"] and mask["blocks"]["mlp"]["down"]
    assert not mask["final_norm"] and not mask["blocks"]["attn_norm"] and not mask["blocks"]["attn"]["q_bias"]
    assert not mask["blocks"]["attn"]["k_norm"]


def test_adamw_matches_numpy_reference_over_100_steps():
    params = model.init_params(MODEL, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    # Gradient scales vary per step so that clipping is active on some steps and not on others.
    grads_per_step = [[rng.normal(size=p.shape).astype(np.float32) * (0.3 if step % 3 else 1e-4)
                       for p in leaves] for step in range(TRAIN.steps)]
    tx = optim.make_optimizer(MODEL, TRAIN)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state

    opt_state = tx.init(params)
    for grads in grads_per_step:
        params, opt_state = update(params, opt_state, jax.tree.unflatten(treedef, grads))
    mask = jax.tree.leaves(optim.decay_mask(MODEL))
    expected = reference_adamw([np.asarray(p) for p in leaves], grads_per_step, mask, TRAIN)
    clipped = sum(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads)) > TRAIN.clip_norm
                  for grads in grads_per_step)
    assert 0 < clipped < TRAIN.steps
    for got, want in zip(jax.tree.leaves(params), expected):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-5)
