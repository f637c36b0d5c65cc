"""A batch-1 decode step as one stage_chain call (pallas_kernels/stage_chain.py, Mosaic GPU):
a dense model's qkv, attention over the cache, o-proj, MLP and output layer, with its norms,
RoPE and residual stream, in one persistent kernel whose stages wait for each other by
polling. The default batch-1 step on Hopper for the bf16 models it takes (jaxlm.decode): on
an H200, 1b 0.826-0.828 ms a token end to end (71-72% of the copy bandwidth over the weights
and the cache it reads; XLA's step 1.24 ms), 125m 0.180-0.187 ms (docs/benchmarks.md,
eighteenth session).

    step = prepare(cfg, params, cache_len)        # tiled bf16 weights, norms, RoPE tables
    state = init_state(step, cache)               # the model cache -> the chain's state
    logits, state = decode_token(step, token, state, pos)

Numerics: weights in bf16, every activation in float32 except the x each product reads
(rounded to bf16 in the B tile) and the cache (bf16), so logits differ from `model.forward` in
bf16 by bf16's rounding of its activations (tests: the float32 model, within 2-3%).
On CPU (tests) it runs in Mosaic GPU's interpreter (two CTAs, unswizzled q rows): slow.
The weights must be finite: the stages take NaN for "not written yet", so a NaN spread by a
weight would keep them waiting forever (jaxlm.decode checks the weights before it runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jaxlm.layers import rope_inverse_frequencies
from pallas_kernels import stage_chain as sc
from pallas_kernels.fused_decode import dense_step_reasons


@dataclasses.dataclass(frozen=True)
class ChainStep:
    """What decode_token needs: the plan (static) and its arrays (a pytree of jax arrays)."""
    plan: sc.ChainPlan
    tiled: tuple
    norms: tuple
    rope: tuple
    embed: jax.Array
    interpret: bool


jax.tree_util.register_dataclass(ChainStep, data_fields=["tiled", "norms", "rope", "embed"],
                                 meta_fields=["plan", "interpret"])


def unsupported(cfg, batch: int, cache_len: int, quantize_cache: bool = False,
                num_ctas: Optional[int] = None) -> Optional[str]:
    """Why the chain step cannot run this request (None when it can)."""
    reasons = dense_step_reasons(cfg, batch, quantize_cache)
    if cfg.resolved_head_dim != sc.HEAD_DIM:
        reasons.append(f"head_dim {cfg.resolved_head_dim} (it takes {sc.HEAD_DIM})")
    if not reasons:
        try:
            plan = sc.chain_plan_for(cfg, prologues=True, max_len=cache_len, num_ctas=num_ctas)
        except ValueError as error:
            return str(error)
        problem = sc.check_plan(plan, plan.ctas or sc._num_sms())
        if problem:
            reasons.append(problem)
    return "; ".join(reasons) or None


def _chain_weights(cfg, params: dict):
    """(layer weights [L, out, in] bf16 per layer stage, None for attention; the head
    [V, D] bf16; the norm weights per stage, float32, None where a stage has none)."""
    blocks = params["blocks"]
    if isinstance(blocks, (list, tuple)):  # (model.unstack_layers' per-layer form)
        blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    attn, mlp = blocks["attn"], blocks["mlp"]
    L, D = attn["q"].shape[:2]
    bf16 = jnp.bfloat16

    def rows_cols(w):  # [L, D, ..., out] or [L, in..., D] -> [L, out, in] in bf16
        return w.reshape(L, -1, w.shape[-1]).transpose(0, 2, 1).astype(bf16)

    qkv = jnp.concatenate([attn[n].reshape(L, D, -1) for n in ("q", "k", "v")], -1)
    gate_up = jnp.concatenate([mlp["gate"], mlp["up"]], -1)
    o = attn["o"].reshape(L, -1, D)
    layer_ws = [rows_cols(qkv), None, rows_cols(o), rows_cols(gate_up), rows_cols(mlp["down"])]
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"].T
    norms = (blocks["attn_norm"], None, None, blocks["mlp_norm"], None, params["final_norm"])
    return layer_ws, head.astype(bf16), tuple(None if g is None else g.astype(jnp.float32)
                                              for g in norms)


def _inv_freq(cfg):
    return rope_inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)


def prepare(cfg, params: dict, cache_len: int, *, interpret: bool = False,
            num_ctas: Optional[int] = None) -> ChainStep:
    """The model's weights as the chain reads them (bf16, tiled; one copy per call).
    interpret: the form Mosaic GPU's interpreter runs (two CTAs, q rows unswizzled)."""
    if interpret:
        num_ctas = 2
    plan = sc.chain_plan_for(cfg, prologues=True, max_len=cache_len, num_ctas=num_ctas)
    if interpret:
        plan = dataclasses.replace(plan, swizzle_q=False)
    layer_ws, head, norms = _chain_weights(cfg, params)
    return ChainStep(plan, sc.tile_chain(plan, layer_ws, [head]), norms,
                     sc.rope_tables(plan, _inv_freq(cfg)), params["embed"], interpret)


def reference_logits(cfg, params: dict, token: int, cache: dict, pos: int, cache_len: int,
                     like_kernel: bool = True):
    """The step's logits [V] by stage_chain_reference from the same bf16 weights and cache
    (batch 1, positions < pos): with like_kernel, rounded where the kernel rounds, so the
    kernel should agree to float32 summation order (the tests' tight check)."""
    plan = sc.chain_plan_for(cfg, prologues=True, max_len=cache_len, num_ctas=2)
    layer_ws, head, norms = _chain_weights(cfg, params)
    kv = tuple(cache[name][:, 0].astype(jnp.bfloat16) for name in ("k", "v"))
    x0 = params["embed"][token].astype(jnp.float32)
    return sc.stage_chain_reference(plan, layer_ws, [head], x0, list(norms), cache=kv, pos=pos,
                                    inv_freq=_inv_freq(cfg), like_kernel=like_kernel)[1][-1]


def init_state(step: ChainStep, cache: dict) -> dict:
    """The chain's state from a batch-1 model cache ({"k", "v"} [L, 1, K, S, H]): its k and v
    in bf16, padded to the plan's chunks (the chain extends its own copy)."""
    att = step.plan.layer[step.plan.attention]
    size = att.chunks * sc.CHUNK

    def convert(x):
        x = x[:, 0].astype(jnp.bfloat16)
        return jnp.pad(x, ((0, 0), (0, 0), (0, size - x.shape[2]), (0, 0)))

    return sc.init_chain_state(step.plan, (convert(cache["k"]), convert(cache["v"])))


def decode_token(step: ChainStep, token, state: dict, pos):
    """One decode step: token [1] at position pos (the cache holds the positions before it)
    -> (logits [1, V] float32, the new state)."""
    x0 = jnp.take(step.embed, token[0], axis=0).astype(jnp.float32)
    context = contextlib.nullcontext()
    if step.interpret:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        context = plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=False))
    with context:
        (_, tails), state = sc.stage_chain(step.plan, step.tiled, x0, norms=list(step.norms),
                                           state=state, pos=pos, rope=step.rope,
                                           interpret=step.interpret)
    return tails[-1][None], state
