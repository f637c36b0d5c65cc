"""Next-token cross-entropy in float32, as token sums so microbatches add up exactly.

A batch is a dict of [B, T] arrays:
    inputs       int32 token ids fed to the model
    targets      int32 next-token ids (inputs shifted by one)
    loss_mask    float32, 1 where the target counts (0 across a document boundary or on padding)
    positions    int32, optional: positions restarting at 0 per document
    segment_ids  int32, optional: document ids of packed sequences (0 = padding)

`loss_terms` returns *sums* over tokens; the mean is taken once, over the whole optimizer batch,
so gradient accumulation over microbatches equals one big batch (not a mean of means).
Logits are upcast to float32 before the log-softmax whatever the compute dtype.

Chunked loss (`model.loss_chunk` > 0). The [B, T, V] logits of a big vocabulary dominate the
activation memory of a training step (1b preset, batch 16 x 2048, vocab 128256: 8.4 GB in bf16,
twice that in float32, plus their gradient). `chunked_loss_sums` runs the output layer and the
cross-entropy over `loss_chunk` sequence positions at a time and computes the gradients with
respect to the hidden states and the output weight in the same pass (the loss is the last thing
differentiated, so its cotangent is a scalar known to scale them), as Liger-Kernel's fused linear
cross-entropy does: the backward pass only multiplies the saved gradients by that scalar, and no
logits are recomputed. Only the chunk's logits exist at any time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm import model
from jaxlm.config import ConfigError, ModelConfig
from pallas_kernels import triton_cross_entropy


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token -log p(target) and logsumexp of the logits, both [B, T] float32."""
    logits = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_normalizer - target_logits, log_normalizer


def loss_terms(cfg: ModelConfig, params: dict, batch: dict, z_loss_weight: float = 0.0) -> dict:
    """Masked sums over the batch: cross-entropy `ce_sum`, z-loss `z_sum` and token `count`.

    The z-loss term is weight * logsumexp^2 per token, i.e. `model.z_loss` summed instead of
    averaged, so that (ce_sum + z_sum) / count is the loss of any split of the batch.
    MoE models also give `z_sum` their router losses (`moe_aux_loss` x count) and add `router`:
    the per-layer metrics of `model.forward_with_aux`.
    """
    check_loss_kernel(cfg)
    mask = batch["loss_mask"].astype(jnp.float32)
    count = jnp.sum(mask)
    kwargs = {"positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}
    if cfg.loss_chunk:
        hidden, _, aux = model.hidden_states(cfg, params, batch["inputs"], **kwargs)
        weight, vocab_major = model.output_weight(cfg, params)
        objective, ce_sum, z_sum = chunked_loss_sums(
            hidden, weight, batch["targets"], mask, vocab_major=vocab_major, chunk=cfg.loss_chunk,
            scale=model.output_scale(cfg), z_loss_weight=z_loss_weight, kernel=cfg.loss_kernel)
        # NOTE: only the sum objective = ce_sum + z_sum carries gradients (chunked_loss_sums);
        # ce_sum is written so that ce_sum + z_sum differentiates as the objective.
        terms = {"ce_sum": objective - z_sum, "z_sum": z_sum, "count": count}
    else:
        logits, _, aux = model.forward_with_aux(cfg, params, batch["inputs"], **kwargs)
        token_loss, log_normalizer = cross_entropy(logits, batch["targets"])
        terms = {
            "ce_sum": jnp.sum(token_loss * mask),
            "z_sum": z_loss_weight * jnp.sum(jnp.square(log_normalizer) * mask),
            "count": count,
        }
    if aux:
        # NOTE: router losses are batch means over all tokens (padding included); scaled by the
        # counted tokens they add up over microbatches like the other sums.
        terms["z_sum"] = terms["z_sum"] + moe_aux_loss(cfg, aux) * count
        terms["router"] = aux
    return terms


def check_loss_kernel(cfg: ModelConfig) -> None:
    """ConfigError unless model.loss_kernel can run: triton needs the chunked loss, a GPU and
    jax-triton (otherwise it would be ignored, or fail inside a trace)."""
    if cfg.loss_kernel != "triton":
        return
    if not cfg.loss_chunk:
        raise ConfigError("model.loss_kernel=triton runs on the chunked loss: set model.loss_chunk "
                          "(e.g. 256) too")
    _require_triton()


def _require_triton() -> None:
    if not triton_cross_entropy.available():
        raise ConfigError("model.loss_kernel=triton needs a GPU and the jax-triton package "
                          "(pip install 'jaxlm[triton]'); use model.loss_kernel=xla")


def moe_aux_loss(cfg: ModelConfig, aux: dict) -> jax.Array:
    """model.moe_balance_loss * Switch balance loss + model.moe_z_loss * router z-loss, summed
    over MoE layers (coefficients per layer, as in Switch and ST-MoE)."""
    return (cfg.moe_balance_loss * jnp.sum(aux["balance_loss"])
            + cfg.moe_z_loss * jnp.sum(aux["router_z_loss"]))


def mean_loss(cfg: ModelConfig, params: dict, batch: dict, z_loss_weight: float = 0.0) -> jax.Array:
    """The training objective of one batch: (cross-entropy + z-loss) per counted token."""
    terms = loss_terms(cfg, params, batch, z_loss_weight)
    return (terms["ce_sum"] + terms["z_sum"]) / jnp.maximum(terms["count"], 1.0)


def chunked_loss_sums(hidden: jax.Array, weight: jax.Array, targets: jax.Array, mask: jax.Array, *,
                      vocab_major: bool, chunk: int, scale: float = 1.0,
                      z_loss_weight: float = 0.0, kernel: str = "xla"):
    """(objective, ce_sum, z_sum) of the logits hidden @ weight * scale, chunk positions at a time.

    hidden [B, T, D] (compute dtype), weight [V, D] if vocab_major else [D, V], targets [B, T]
    int32, mask [B, T] float32 token weights. ce_sum = sum(mask * (logsumexp - target logit)),
    z_sum = z_loss_weight * sum(mask * logsumexp^2), objective = ce_sum + z_sum: the same
    numbers as `cross_entropy` over the full logits (bf16 logits upcast to float32). Only
    `objective` is differentiable (with respect to hidden, weight and mask); ce_sum and z_sum
    are metrics and carry no gradient. kernel "triton" computes each chunk's softmax and logit
    gradient with `triton_cross_entropy.softmax_cross_entropy` (GPU only).
    """
    if kernel not in ("xla", "triton"):
        raise ValueError(f"loss kernel must be 'xla' or 'triton', got {kernel!r}")
    if kernel == "triton":
        _require_triton()
    static = (vocab_major, min(chunk, hidden.shape[1]), float(scale), float(z_loss_weight), kernel)
    objective, ce_sum, z_sum = _chunked_loss(static, hidden, weight, targets, mask)
    return objective, jax.lax.stop_gradient(ce_sum), jax.lax.stop_gradient(z_sum)


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T / chunk, B, chunk, ...], T zero-padded up to a multiple of chunk."""
    batch, length = x.shape[:2]
    pad = -length % chunk
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, (length + pad) // chunk, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _chunk_terms(static, weight, x, targets, mask, with_grad: bool):
    """One chunk's per-token loss and logsumexp [B, c] (and the logit gradient [B, c, V])."""
    vocab_major, _, scale, z_loss_weight, kernel = static
    logits = jnp.einsum("bcd,vd->bcv" if vocab_major else "bcd,dv->bcv", x, weight)
    softmax_ce = (triton_cross_entropy.softmax_cross_entropy if kernel == "triton"
                  else triton_cross_entropy.softmax_cross_entropy_reference)
    rows = logits.shape[0] * logits.shape[1]
    out = softmax_ce(logits.reshape(rows, -1), targets.reshape(rows), mask.reshape(rows),
                     scale=scale, z_loss_weight=z_loss_weight, with_grad=with_grad)
    return tuple(o.reshape(logits.shape[:o.ndim + 1]) for o in out)


