"""A Llama-style decoder-only Transformer as pure functions over a parameter pytree.

    params = init_params(cfg, key, mesh=None)
    logits, cache = forward(cfg, params, tokens, positions=None, segment_ids=None, cache=None)

Einsum letters: B batch, T query positions, S key positions, D embed, N heads, K kv heads,
G heads per kv head, H head dim, F mlp, V vocab, L layers.

Architecture (pre-norm): x = embed[tokens]; per layer
    x += o(attention(rope(q(norm(x))), rope(k(norm(x))), v(norm(x))))
    x += down(silu(gate(norm(x))) * up(norm(x)))
then logits = lm_head(norm(x)) (or embed^T when tied). Options: q/k/v biases (Qwen2), RMSNorm of
q and k over head_dim before RoPE (Qwen3), Mistral's sliding window, Llama 3 RoPE scaling.

Parameters are declared once in `param_specs` with shape, logical dims and initializer. Layers
are stacked on a leading `layers` dim and run with `jax.lax.scan`, so compile time does not grow
with depth; decoding loops pass them unstacked (`unstack_layers`). One `forward` serves
training, prefill and cached decoding: a cache argument is what makes it a decoding step.
Activation shardings are constrained at block boundaries by logical name, against the mesh set
with `jax.set_mesh` (none: nothing is constrained).

Deliberate simplifications: no dropout; no biases except Qwen2's q/k/v bias.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from jaxlm import attention as attention_lib
from jaxlm import kv_cache, moe, mup, sharding
from jaxlm.config import ModelConfig
from jaxlm.layers import apply_rope, rms_norm, rope_inverse_frequencies, swiglu

ACTIVATION_AXES = ("batch", "seq", None)
LOGITS_AXES = ("batch", "seq", "vocab")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, logical dim names and initializer ('normal', 'ones', 'zeros')."""

    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]
    init: str = "normal"
    std: float = 0.0


def param_specs(cfg: ModelConfig) -> dict:
    """The parameter tree's declaration: the same nesting as `init_params`' result."""
    L, D, N, K, H, F, V = (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
                           cfg.resolved_head_dim, cfg.mlp_dim, cfg.vocab_size)
    std = cfg.init_std
    # GPT-2 (Radford et al. 2019, sec. 2.3): scale residual output projections by 1/sqrt(2L).
    out_std = std / np.sqrt(2 * L)
    attn = {
        "q": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim"), "normal", std),
        "k": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal", std),
        "v": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal", std),
        "o": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed"), "normal", out_std),
    }
    if cfg.qkv_bias:
        attn["q_bias"] = ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros")
        attn["k_bias"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        attn["v_bias"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        attn["q_norm"] = ParamSpec((L, H), ("layers", "head_dim"), "ones")
        attn["k_norm"] = ParamSpec((L, H), ("layers", "head_dim"), "ones")
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal", std),
        "blocks": {
            "attn_norm": ParamSpec((L, D), ("layers", None), "ones"),
            "attn": attn,
            "mlp_norm": ParamSpec((L, D), ("layers", None), "ones"),
            "mlp": {
                "gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal", std),
                "up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal", std),
                "down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal", out_std),
            },
        },
        "final_norm": ParamSpec((D,), (None,), "ones"),
    }
    if cfg.num_experts:
        _split_moe_stacks(cfg, specs, out_std)
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal", std)
    if cfg.parameterization == "mup":
        specs = mup.scale_init(cfg, specs)
    return specs


