"""AdamW with linear warmup, cosine decay to a floor, global-norm clipping and a decay mask.

    tx = make_optimizer(cfg.model, cfg.train)      # an optax.GradientTransformation
    lr = learning_rate(cfg.train, step)            # the schedule, jnp or Python numbers

Conventions:
- Schedule over optimizer steps s = 0, 1, ...: lr * (s + 1) / warmup for s < warmup (the first
  update is already non-zero), then a cosine from lr to lr * min_lr_ratio reached at `steps`,
  constant after.
- Clipping scales the whole gradient by min(1, clip_norm / global_norm) before Adam
  (clip_norm = 0 disables it).
- AdamW as in optax (Loshchilov & Hutter 2019): p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p),
  the decay scaled by the scheduled lr.
- Decay mask: weight decay applies to parameters initialized from a normal distribution
  (every matmul weight and the embedding, also when tied) and not to those initialized to ones
  or zeros (RMSNorm scales, q/k/v biases): shrinking a norm scale towards 0 is not a prior on
  small weights but a change of the function. The mask comes from `model.param_specs`, so a new
  parameter kind is classified where it is declared.
- muP (`model.parameterization=mup`): each update is then multiplied by its parameter's factor
  from `mup.learning_rate_multipliers` (1/width multiplier for hidden matrices).
- Optimizer state and params are float32 (the master copy); the forward pass casts to
  `compute_dtype`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxlm import model, mup
from jaxlm.config import ModelConfig, TrainConfig


def learning_rate(train: TrainConfig, step):
    """The scheduled learning rate of optimizer step `step` (0-based); works on jnp and ints."""
    step = jnp.asarray(step, jnp.float32)
    warmup = max(train.warmup_steps, 1)
    warm = train.lr * jnp.minimum((step + 1) / warmup, 1.0)
    decay_steps = max(train.steps - train.warmup_steps, 1)
    progress = jnp.clip((step - train.warmup_steps) / decay_steps, 0.0, 1.0)
    floor = train.lr * train.min_lr_ratio
    cosine = floor + (train.lr - floor) * 0.5 * (1 + jnp.cos(math.pi * progress))
    return jnp.where(step < train.warmup_steps, warm, cosine)


def decay_mask(cfg: ModelConfig) -> dict:
    """True for parameters that receive weight decay (normal-initialized ones), per leaf."""
    return jax.tree.map(lambda spec: spec.init == "normal", model.param_specs(cfg),
                        is_leaf=lambda x: isinstance(x, model.ParamSpec))


def make_optimizer(cfg: ModelConfig, train: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the schedule and decay mask of this module."""
    adamw = optax.adamw(lambda step: learning_rate(train, step), b1=train.beta1, b2=train.beta2,
                        eps=train.eps, weight_decay=train.weight_decay, mask=decay_mask(cfg))
    if cfg.parameterization == "mup":
        adamw = optax.chain(adamw, mup.scale_updates(mup.learning_rate_multipliers(cfg, model.param_specs(cfg))))
    if train.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train.clip_norm), adamw)
    return adamw