def _sums(static, token_loss, lse, mask):
    ce_sum = jnp.sum(token_loss * mask)
    z_sum = static[3] * jnp.sum(jnp.square(lse) * mask)
    return ce_sum + z_sum, ce_sum, z_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_loss(static, hidden, weight, targets, mask):
    chunk = static[1]

    def body(carry, xs):
        x, t, m = xs
        token_loss, lse = _chunk_terms(static, weight, x, t, m, with_grad=False)
        return jax.tree.map(jnp.add, carry, _sums(static, token_loss, lse, m)), None

    zeros = (jnp.float32(0),) * 3
    chunks = (_to_chunks(hidden, chunk), _to_chunks(targets, chunk), _to_chunks(mask, chunk))
    sums, _ = jax.lax.scan(body, zeros, chunks)
    return sums


def _chunked_loss_fwd(static, hidden, weight, targets, mask):
    vocab_major, chunk, _, z_loss_weight, _ = static

    def body(carry, xs):
        x, t, m = xs
        token_loss, lse, dlogits = _chunk_terms(static, weight, x, t, m, with_grad=True)
        dx = jnp.einsum("bcv,vd->bcd" if vocab_major else "bcv,dv->bcd", dlogits, weight)
        dw = jnp.einsum("bcv,bcd->vd" if vocab_major else "bcv,bcd->dv", dlogits, x,
                        preferred_element_type=jnp.float32)
        sums = jax.tree.map(jnp.add, carry[0], _sums(static, token_loss, lse, m))
        per_token = token_loss + z_loss_weight * jnp.square(lse)  # d objective / d mask
        return (sums, carry[1] + dw), (dx, per_token)

    zeros = ((jnp.float32(0),) * 3, jnp.zeros(weight.shape, jnp.float32))
    chunks = (_to_chunks(hidden, chunk), _to_chunks(targets, chunk), _to_chunks(mask, chunk))
    (sums, dweight), (dx, per_token) = jax.lax.scan(body, zeros, chunks)
    length = hidden.shape[1]
    dx = jnp.moveaxis(dx, 0, 1).reshape(hidden.shape[0], -1, hidden.shape[2])[:, :length]
    per_token = jnp.moveaxis(per_token, 0, 1).reshape(hidden.shape[0], -1)[:, :length]
    return sums, (dx, dweight, per_token, targets)


def _chunked_loss_bwd(static, residuals, cotangents):
    dx, dweight, per_token, targets = residuals
    g = cotangents[0]  # ce_sum and z_sum leave through stop_gradient: their cotangents are 0
    return ((g * dx.astype(jnp.float32)).astype(dx.dtype), (g * dweight).astype(dweight.dtype),
            jnp.zeros(targets.shape, jax.dtypes.float0), g * per_token)


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)