def _split_moe_stacks(cfg: ModelConfig, specs: dict, out_std: float) -> None:
    """Replace "blocks" by a dense stack (if any dense layer) and a "moe_blocks" stack.

    Each stack keeps the per-layer params of its layers (leading dim = its layer count); MoE
    layers swap "mlp" for "moe": router [D, E], router_bias [E] (non-trainable, see moe.py),
    experts gate/up [E, D, F], down [E, F, D], and shared experts as one wider SwiGLU.
    """
    dense_ids, moe_ids = moe.layer_indices(cfg)
    D, E, F, std = cfg.embed_dim, cfg.num_experts, moe.expert_mlp_dim(cfg), cfg.init_std
    blocks = specs.pop("blocks")

    def restack(tree, count):
        return jax.tree.map(lambda s: dataclasses.replace(s, shape=(count, *s.shape[1:])), tree,
                            is_leaf=_is_spec)

    if dense_ids:
        specs["blocks"] = restack(blocks, len(dense_ids))
    Lm = len(moe_ids)
    experts = {
        "router": ParamSpec((Lm, D, E), ("layers", "embed", None), "normal", std),
        "router_bias": ParamSpec((Lm, E), ("layers", None), "zeros"),
        "gate": ParamSpec((Lm, E, D, F), ("layers", "experts", "embed", "mlp"), "normal", std),
        "up": ParamSpec((Lm, E, D, F), ("layers", "experts", "embed", "mlp"), "normal", std),
        "down": ParamSpec((Lm, E, F, D), ("layers", "experts", "mlp", "embed"), "normal", out_std),
    }
    if cfg.num_shared_experts:
        S = cfg.num_shared_experts * F
        experts["shared_gate"] = ParamSpec((Lm, D, S), ("layers", "embed", "mlp"), "normal", std)
        experts["shared_up"] = ParamSpec((Lm, D, S), ("layers", "embed", "mlp"), "normal", std)
        experts["shared_down"] = ParamSpec((Lm, S, D), ("layers", "mlp", "embed"), "normal", out_std)
    moe_blocks = {name: value for name, value in restack(blocks, Lm).items() if name != "mlp"}
    specs["moe_blocks"] = {**moe_blocks, "moe": experts}


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig) -> dict:
    """Logical dim names of every parameter, in the params' tree structure."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """NamedSharding of every parameter; raises MeshError naming a dim that does not divide."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten_with_path(specs, is_leaf=_is_spec)
    shardings = []
    for path, spec in leaves:
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        sharding.check_divisible(name, spec.shape, spec.axes, mesh)
        shardings.append(sharding.named_sharding(mesh, spec.axes))
    return jax.tree.unflatten(treedef, shardings)


def _init_leaf(spec: ParamSpec, key: jax.Array, dtype) -> jax.Array:
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    return (spec.std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)


def init_params(cfg: ModelConfig, key: jax.Array, mesh: Optional[Mesh] = None) -> dict:
    """Random parameters in `cfg.param_dtype`, created already sharded when a mesh is given."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    dtype = jnp.dtype(cfg.param_dtype)

    def init(key):
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [_init_leaf(s, k, dtype) for s, k in zip(leaves, keys)])

    out_shardings = None if mesh is None else param_shardings(cfg, mesh)
    return jax.jit(init, out_shardings=out_shardings)(key)


# ---------------------------------------------------------------------------------------------
# Forward


def _constrain(x: jax.Array, axes) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes)))


def _attention_block(cfg: ModelConfig, p: dict, x: jax.Array, ctx: dict,
                     layer_cache: Optional[tuple]) -> tuple[jax.Array, Optional[tuple]]:
    """Attention sublayer of one layer. p: that layer's attention params; x [B, T, D] normed."""
    dtype = x.dtype
    q = jnp.einsum("btd,dnh->btnh", x, p["q"])
    k = jnp.einsum("btd,dkh->btkh", x, p["k"])
    v = jnp.einsum("btd,dkh->btkh", x, p["v"])
    if cfg.qkv_bias:
        q, k, v = q + p["q_bias"].astype(dtype), k + p["k_bias"].astype(dtype), v + p["v_bias"].astype(dtype)
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    q = apply_rope(q, ctx["positions"], ctx["inverse_frequencies"])
    k = checkpoint_name(apply_rope(k, ctx["positions"], ctx["inverse_frequencies"]), "rope")
    if cfg.parameterization == "mup":
        q = q * jnp.asarray(mup.query_scale(cfg), q.dtype)  # scores / head_dim (mup.py)
    q = checkpoint_name(q, "rope")
    if layer_cache is not None:
        # layer_cache = (the whole stacked cache, this layer's index): written in place.
        cache, layer = layer_cache
        cache = kv_cache.write_layer(cache, layer, k, v)
        out = attention_lib.attention_cached(q, cache["k"], cache["v"], q_offsets=cache["lengths"],
                                             layer=layer, k_scale=cache.get("k_scale"),
                                             v_scale=cache.get("v_scale"),
                                             sliding_window=cfg.sliding_window,
                                             impl=cfg.attention_impl)
        return jnp.einsum("btnh,nhd->btd", out, p["o"]), (cache, layer)
    out = attention_lib.attention(
        q, k, v, q_positions=ctx["positions"], k_positions=ctx["positions"],
        q_segment_ids=ctx["segment_ids"], k_segment_ids=ctx["segment_ids"],
        sliding_window=cfg.sliding_window, plain_causal=ctx["plain_causal"],
        impl=cfg.attention_impl)
    return jnp.einsum("btnh,nhd->btd", out, p["o"]), layer_cache


