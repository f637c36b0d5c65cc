"""The GRPO objective: group-normalized rewards, policy-gradient losses, aggregation, KL.

Conventions (N rollouts = prompts x group_size, consecutive rollouts of one prompt form a group;
T response-aligned positions, `mask` [N, T] = 1 on response tokens):

- Advantages (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2): A_i = (r_i - mean_g) / (std_g + eps)
  with the unbiased std (ddof=1) of the group g of i, or A_i = r_i - mean_g without the std
  ("Dr. GRPO", Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.1). Computed on the
  whole rollout batch on the host, before any microbatching.
- Per-token losses, log pi = log-probs of the sampled tokens under the params being trained:
    no_baseline              -R * log pi
    reinforce_with_baseline  -A * log pi
    grpo_clip                -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A), rho = pi / pi_old
  (PPO's clipped surrogate, Schulman et al. 2017, eq. 7). A token is "clipped" when the clipped
  term is strictly the smaller one: its gradient is then zero.
- Aggregation of per-token losses l [N, T] into one scalar:
    sequence  mean over each response's tokens, then over responses (original GRPO)
    constant  sum over tokens / (N * constant), constant = max_new_tokens (Dr. GRPO)
    token     sum over all tokens / number of tokens (DAPO, Yu et al. 2025, sec. 3.3)
  Each is a weighted token sum, sum(w * l), with weights `token_weights` fixed on the whole
  batch; summing microbatches' sum(w * l) therefore gives the same loss and gradient for any
  number of microbatches.
- KL penalty to a frozen reference (k3 estimator, Schulman 2020 "Approximating KL divergence"):
  kl = exp(ref - logp) - (ref - logp) - 1 >= 0 per token, aggregated with the same weights and
  added with coefficient `kl_coef`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.align.common import masked_mean, masked_normalize, response_log_probs

LossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip"]
Aggregation = Literal["sequence", "constant", "token"]


def compute_group_normalized_rewards(reward_fn: Callable[[str, str], dict], rollout_responses: Sequence[str],
                                     repeated_ground_truths: Sequence[str], group_size: int,
                                     advantage_eps: float = 1e-6, normalize_by_std: bool = True):
    """(advantages [N], raw rewards [N], metadata) for N = prompts x group_size rollouts."""
    if len(rollout_responses) != len(repeated_ground_truths):
        raise ValueError(f"{len(rollout_responses)} responses but {len(repeated_ground_truths)} ground truths")
    if group_size < 1 or len(rollout_responses) % group_size:
        raise ValueError(f"{len(rollout_responses)} rollouts do not split into groups of {group_size}")
    if normalize_by_std and group_size < 2:
        raise ValueError("normalize_by_std needs group_size >= 2 (the std of one sample is undefined)")
    scores = [reward_fn(r, g) for r, g in zip(rollout_responses, repeated_ground_truths)]
    raw = np.array([s["reward"] for s in scores], np.float64)
    groups = raw.reshape(-1, group_size)
    centered = groups - groups.mean(axis=1, keepdims=True)
    if normalize_by_std:
        centered = centered / (groups.std(axis=1, ddof=1, keepdims=True) + advantage_eps)
    metadata = {
        "reward": float(raw.mean()), "reward_std": float(raw.std()),
        "format_reward": float(np.mean([s["format_reward"] for s in scores])),
        "answer_reward": float(np.mean([s["answer_reward"] for s in scores])),
        "accuracy": float(np.mean([s["answer_reward"] == 1.0 for s in scores])),
        "groups_all_same": float(np.mean(groups.std(axis=1) == 0)),
    }
    return centered.reshape(-1).astype(np.float32), raw.astype(np.float32), metadata


def policy_gradient_loss(policy_log_probs: jax.Array, loss_type: str, raw_rewards=None, advantages=None,
                         old_log_probs=None, cliprange: Optional[float] = None) -> tuple[jax.Array, dict]:
    """Per-token loss [N, T] of one loss type; rewards/advantages broadcast ([N, 1] or [N, T]).

    metadata: "clipped" (float 0/1 per token) and "ratio" for grpo_clip, else {}.
    """
    if loss_type == "no_baseline":
        if raw_rewards is None:
            raise ValueError("no_baseline needs raw_rewards")
        return -raw_rewards * policy_log_probs, {}
    if loss_type == "reinforce_with_baseline":
        if advantages is None:
            raise ValueError("reinforce_with_baseline needs advantages")
        return -advantages * policy_log_probs, {}
    if loss_type == "grpo_clip":
        if advantages is None or old_log_probs is None or cliprange is None:
            raise ValueError("grpo_clip needs advantages, old_log_probs and cliprange")
        ratio = jnp.exp(policy_log_probs - old_log_probs)
        unclipped = ratio * advantages
        clipped = jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange) * advantages
        return -jnp.minimum(unclipped, clipped), {"clipped": (clipped < unclipped).astype(jnp.float32),
                                                  "ratio": ratio}
    raise ValueError(f"unknown loss_type {loss_type!r}; choose no_baseline, reinforce_with_baseline or grpo_clip")


def aggregate(per_token_loss: jax.Array, mask: jax.Array, aggregation: str, constant: float = 1.0) -> jax.Array:
    """The scalar loss of a whole batch, by the module docstring's three rules."""
    if aggregation == "sequence":
        return jnp.mean(masked_mean(per_token_loss, mask, axis=1))
    if aggregation == "constant":
        return masked_normalize(per_token_loss, mask, constant=constant * per_token_loss.shape[0])
    if aggregation == "token":
        return masked_mean(per_token_loss, mask)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose sequence, constant or token")


