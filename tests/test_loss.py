"""The chunked output layer + cross-entropy (loss.chunked_loss_sums) against float64 numpy and
against autodiff of the plain full-logits loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import loss

B, T, D, V = 3, 11, 13, 37  # T is not a multiple of the chunks below


def make_inputs(seed, vocab_major):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((B, T, D)).astype(np.float32)
    weight = rng.standard_normal((V, D) if vocab_major else (D, V)).astype(np.float32) / np.sqrt(D)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.8).astype(np.float32) * rng.uniform(0.5, 1.5, size=(B, T)).astype(np.float32)
    return hidden, weight, targets, mask


def numpy_sums(hidden, weight, targets, mask, vocab_major, scale, z):
    w = weight.astype(np.float64)
    logits = hidden.astype(np.float64) @ (w.T if vocab_major else w) * scale
    top = logits.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    ce_sum, z_sum = np.sum(ce * mask), z * np.sum(lse ** 2 * mask)
    return ce_sum + z_sum, ce_sum, z_sum


def dense_objective(hidden, weight, targets, mask, vocab_major, scale, z):
    logits = jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", hidden, weight) * scale
    token_loss, lse = loss.cross_entropy(logits, targets)
    return jnp.sum(token_loss * mask) + z * jnp.sum(lse ** 2 * mask)


@pytest.mark.parametrize("vocab_major,chunk,scale,z", [(True, 4, 1.0, 0.0), (False, 5, 0.7, 1e-2),
                                                      (True, 16, 1.3, 1e-3)])
def test_chunked_loss_equals_float64_and_dense_gradients(vocab_major, chunk, scale, z):
    hidden, weight, targets, mask = make_inputs(chunk, vocab_major)
    kwargs = dict(vocab_major=vocab_major, chunk=chunk, scale=scale, z_loss_weight=z)
    sums = jax.jit(lambda *a: loss.chunked_loss_sums(*a, **kwargs))(hidden, weight, targets, mask)
    np.testing.assert_allclose(np.array(sums), numpy_sums(hidden, weight, targets, mask, vocab_major, scale, z),
                               rtol=1e-5)

    def chunked(h, w, m):
        return loss.chunked_loss_sums(h, w, targets, m, **kwargs)[0]

    grads = jax.jit(jax.grad(chunked, argnums=(0, 1, 2)))(hidden, weight, mask)
    expected = jax.grad(dense_objective, argnums=(0, 1, 3))(hidden, weight, targets, mask, vocab_major, scale, z)
    for got, want in zip(grads, expected):
        assert float(jnp.max(jnp.abs(want))) > 0
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_chunked_loss_metrics_carry_no_gradient():
    hidden, weight, targets, mask = make_inputs(1, False)
    grad = jax.grad(lambda h: loss.chunked_loss_sums(h, weight, targets, mask, vocab_major=False,
                                                     chunk=4, z_loss_weight=0.1)[1])(hidden)
    assert not np.any(np.asarray(grad))


def test_bad_loss_kernel_is_an_error():
    hidden, weight, targets, mask = make_inputs(2, True)
    with pytest.raises(ValueError, match="'xla' or 'triton'"):
        loss.chunked_loss_sums(hidden, weight, targets, mask, vocab_major=True, chunk=4, kernel="cuda")


def test_triton_kernel_off_gpu_is_an_error():
    hidden, weight, targets, mask = make_inputs(3, True)
    with pytest.raises(ValueError, match="loss_kernel=xla"):
        loss.chunked_loss_sums(hidden, weight, targets, mask, vocab_major=True, chunk=4, kernel="triton")