def _norm(cfg: ModelConfig, x: jax.Array, scale: jax.Array) -> jax.Array:
    """A layer's pre-norm, tagged for `remat_save` "norm"."""
    return checkpoint_name(rms_norm(x, scale, cfg.norm_eps), "norm")


def _block(cfg: ModelConfig, ctx: dict, x: jax.Array, layer: tuple) -> tuple[jax.Array, Optional[tuple]]:
    """One pre-norm Transformer layer; `layer` = (this layer's params, None or (the whole stacked
    cache, this layer's index)): the cache is written in place at that index."""
    p, layer_cache = layer
    h, layer_cache = _attention_block(cfg, p["attn"], _norm(cfg, x, p["attn_norm"]),
                                      ctx, layer_cache)
    x = _constrain(x + h, ACTIVATION_AXES)
    mlp = p["mlp"]
    h = swiglu(_norm(cfg, x, p["mlp_norm"]), mlp["gate"], mlp["up"], mlp["down"])
    return _constrain(x + h, ACTIVATION_AXES), layer_cache


def _moe_block(cfg: ModelConfig, ctx: dict, x: jax.Array, layer: tuple):
    """`_block` with the MoE MLP: (x, cache as `_block` returns it, this layer's router aux)."""
    p, layer_cache = layer
    h, layer_cache = _attention_block(cfg, p["attn"], _norm(cfg, x, p["attn_norm"]),
                                      ctx, layer_cache)
    x = _constrain(x + h, ACTIVATION_AXES)
    h, aux = moe.moe_mlp(cfg, p["moe"], _norm(cfg, x, p["mlp_norm"]))
    return _constrain(x + h, ACTIVATION_AXES), layer_cache, aux


def _layer_step(block: Callable, carry: tuple, p: dict, layer_id: jax.Array):
    """One layer on carry (x, stacked cache or None) -> (carry, aux of an MoE block or None)."""
    h, stacked = carry
    out = block(h, (p, None if stacked is None else (stacked, layer_id)))
    new_stacked = None if stacked is None else out[1][0]
    return (out[0], new_stacked), (out[2] if len(out) == 3 else None)