def token_weights(mask: np.ndarray, aggregation: str, constant: float = 1.0) -> np.ndarray:
    """Weights w [N, T] with sum(w * l) == aggregate(l, mask, aggregation, constant)."""
    mask = np.asarray(mask, np.float32)
    rows = mask.shape[0]
    if aggregation == "sequence":
        lengths = mask.sum(axis=1, keepdims=True)
        return mask / (np.where(lengths == 0, 1.0, lengths) * rows)
    if aggregation == "constant":
        return mask / (rows * constant)
    if aggregation == "token":
        return mask / max(float(mask.sum()), 1.0)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose sequence, constant or token")


def k3_kl(log_probs: jax.Array, ref_log_probs: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_log_probs - log_probs
    return jnp.exp(delta) - delta - 1.0


@dataclasses.dataclass(frozen=True)
class GrpoLoss:
    """`train.make_train_step`'s loss_fn for a GRPO update (hashable: compiled once per setting).

    The microbatch holds [n, T] arrays: inputs, targets, loss_mask (response tokens), token_weights
    (`token_weights` x the batch's response-token count, because the step divides by that count),
    advantages, raw_rewards, old_log_probs, ref_log_probs.
    """

    loss_type: str = "grpo_clip"
    cliprange: float = 0.2
    kl_coef: float = 0.0

    def __call__(self, model_cfg, params, micro: dict) -> dict:
        out = response_log_probs(model_cfg, params, micro["inputs"], micro["targets"], with_entropy=True)
        log_probs, mask, weights = out["log_probs"], micro["loss_mask"], micro["token_weights"]
        per_token, metadata = policy_gradient_loss(
            log_probs, self.loss_type, raw_rewards=micro["raw_rewards"], advantages=micro["advantages"],
            old_log_probs=micro["old_log_probs"], cliprange=self.cliprange)
        kl = k3_kl(log_probs, micro["ref_log_probs"])
        z_sum = self.kl_coef * jnp.sum(weights * kl) if self.kl_coef else jnp.float32(0)
        sums = {"entropy": jnp.sum(mask * out["entropy"]), "kl": jnp.sum(mask * kl),
                "clipped": jnp.sum(mask * metadata.get("clipped", jnp.zeros_like(mask)))}
        return {"ce_sum": jnp.sum(weights * per_token), "z_sum": z_sum, "sums": sums}
