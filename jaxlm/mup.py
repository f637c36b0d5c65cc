"""muP, the maximal-update parameterization (Yang et al. 2021, "Tensor Programs V"), for Adam.

    --model.parameterization=mup --model.mup_base_width=64 [--model.mup_output_multiplier=1.0]

Tune the learning rate (and init_std) of a narrow model once; under muP the best values stay
the best as the model widens, because every layer's activations and their per-step updates keep
their size (TP5 sec. 3, Table 3 for Adam). Conventions:

- Width multiplier m = embed_dim / mup_base_width. Every hidden width (embed_dim, mlp_dim,
  num_heads x head_dim) is assumed to grow with embed_dim by the same factor.
- Roles by parameter (from `model.param_specs`, so a new parameter is classified where it is
  declared): the embedding table is an *input* weight; `lm_head` the *output* weight; ones- and
  zeros-initialized parameters (norm scales, biases) are *vectors*; every other normal-initialized
  matrix is *hidden* (q, k, v, o, gate, up, down, MoE experts and routers).
- Init: hidden std = init_std / sqrt(m) (o and down keep their extra 1 / sqrt(2L)); input and
  output weights keep init_std; vectors as in the standard parameterization.
- Adam learning rate: hidden x 1/m; input, output and vectors x 1. Weight decay rides on the
  learning rate (optax's AdamW), so it is scaled alike.
- Output: logits x mup_output_multiplier / m. With a constant init and learning rate this makes
  the readout's effective init std and update scale as 1/fan_in, muP's output rule (TP5 Table 8
  form, as in the `mup` package's MuReadout).
- Attention: scores q.k / head_dim instead of / sqrt(head_dim) (TP5 sec. 4), applied as an extra
  1/sqrt(head_dim) on q so that every attention implementation (xla, cudnn, pallas) stays as is.

At m = 1 the parameterization equals the standard one except for the attention constant.
Simplifications: tied embeddings are rejected (the two roles scale differently); MoE routers are
treated as hidden matrices, although their fan-out (the expert count) does not grow.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

from jaxlm.config import ModelConfig

ROLES = ("input", "output", "hidden", "vector")


def width_multiplier(cfg: ModelConfig) -> float:
    return cfg.embed_dim / cfg.mup_base_width


def _is_spec(x) -> bool:
    return dataclasses.is_dataclass(x) and hasattr(x, "init") and hasattr(x, "std")


def role(path: tuple, spec) -> str:
    """The muP role of one parameter from its tree path and ParamSpec (module docstring)."""
    name = str(getattr(path[-1], "key", path[-1]))
    if len(path) == 1 and name == "embed":
        return "input"
    if len(path) == 1 and name == "lm_head":
        return "output"
    return "hidden" if spec.init == "normal" else "vector"


def roles(specs: dict) -> dict:
    """The role of every parameter, in the tree structure of `specs` (model.param_specs)."""
    return jax.tree_util.tree_map_with_path(role, specs, is_leaf=_is_spec)


def scale_init(cfg: ModelConfig, specs: dict) -> dict:
    """`specs` with the muP init: hidden matrices' std divided by sqrt(m)."""
    factor = 1 / math.sqrt(width_multiplier(cfg))

    def scale(path, spec):
        return dataclasses.replace(spec, std=spec.std * factor) if role(path, spec) == "hidden" else spec

    return jax.tree_util.tree_map_with_path(scale, specs, is_leaf=_is_spec)


def learning_rate_multipliers(cfg: ModelConfig, specs: dict) -> dict:
    """Per-parameter factors on the Adam learning rate: 1/m for hidden matrices, else 1."""
    hidden = 1 / width_multiplier(cfg)
    return jax.tree.map(lambda r: hidden if r == "hidden" else 1.0, roles(specs))


def scale_updates(multipliers: dict) -> optax.GradientTransformation:
    """Multiply each leaf's update by its factor (a stateless optax transformation)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, factor: u * factor, updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def query_scale(cfg: ModelConfig) -> float:
    """The extra factor on q that turns the kernels' 1/sqrt(head_dim) into 1/head_dim."""
    return 1 / math.sqrt(cfg.resolved_head_dim)


def output_scale(cfg: ModelConfig) -> float:
    """The factor on the logits: mup_output_multiplier / m."""
    return cfg.mup_output_multiplier / width_multiplier(cfg)
