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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm import model
from jaxlm.config import ModelConfig


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
    logits, _, aux = model.forward_with_aux(cfg, params, batch["inputs"],
                                            positions=batch.get("positions"),
                                            segment_ids=batch.get("segment_ids"))
    token_loss, log_normalizer = cross_entropy(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    count = jnp.sum(mask)
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


def moe_aux_loss(cfg: ModelConfig, aux: dict) -> jax.Array:
    """model.moe_balance_loss * Switch balance loss + model.moe_z_loss * router z-loss, summed
    over MoE layers (coefficients per layer, as in Switch and ST-MoE)."""
    return (cfg.moe_balance_loss * jnp.sum(aux["balance_loss"])
            + cfg.moe_z_loss * jnp.sum(aux["router_z_loss"]))


def mean_loss(cfg: ModelConfig, params: dict, batch: dict, z_loss_weight: float = 0.0) -> jax.Array:
    """The training objective of one batch: (cross-entropy + z-loss) per counted token."""
    terms = loss_terms(cfg, params, batch, z_loss_weight)
    return (terms["ce_sum"] + terms["z_sum"]) / jnp.maximum(terms["count"], 1.0)
