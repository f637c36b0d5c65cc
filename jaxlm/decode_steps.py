"""Which step decodes one token at batch 1, and the steps themselves as one interface.

`use_pallas_step` picks XLA's step (`model.forward` on one token), the fused Triton step
(pallas_kernels/fused_decode.py) or the chain step (pallas_kernels/chain_step.py, one
persistent Mosaic GPU kernel), by what runs and was measured faster on a Hopper GPU.
`token_stepper` hands `generate`'s loop and speculative decoding's draft the chosen step as
step(token, state, position) -> (logits, state). The kernels are imported on first use.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxlm import kv_cache, model
from jaxlm.config import ModelConfig


# The Pallas step beats XLA's end to end on an H200 at 125m (2.1x), 350m (2.2x) and 1b (embed
# 2048: 1.17x); larger models were not measured (docs/benchmarks.md, eleventh session).
PALLAS_STEP_MAX_EMBED = 2048


def measured_gpu() -> bool:
    """A Hopper GPU (compute capability 9.x: H100, H200), where the Pallas step was measured."""
    if jax.default_backend() != "gpu":
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def use_pallas_step(cfg: ModelConfig, batch: int, quantize_cache: bool = False,
                    mesh: Optional[Mesh] = None, requested: Optional[bool | str] = None):
    """Which Pallas step decode steps run as: "chain" (chain_step.py), True (fused_decode.py)
    or False (XLA's step). requested=None: where one can run and was measured faster on a
    Hopper GPU at batch 1 without a mesh: the chain step for bf16 models it takes, else the
    fused step up to embed_dim PALLAS_STEP_MAX_EMBED, else XLA's; True or "chain": that step,
    or a ValueError naming the reason it cannot run; False: XLA's step."""
    if requested is False:
        return False
    if requested == "chain":
        return _use_chain_step(cfg, batch, quantize_cache, mesh)
    if requested is None:
        if not (measured_gpu() and batch == 1 and mesh is None):
            return False
        if _chain_by_default(cfg, quantize_cache):
            return "chain"
        if cfg.embed_dim > PALLAS_STEP_MAX_EMBED:
            return False
    from pallas_kernels import fused_decode

    reason = fused_decode.unsupported(cfg, {"k_scale": None} if quantize_cache else {}, batch)
    if mesh is not None:
        reason = "; ".join(filter(None, [reason, "a mesh (it runs on one device)"]))
    if reason and requested:
        raise ValueError(f"pallas_step=True cannot run this request: {reason}; "
                         "use pallas_step=False (or None: where it can run and is faster)")
    return reason is None


def _chain_by_default(cfg: ModelConfig, quantize_cache: bool) -> bool:
    """Whether the default takes the chain step (on a Hopper GPU, batch 1, no mesh): where it
    runs and the model computes in bf16 (the chain rounds its weights and activations to
    bf16). It beat the fused step end to end on an H200: 1b 0.83 vs 1.02 ms a token, 125m
    0.18-0.19 vs 0.25 (docs/benchmarks.md, eighteenth session)."""
    return (jnp.dtype(cfg.compute_dtype) == jnp.dtype(jnp.bfloat16)
            and _chain_reason(cfg, 1, quantize_cache, None) is None)


# On CPU the chain step runs in Mosaic GPU's interpreter, its warpgroups as threads that poll
# each other. On a 2-core host, generate's loop with it never finished with 1-4 emulated host
# devices and ran with 5-8 (the tests run with 8): refused below 8 instead of hanging.
INTERPRETER_MIN_DEVICES = 8


def _chain_reason(cfg: ModelConfig, batch: int, quantize_cache: bool, mesh) -> Optional[str]:
    """Why chain_step cannot run this request (checked with the model's longest cache), or
    None."""
    from pallas_kernels import chain_step

    reason = chain_step.unsupported(cfg, batch, cfg.max_seq_len, quantize_cache,
                                    num_ctas=None if measured_gpu() else 2)
    if jax.default_backend() == "gpu" and not measured_gpu():  # (elsewhere: the interpreter)
        reason = "; ".join(filter(None, [reason, "a GPU other than Hopper (H100, H200)"]))
    if jax.default_backend() == "cpu" and jax.device_count() < INTERPRETER_MIN_DEVICES:
        reason = "; ".join(filter(None, [reason, (
            f"its CPU interpreter with {jax.device_count()} host device(s): set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={INTERPRETER_MIN_DEVICES} "
            "before JAX starts")]))
    if mesh is not None:
        reason = "; ".join(filter(None, [reason, "a mesh (it runs on one device)"]))
    return reason


def _use_chain_step(cfg: ModelConfig, batch: int, quantize_cache: bool, mesh) -> str:
    """"chain" where chain_step can run this request, else a ValueError with the reasons."""
    reason = _chain_reason(cfg, batch, quantize_cache, mesh)
    if reason:
        raise ValueError(f"pallas_step='chain' cannot run this request: {reason}; use "
                         "pallas_step=None or False")
    return "chain"


def token_stepper(cfg, params, inference, cache, cache_len, pallas_step):
    """One-token decode steps after prefill, inside a jitted loop: (step, state) with
    step(token [B], state, position) -> (logits [B, V], state). position is the token's index
    (a scalar: batch 1), read by the chain step only, whose state holds its own copy of the
    cache: entries past position are never read. The other steps' state is the model's cache.
    `rewind` cuts either back after rejected tokens.
    params: as given (the Pallas steps make their own copies); inference: model.inference_params.
    """
    if pallas_step == "chain":
        weights = _chain_prepare(cfg, params, cache_len)
        return functools.partial(_chain_decode, weights), _chain_state(weights, cache)
    if pallas_step:
        weights, plan = _pallas_weights(cfg, params), pallas_plan(cfg, cache)
        return (lambda token, state, _: _pallas_decode(cfg, plan, weights, token, state)), cache

    def xla_step(token, state, _):
        logits, state = model.forward(cfg, inference, token[:, None], cache=state)
        return logits[:, 0], state

    return xla_step, cache


def rewind(pallas_step, state, lengths: jax.Array):
    """token_stepper's state with each sequence's cache cut back to `lengths` [B] (entries past
    them are overwritten before they are read): the chain step's state as it is, since the
    position it is given is all it reads by; the model's cache by kv_cache.set_lengths."""
    return state if pallas_step == "chain" else kv_cache.set_lengths(state, lengths)


def _chain_prepare(cfg: ModelConfig, params: dict, cache_len: int):
    from pallas_kernels import chain_step

    gpu = measured_gpu()
    return chain_step.prepare(cfg, params, cache_len, interpret=not gpu)


def _chain_state(step, cache: dict) -> dict:
    from pallas_kernels import chain_step

    return chain_step.init_state(step, cache)


def _chain_decode(step, token, state, position):
    from pallas_kernels import chain_step

    return chain_step.decode_token(step, token, state, position)


def _pallas_weights(cfg: ModelConfig, params: dict) -> dict:
    from pallas_kernels import fused_decode

    return fused_decode.prepare(cfg, params)


def pallas_plan(cfg: ModelConfig, cache: dict):
    """The Pallas step's plan: on GPU over all SMs, elsewhere in interpret mode (tests)."""
    from pallas_kernels import fused_decode

    return fused_decode.make_plan(cfg, cache, interpret=jax.default_backend() != "gpu")


def _pallas_decode(cfg, plan, weights, token, cache):
    """One Pallas decode step (token [1]) -> logits [1, V] and the cache: one launch on GPU,
    one kernel per stage in interpret mode (there a barrier would wait forever)."""
    from pallas_kernels import fused_decode

    return fused_decode.decode_token(cfg, weights, token, cache, plan=plan,
                                     one_launch=not plan.interpret)


pallas_step_jit = jax.jit(_pallas_decode, static_argnums=(0, 1), donate_argnums=4)
chain_step_jit = jax.jit(_chain_decode, donate_argnums=2)
chain_prepare_jit = jax.jit(_chain_prepare, static_argnums=(0, 2))
chain_state_jit = jax.jit(_chain_state)
pallas_weights_jit = jax.jit(_pallas_weights, static_argnums=0)