def _moe_layers(cfg: ModelConfig, ctx: dict, x: jax.Array, params: dict, cache: Optional[dict]):
    """All layers of an MoE model: `first_dense_layers` dense ones, then groups of `moe_every`.

    Two stacks: params["blocks"] (dense layers, in order) and params["moe_blocks"]. The dense
    prefix is one scan; then one scan over the groups, each running its moe_every - 1 dense
    layers (an inner scan) and its MoE layer. A cache is indexed by global layer number.
    """
    dtype = jnp.dtype(cfg.compute_dtype)
    dense_ids, moe_ids = moe.layer_indices(cfg)
    first, every, groups = cfg.first_dense_layers, cfg.moe_every, len(moe_ids)
    dense_block = _remat(functools.partial(_block, cfg, ctx), cfg)
    moe_block = _remat(functools.partial(_moe_block, cfg, ctx), cfg)
    dense = _cast_weights(params["blocks"], dtype) if dense_ids else None
    carry = (x, cache)

    def scan_dense(carry, p, ids):
        return jax.lax.scan(lambda c, xs: _layer_step(dense_block, c, *xs), carry, (p, ids))[0]

    if first:
        carry = scan_dense(carry, jax.tree.map(lambda w: w[:first], dense),
                           jnp.arange(first, dtype=jnp.int32))
    rest = None
    if every > 1:
        rest = jax.tree.map(lambda w: w[first:].reshape(groups, every - 1, *w.shape[1:]), dense)
    rest_ids = jnp.asarray(dense_ids[first:], jnp.int32).reshape(groups, every - 1)

    def group(carry, xs):
        rest_p, rest_i, moe_p, moe_i = xs
        if every > 1:
            carry = scan_dense(carry, rest_p, rest_i)
        return _layer_step(moe_block, carry, moe_p, moe_i)

    moe_params = _cast_weights(params["moe_blocks"], dtype)
    xs = (rest, rest_ids, moe_params, jnp.asarray(moe_ids, jnp.int32))
    (x, cache), aux = jax.lax.scan(group, carry, xs, unroll=_unroll(cfg, groups))
    return x, cache, aux


def _unroll(cfg: ModelConfig, length: int):
    """lax.scan's unroll for `length` iterations: True (no loop at all) when fully unrolled."""
    return True if cfg.scan_unroll >= length else cfg.scan_unroll


def _save_dots_and_fused_attention(primitive, *args, **params) -> bool:
    """Remat policy: keep the outputs of weight matmuls and of cuDNN's fused attention kernel.

    Both are O(T) per token; recomputing them costs matmul time. Everything elementwise, and
    XLA attention's [T, S] scores (dots with batch dims), is recomputed in the backward pass.
    """
    if primitive.name.startswith("dot_product_attention_fwd"):
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(primitive, *args, **params)


def _remat(fn: Callable, cfg: ModelConfig) -> Callable:
    """fn under cfg.remat, also keeping the activations named in cfg.remat_save (the
    `checkpoint_name` tags in `_block`, `_attention_block` and layers.swiglu)."""
    policies = {"full": jax.checkpoint_policies.nothing_saveable,
                "save_dots": _save_dots_and_fused_attention}
    if cfg.remat == "none":
        return fn
    if cfg.remat not in policies:
        raise ValueError(f"unknown remat policy {cfg.remat!r}; choose none, full or save_dots")
    policy = policies[cfg.remat]
    if cfg.remat_save_names:
        policy = jax.checkpoint_policies.save_from_both_policies(
            policy, jax.checkpoint_policies.save_only_these_names(*cfg.remat_save_names))
    return jax.checkpoint(fn, policy=policy)


def _cast_weights(blocks: dict, dtype) -> dict:
    """Matmul weights in the compute dtype, cast once for all layers before the scan.

    NOTE: casting inside the scan body instead made XLA copy each layer's float32 slice and
    cast it again in the rematerialized forward and in the backward pass. Norm scales and
    biases stay in their own dtype (norms compute in float32).
    """
    attn = dict(blocks["attn"])
    for name in ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias"):
        if name in attn:
            attn[name] = attn[name].astype(dtype)
    if "mlp" in blocks:
        return {**blocks, "attn": attn, "mlp": jax.tree.map(lambda w: w.astype(dtype), blocks["mlp"])}
    # The router (and its bias) stay float32: routing decisions are made in float32.
    experts = {name: w if name.startswith("router") else w.astype(dtype)
               for name, w in blocks["moe"].items()}
    return {**blocks, "attn": attn, "moe": moe.fuse_gate_up(experts)}


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, *,
            positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
            cache: Optional[dict] = None) -> tuple[jax.Array, Optional[dict]]:
    """Logits [B, T, V] (float32) for tokens [B, T] int32, and the updated cache (or None).

    `forward_with_aux` without the MoE router losses and metrics; arguments as there.
    """
    logits, cache, _ = forward_with_aux(cfg, params, tokens, positions=positions,
                                        segment_ids=segment_ids, cache=cache)
    return logits, cache


def forward_with_aux(cfg: ModelConfig, params: dict, tokens: jax.Array, *,
                     positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
                     cache: Optional[dict] = None) -> tuple[jax.Array, Optional[dict], dict]:
    """(logits [B, T, V] float32, the updated cache or None, aux) for tokens [B, T] int32.

    `hidden_states` followed by the output layer; arguments and aux as there.
    """
    x, cache, aux = hidden_states(cfg, params, tokens, positions=positions,
                                  segment_ids=segment_ids, cache=cache)
    weight, vocab_major = output_weight(cfg, params)
    logits = jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", x, weight)
    logits = logits.astype(jnp.float32) * output_scale(cfg)
    return _constrain(logits, LOGITS_AXES), cache, aux


def output_weight(cfg: ModelConfig, params: dict) -> tuple[jax.Array, bool]:
    """The output layer's weight in the compute dtype and whether it is [V, D] (the tied
    embedding) rather than [D, V] (lm_head)."""
    compute_dtype = jnp.dtype(cfg.compute_dtype)
    if cfg.tie_embeddings:
        return params["embed"].astype(compute_dtype), True
    return params["lm_head"].astype(compute_dtype), False


def output_scale(cfg: ModelConfig) -> float:
    """The factor on the logits: 1, or muP's output multiplier over the width multiplier."""
    return mup.output_scale(cfg) if cfg.parameterization == "mup" else 1.0


def hidden_states(cfg: ModelConfig, params: dict, tokens: jax.Array, *,
                  positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
                  cache: Optional[dict] = None) -> tuple[jax.Array, Optional[dict], dict]:
    """(final-normed hidden states [B, T, D] in the compute dtype, the updated cache or None,
    aux) for tokens [B, T] int32: everything of the model but its output layer.

    aux: {} for a dense model; with MoE layers `moe.losses_and_metrics` of each MoE layer,
    stacked on a leading dim (balance_loss [Lm], router_z_loss [Lm], expert_load [Lm, E], ...).

    positions [B, T]: token positions (default: arange(T)).
    segment_ids [B, T]: document ids of packed sequences; attention stays inside a document.
    Pass positions that restart at 0 per document together with segment_ids.
    cache: from `kv_cache.init_cache`; sequence b's tokens are appended at its own slot
    `cache["lengths"][b]`, which is also their position (kv_cache.py), and lengths grow by T.
    """
    batch, length = tokens.shape
    if cache is not None and (segment_ids is not None or positions is not None):
        raise ValueError("segment_ids or positions with a KV cache are not supported: a cached "
                         "token's position is its slot, cache['lengths'] + t; decode documents "
                         "separately")
    plain_causal = positions is None and segment_ids is None and cache is None
    if positions is None:
        start = 0 if cache is None else cache["lengths"][:, None]
        positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    compute_dtype = jnp.dtype(cfg.compute_dtype)
    ctx = {
        "positions": positions,
        "segment_ids": segment_ids,
        "plain_causal": plain_causal,
        "inverse_frequencies": rope_inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta,
                                                        cfg.rope_scaling),
    }

    x = jnp.take(params["embed"], tokens, axis=0).astype(compute_dtype)
    x = _constrain(x, ACTIVATION_AXES)
    block = _remat(functools.partial(_block, cfg, ctx), cfg)
    aux = {}
    if cfg.num_experts:
        x, cache, aux = _moe_layers(cfg, ctx, x, params, cache)
    elif isinstance(params["blocks"], (list, tuple)):
        # unstack_layers' form: a Python loop over separate per-layer arrays.
        for layer_id, layer in enumerate(params["blocks"]):
            layer = _cast_weights(layer, compute_dtype)
            x, layer_cache = block(x, (layer, None if cache is None else (cache, layer_id)))
            if cache is not None:
                cache = layer_cache[0]
    elif cache is None:
        blocks = _cast_weights(params["blocks"], compute_dtype)
        x, _ = jax.lax.scan(lambda h, layer: block(h, layer), x, (blocks, None),
                            unroll=_unroll(cfg, cfg.num_layers))
    else:
        # The cache rides in the scan carry, not in xs/ys: each layer scatters its new k/v into
        # the stacked buffers in place instead of the scan copying the whole cache every step.
        def cached_block(carry, layer):
            h, stacked = carry
            h, (stacked, _) = block(h, (layer[0], (stacked, layer[1])))
            return (h, stacked), None

        blocks = _cast_weights(params["blocks"], compute_dtype)
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, cache), _ = jax.lax.scan(cached_block, (x, cache), (blocks, layer_ids))
    x = _constrain(rms_norm(x, params["final_norm"], cfg.norm_eps), ACTIVATION_AXES)
    if cache is None:
        return x, None, aux
    return x, kv_cache.set_lengths(cache, cache["lengths"] + length), aux


def unstack_layers(params: dict) -> dict:
    """`params` with the stacked dense layers split into a tuple of per-layer pytrees.

    For decoding loops: `forward` then reads each layer's weights where they lie. With the
    stacked form, XLA on GPU copies each layer's slice out of the stack before its matmuls,
    every step (1b on an H200: 0.79 of 2.2 ms per token in such copies). Call it inside the
    jitted loop, before the loop (one copy per call), or once outside. MoE params are returned
    unchanged (their layers stay a scan).
    """
    if "moe_blocks" in params or isinstance(params["blocks"], (list, tuple)):
        return params
    num_layers = jax.tree.leaves(params["blocks"])[0].shape[0]
    layers = tuple(jax.tree.map(lambda w, i=i: w[i], params["blocks"]) for i in range(num_layers))
    return {**params, "blocks": layers}


def inference_params(cfg: ModelConfig, params: dict) -> dict:
    """`unstack_layers(params)` with every matmul weight (and the embedding) in the compute dtype.

    For decoding loops, inside the jit before the loop: training checkpoints hold float32
    params, and `forward` casts them on each call; in a loop XLA does not hoist that cast, so
    every token read 4-byte weights (1b preset, batch 1: 2.4 instead of 1.2 ms per token).
    Logits are unchanged: forward casts the same values to the same dtype.
    """
    dtype = jnp.dtype(cfg.compute_dtype)
    params = unstack_layers(params)
    cast = {"embed": params["embed"].astype(dtype)}
    blocks = params.get("blocks")
    if isinstance(blocks, tuple):
        cast["blocks"] = tuple(_cast_weights(layer, dtype) for layer in blocks)
    elif blocks:
        cast["blocks"] = _cast_weights(blocks, dtype)
    if "moe_blocks" in params:
        cast["moe_blocks"] = _cast_weights(params["moe_blocks"], dtype)
    if "lm_head" in params:
        cast["lm_head"] = params["lm_head"].astype(dtype)
    return {**params, **cast}


def z_loss(logits: jax.Array, weight: float = 1e-4) -> jax.Array:
    """PaLM's auxiliary loss weight * mean(logsumexp(logits)^2) (Chowdhery et al. 2022, sec. 5)."""
    return weight * jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
