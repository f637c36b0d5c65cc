"""KV-cached autoregressive decoding: sampling, batched generation, streaming, speculative decoding.

    tokens = generate(cfg, params, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.0)
    for token in stream(cfg, params, [1, 2, 3], max_new_tokens=32): ...
    tokens, stats = speculative_generate(cfg, params, draft_cfg, draft_params, prompts, gamma=4,
                                         max_new_tokens=32)

Building blocks, all pure and built on `model.forward` (no second copy of the model):
`init_cache` (kv_cache.init_cache), `prefill(cfg, params, tokens, cache, lengths)` and
`decode_step(cfg, params, tokens, cache)`, both jitted with the cache donated, and
`sample(logits, key, sampling)`.

Prompts of different lengths are right-padded into one [B, T] batch; each sequence's cache length
is its own prompt length after prefill (kv_cache.py), so every sequence appends at its own slot.
`generate` runs prefill and the whole token loop in one jit, stopping when every sequence has
emitted eos or max_new_tokens tokens. The stop check (a while loop's predicate, which the GPU
hands to the host) comes every STEPS_PER_CHECK steps for one prompt, every step for a batch,
and not at all without eos_id. Only `stream` loops in Python, to hand each token over as it is made.

Sampling: logits / temperature, then top-k (keep the k largest), then top-p (keep the smallest
set of most likely tokens whose probability reaches p), then a categorical draw; temperature 0 is
greedy (argmax). Step i of every loop draws with `fold_in(key(seed), i)`, so `stream` and
`generate` give the same tokens for the same seed.

Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", sec. 2.3; Chen et al. 2023): a draft model proposes gamma tokens x_i ~ q_i; the target
scores all gamma + 1 positions in one forward; x_i is accepted with probability min(1, p_i/q_i),
the first rejection is replaced by a draw from normalize(max(0, p - q)), and when all gamma are
accepted a bonus token is drawn from p_gamma. The output has exactly the target's distribution
(with the same temperature / top-k / top-p filtering applied to both models).

The result of `generate` holds the new tokens only, up to and including eos.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlm import kv_cache, model, sharding
from jaxlm.config import ModelConfig

PAD = -1  # marks "no token" in the output buffers
CACHE_MULTIPLE = 64  # cache lengths are rounded up to this, so similar requests share programs
PROMPT_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from logits (hashable: a static argument of jit)."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    # Ids >= vocab_limit are never chosen: a model whose vocab is padded beyond its tokenizer's
    # (e.g. 50304 for GPT-2's 50257, or a BPE that stopped merging early) cannot emit ids the
    # tokenizer has no text for.
    vocab_limit: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---------------------------------------------------------------------------------------------
# Sampling


def restrict_vocab(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """logits with -inf at ids >= sampling.vocab_limit; [..., V]."""
    if sampling.vocab_limit is None or sampling.vocab_limit >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < sampling.vocab_limit, logits, -jnp.inf)


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """float32 logits / temperature with -inf outside the top-k and top-p sets (and at ids >=
    vocab_limit); [..., V]."""
    logits = restrict_vocab(logits.astype(jnp.float32), sampling) / sampling.temperature
    if sampling.top_k is not None:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)  # the first always stays
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def probabilities(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The distribution [..., V] that `sample` draws from (one-hot of the argmax if greedy)."""
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(restrict_vocab(logits, sampling), axis=-1), logits.shape[-1],
                              dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits, sampling), axis=-1)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token id per row of logits [B, V] -> [B] int32."""
    if sampling.greedy:
        return jnp.argmax(restrict_vocab(logits, sampling), axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Building blocks


def init_cache(cfg: ModelConfig, batch: int, max_len: int, mesh: Optional[Mesh] = None, *,
               quantize: bool = False) -> dict:
    """An empty KV cache (kv_cache.py), sharded by kv_cache.CACHE_AXES when a mesh is given."""
    return kv_cache.init_cache(cfg, batch, max_len, mesh=mesh, quantize=quantize)


def _prefill(cfg, params, tokens, cache, lengths):
    start = cache["lengths"]
    logits, cache = model.forward(cfg, params, tokens, cache=cache)
    if lengths is None:
        return logits[:, -1], cache
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last, kv_cache.set_lengths(cache, start + lengths)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def prefill(cfg: ModelConfig, params: dict, tokens: jax.Array, cache: dict,
            lengths: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """Append right-padded prompts tokens [B, T] (real lengths [B], default T) to the cache.

    Returns the logits [B, V] after each prompt's last real token and the cache, whose lengths
    grow by each prompt's real length (the padded slots are overwritten later).
    """
    return _prefill(cfg, params, tokens, cache, lengths)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def decode_step(cfg: ModelConfig, params: dict, tokens: jax.Array, cache: dict
                ) -> tuple[jax.Array, dict]:
    """Append tokens [B, T] (T = 1 for a decode step) -> logits [B, T, V] and the cache.

    In a loop, pass `model.inference_params(cfg, params)` (made once): stacked layers cost a
    copy of every layer's weights per step on GPU, float32 weights a cast per step.
    """
    return model.forward(cfg, params, tokens, cache=cache)


_inference_params = jax.jit(model.inference_params, static_argnums=0)


# ---------------------------------------------------------------------------------------------
# Requests


def check_request(cfg: ModelConfig, prompts, max_new_tokens: int, sampling: Sampling,
                  eos_id: Optional[int] = None) -> None:
    """Raise ValueError naming the problem with a generation request."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        ids = np.asarray(prompt)
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1:
            raise ValueError(f"prompt {i} must be a list of integer token ids")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token id {int(ids.min() if ids.min() < 0 else ids.max())}"
                             f" outside the vocabulary [0, {cfg.vocab_size})")
        if len(prompt) + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens="
                             f"{max_new_tokens} that is {len(prompt) + max_new_tokens} > "
                             f"max_seq_len={cfg.max_seq_len}")
    if not np.isfinite(sampling.temperature) or sampling.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {sampling.temperature}")
    if sampling.top_k is not None and not 1 <= sampling.top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={cfg.vocab_size}], got {sampling.top_k}")
    if sampling.top_p is not None and not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    if sampling.vocab_limit is not None and not 1 <= sampling.vocab_limit <= cfg.vocab_size:
        raise ValueError(f"vocab_limit must be in [1, vocab_size={cfg.vocab_size}], got {sampling.vocab_limit}")


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _batch(prompts, mesh: Optional[Mesh], extra_slots: int, max_new_tokens: int):
    """Right-padded tokens [B, T], lengths [B], the cache length, and which rows are real: B
    is padded to the mesh's batch shards with one-token dummy prompts ([B] bool, False for
    those; None when there are none)."""
    shards = 1 if mesh is None else sharding.batch_shards(mesh)
    batch = _round_up(len(prompts), shards)
    longest = max(len(p) for p in prompts)
    cache_len = _round_up(longest + max_new_tokens + extra_slots, CACHE_MULTIPLE)
    tokens = np.zeros((batch, _round_up(longest, PROMPT_MULTIPLE)), np.int32)
    lengths = np.ones((batch,), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = prompt
        lengths[i] = len(prompt)
    real = None if batch == len(prompts) else jnp.arange(batch) < len(prompts)
    return jnp.asarray(tokens), jnp.asarray(lengths), cache_len, real


def _trim(row: np.ndarray, count: int, max_new_tokens: int, eos_id: Optional[int]) -> list[int]:
    out = [int(t) for t in row[:min(count, max_new_tokens)] if t != PAD]
    if eos_id is not None and eos_id in out:
        out = out[:out.index(eos_id) + 1]
    return out


# ---------------------------------------------------------------------------------------------
# Generation


def _is_eos(tokens: jax.Array, eos_id: Optional[int]) -> jax.Array:
    return jnp.zeros(tokens.shape, bool) if eos_id is None else tokens == eos_id


def _new_cache(cfg: ModelConfig, batch: int, cache_len: int, quantize: bool) -> dict:
    """An empty cache made inside a jit, sharded by CACHE_AXES on the mesh set (if any)."""
    cache = kv_cache.init_cache(cfg, batch, cache_len, quantize=quantize)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return cache
    return {name: jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(kv_cache.CACHE_AXES[name])))
        for name, x in cache.items()}


def _token_log_prob(logits: jax.Array, token: jax.Array) -> jax.Array:
    """log softmax(logits)[token] per row: the model's own log-prob (temperature 1, unfiltered)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


# Decode steps between two checks of the loop's stop condition (eos). A check is a while loop's
# predicate, which XLA on a GPU copies to the host and waits for before it launches the next
# step (0.018-0.025 ms on an H200); steps in between run as a loop of known length, which it
# queues without a wait. The price is up to STEPS_PER_CHECK - 1 steps after the last eos. At
# batch 1 a step is short (0.19 ms at 125m), so the wait is 10% of it: check every 8. A batch
# steps for longer (a GRPO rollout: milliseconds), where the wait is ~1% and the steps after
# eos would cost more than it saves: check every step.
STEPS_PER_CHECK = 8
BATCHED_STEPS_PER_CHECK = 1


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5),
                   static_argnames=("with_log_probs", "pallas_step", "steps_per_check"))
def _generate_loop(cfg, sampling, max_new_tokens, eos_id, cache_len, quantize, params, tokens,
                   lengths, key, real, with_log_probs=False, pallas_step=False,
                   steps_per_check=STEPS_PER_CHECK):
    """Prefill, then decode until every sequence is done; [B, max_new_tokens] with PAD after.

    real: None, or [B] bool, False for the mesh's padding rows, which count as done from the
    start (their tokens are PAD; they neither keep the loop going nor raise the overflow
    error). None without padding, so the loop's done flags stay constants without eos_id.

    steps_per_check: decode steps between two checks whether every sequence is done (with no
    eos_id, one loop of known length). Up to steps_per_check - 1 steps may run after the last
    sequence ends; their tokens are PAD like any after eos.

    Also returns the first new token's index whose logits held NaN or inf in a sequence not
    yet done (-1 if none): carried through the loop, not a stop condition (a stop flag would
    add a host wait a step; docs/design.md), so generate raises once the loop is over.

    with_log_probs: also [B, max_new_tokens] float32 log-probs of the emitted tokens (0 after).
    pallas_step: decode steps (not prefill) by pallas_kernels/fused_decode.py (batch 1): its
    one-launch form on GPU, one kernel per stage in interpret mode elsewhere; "chain": by
    pallas_kernels/chain_step.py (Mosaic GPU; its interpreter elsewhere).
    """
    inference = model.inference_params(cfg, params)  # one copy per call, none per step
    cache = _new_cache(cfg, tokens.shape[0], cache_len, quantize)
    logits, cache = _prefill(cfg, inference, tokens, cache, lengths)
    first_position = cache["lengths"][0]
    decode_one, cache = _token_stepper(cfg, params, inference, cache, cache_len, pallas_step)
    token = sample(logits, jax.random.fold_in(key, 0), sampling)
    padding = jnp.zeros(token.shape, bool) if real is None else ~real
    first_bad = jnp.where(_non_finite_rows(logits, padding), 0, -1)
    out = jnp.full((tokens.shape[0], max_new_tokens), PAD, jnp.int32).at[:, 0].set(
        jnp.where(padding, PAD, token))
    log_probs = jnp.zeros(out.shape, jnp.float32)
    if with_log_probs:
        log_probs = log_probs.at[:, 0].set(_token_log_prob(logits, token))

    def body(state):
        step, token, done, out, log_probs, first_bad, cache = state
        logits, cache = decode_one(token, cache, first_position + step - 1)
        token = sample(logits, jax.random.fold_in(key, step), sampling)
        first_bad = jnp.where((first_bad < 0) & _non_finite_rows(logits, done), step, first_bad)
        out = out.at[:, step].set(jnp.where(done, PAD, token))
        if with_log_probs:
            log_probs = log_probs.at[:, step].set(
                jnp.where(done, 0.0, _token_log_prob(logits, token)))
        done = done | _is_eos(token, eos_id)
        return step + 1, token, done, out, log_probs, first_bad, cache

    def run(state, count: int):  # count steps, a loop of known length
        return jax.lax.fori_loop(0, count, lambda _, s: body(s), state) if count else state

    state = (jnp.int32(1), token, _is_eos(token, eos_id) | padding, out, log_probs, first_bad,
             cache)
    steps = max_new_tokens - 1
    if eos_id is None:
        state = run(state, steps)
    else:
        block = max(1, min(steps_per_check, steps))
        blocks, rest = divmod(steps, block)
        state = jax.lax.while_loop(lambda s: (s[0] < 1 + blocks * block) & ~jnp.all(s[2]),
                                   lambda s: run(s, block), state)
        state = jax.lax.cond(jnp.all(state[2]), lambda s: s, lambda s: run(s, rest), state)
    return (state[3], state[4], state[5]) if with_log_probs else (state[3], state[5])


def _token_stepper(cfg, params, inference, cache, cache_len, pallas_step):
    """One-token decode steps after prefill, inside a jitted loop: (step, state) with
    step(token [B], state, position) -> (logits [B, V], state). position is the token's index
    (a scalar: batch 1), read by the chain step only, whose state holds its own copy of the
    cache: entries past position are never read, so a caller rolls it back by position alone.
    The other steps' state is the model's cache (kv_cache.set_lengths rolls it back).
    params: as given (the Pallas steps make their own copies); inference: model.inference_params.
    """
    if pallas_step == "chain":
        weights = _chain_prepare(cfg, params, cache_len)
        return functools.partial(_chain_decode, weights), _chain_state(weights, cache)
    if pallas_step:
        weights, plan = _pallas_weights(cfg, params), _pallas_plan(cfg, cache)
        return (lambda token, state, _: _pallas_decode(cfg, plan, weights, token, state)), cache

    def xla_step(token, state, _):
        logits, state = model.forward(cfg, inference, token[:, None], cache=state)
        return logits[:, 0], state

    return xla_step, cache


def generate(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: int = 0, eos_id: Optional[int] = None,
             mesh: Optional[Mesh] = None, quantize_cache: bool = False,
             return_log_probs: bool = False, vocab_limit: Optional[int] = None,
             pallas_step: Optional[bool | str] = None):
    """The new tokens of each prompt (up to max_new_tokens, ending at eos_id when it comes).

    temperature 0 is greedy. mesh: params sharded on it (model.param_shardings); the cache is
    created sharded and the batch is padded to a multiple of data x fsdp x expert. quantize_cache: int8.
    return_log_probs: return (tokens, log_probs), log_probs[i][j] = log p(tokens[i][j]) under the
    model itself (log_softmax of the raw logits: temperature, top-k and top-p not applied), the
    quantity an RL trainer recomputes (jaxlm/align). vocab_limit: never emit ids >= it (pass
    the tokenizer's size when the model's vocab is padded beyond it). pallas_step: run the
    decode steps (prefill stays on `model.forward`) as one Pallas kernel each instead of XLA's
    ~275 launches; one prompt, no mesh (on CPU they run in an interpreter: for tests, slow).
    "chain": pallas_kernels/chain_step.py, one persistent Mosaic GPU kernel (Hopper; head_dim
    64, a bf16 cache of its own, its weights in bf16). True: pallas_kernels/fused_decode.py
    (Triton; a bf16/float32 cache). None (default): where one was measured faster
    (`use_pallas_step`: the chain step for bf16 models it takes, else the fused step up to
    embed 2048). False: XLA's step. An explicit choice that cannot run is a ValueError.
    """
    sampling = Sampling(float(temperature), top_k, top_p, vocab_limit)
    check_request(cfg, prompts, max_new_tokens, sampling, eos_id)
    check_finite_weights(params)
    pallas_step = use_pallas_step(cfg, len(prompts), quantize_cache, mesh, pallas_step)
    tokens, lengths, cache_len, real = _batch(prompts, mesh, 0, max_new_tokens)
    with _maybe_mesh(mesh):
        out = _generate_loop(cfg, sampling, max_new_tokens, eos_id, cache_len, quantize_cache,
                             params, tokens, lengths, jax.random.key(seed), real,
                             with_log_probs=return_log_probs, pallas_step=pallas_step,
                             steps_per_check=(STEPS_PER_CHECK if len(prompts) == 1
                                              else BATCHED_STEPS_PER_CHECK))
    out, log_probs, first_bad = (out if return_log_probs else (out[0], None, out[1]))
    if int(first_bad) >= 0:
        raise ValueError(_overflow_message(int(first_bad)))
    out = np.asarray(out)
    log_probs = None if log_probs is None else np.asarray(log_probs)
    results = [_trim(out[i], max_new_tokens, max_new_tokens, eos_id) for i in range(len(prompts))]
    if not return_log_probs:
        return results
    return results, [[float(x) for x in log_probs[i, :len(row)]] for i, row in enumerate(results)]


# The Pallas step beats XLA's end to end on an H200 at 125m (2.1x), 350m (2.2x) and 1b (embed
# 2048: 1.17x); larger models were not measured (docs/benchmarks.md, eleventh session).
PALLAS_STEP_MAX_EMBED = 2048


def _measured_gpu() -> bool:
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
        if not (_measured_gpu() and batch == 1 and mesh is None):
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
                                    num_ctas=None if _measured_gpu() else 2)
    if jax.default_backend() == "gpu" and not _measured_gpu():  # (elsewhere: the interpreter)
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


_sample_checked = jax.jit(lambda logits, key, sampling: (
    sample(logits, key, sampling), jnp.isfinite(logits).all()), static_argnums=2)
_non_finite = jax.jit(lambda params: jax.tree.map(lambda x: ~jnp.all(jnp.isfinite(x)), params))


def _non_finite_rows(logits: jax.Array, done: jax.Array) -> jax.Array:
    """Whether any sequence not yet done has a NaN or inf logit (a scalar)."""
    return jnp.any(~jnp.all(jnp.isfinite(logits), axis=-1) & ~done)


def _overflow_message(step: int) -> str:
    return (f"the model's logits held NaN or inf at new token {step} (finite weights: an "
            "activation overflowed, e.g. float16 compute or absurd weight scales). Check the "
            "checkpoint, or compute in bfloat16 or float32")


def check_finite_weights(params: dict) -> None:
    """A ValueError naming the weights that hold NaN or inf (one jitted pass, about one
    decode step's reading). Every decoding entry point checks: with such weights XLA's and
    the fused step sample from NaN logits (argmax picks an arbitrary token, silently), and
    the chain step's stages, which read NaN as "not written yet", would wait for each other
    until their polls give up."""
    flags = jax.tree_util.tree_flatten_with_path(_non_finite(params))[0]
    bad = [jax.tree_util.keystr(path) for path, flag in flags if bool(flag)]
    if bad:
        raise ValueError(f"the weights hold NaN or inf in {', '.join(bad[:5])}"
                         f"{' and more' if len(bad) > 5 else ''}: a diverged or damaged "
                         "checkpoint? Load a good one")


def _chain_prepare(cfg: ModelConfig, params: dict, cache_len: int):
    from pallas_kernels import chain_step

    gpu = _measured_gpu()
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


def _pallas_plan(cfg: ModelConfig, cache: dict):
    """The Pallas step's plan: on GPU over all SMs, elsewhere in interpret mode (tests)."""
    from pallas_kernels import fused_decode

    return fused_decode.make_plan(cfg, cache, interpret=jax.default_backend() != "gpu")


def _pallas_decode(cfg, plan, weights, token, cache):
    """One Pallas decode step (token [1]) -> logits [1, V] and the cache: one launch on GPU,
    one kernel per stage in interpret mode (there a barrier would wait forever)."""
    from pallas_kernels import fused_decode

    return fused_decode.decode_token(cfg, weights, token, cache, plan=plan,
                                     one_launch=not plan.interpret)


_pallas_step = jax.jit(_pallas_decode, static_argnums=(0, 1), donate_argnums=4)
_chain_step = jax.jit(_chain_decode, donate_argnums=2)
_chain_prepare_jit = jax.jit(_chain_prepare, static_argnums=(0, 2))
_chain_state_jit = jax.jit(_chain_state)
_pallas_weights_jit = jax.jit(_pallas_weights, static_argnums=0)


def _maybe_mesh(mesh: Optional[Mesh]):
    import contextlib

    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def stream(cfg: ModelConfig, params: dict, prompt: Sequence[int], *, max_new_tokens: int,
           temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           seed: int = 0, eos_id: Optional[int] = None,
           quantize_cache: bool = False, vocab_limit: Optional[int] = None,
           pallas_step: Optional[bool | str] = None) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are made (same tokens as `generate`).

    pallas_step: which step decodes, as in `generate`. A step whose logits hold NaN or inf
    stops the stream with a ValueError (generate raises the same after its loop); the check
    rides on the sync each token needs anyway."""
    sampling = Sampling(float(temperature), top_k, top_p, vocab_limit)
    check_request(cfg, [prompt], max_new_tokens, sampling, eos_id)
    check_finite_weights(params)
    pallas_step = use_pallas_step(cfg, 1, quantize_cache, None, pallas_step)
    tokens, lengths, cache_len, _ = _batch([prompt], None, 0, max_new_tokens)
    cache = init_cache(cfg, 1, cache_len, quantize=quantize_cache)
    key = jax.random.key(seed)
    chain = pallas_step == "chain"
    if chain:
        weights = _chain_prepare_jit(cfg, params, cache_len)
    elif pallas_step:
        weights, plan = _pallas_weights_jit(cfg, params), _pallas_plan(cfg, cache)
    params = _inference_params(cfg, params)  # per-layer, compute dtype: no copies per step
    logits, cache = prefill(cfg, params, tokens, cache, lengths)
    if chain:
        position, cache = int(cache["lengths"][0]), _chain_state_jit(weights, cache)
    for step in range(max_new_tokens):
        token, finite = _sample_checked(logits, jax.random.fold_in(key, step), sampling)
        value, finite = jax.device_get((token[0], finite))
        if not finite:
            raise ValueError(_overflow_message(step))
        value = int(value)
        yield value
        if value == eos_id or step + 1 == max_new_tokens:
            return
        if chain:
            logits, cache = _chain_step(weights, token, cache, jnp.int32(position + step))
        elif pallas_step:
            logits, cache = _pallas_step(cfg, plan, weights, token, cache)
        else:
            logits, cache = decode_step(cfg, params, token[:, None], cache)
            logits = logits[:, 0]


# ---------------------------------------------------------------------------------------------
# Speculative decoding


def _verify(p, q, drafted, key):
    """Accept/reject drafted [B, gamma] with target p [B, gamma+1, V], draft q [B, gamma, V].

    Returns the number accepted [B] and the token after them [B]: a draw from
    normalize(max(0, p_a - q_a)) at the first rejection a, or from p_gamma if all are accepted.
    """
    batch, gamma = drafted.shape
    accept_key, resample_key = jax.random.split(key)
    p_x = jnp.take_along_axis(p[:, :gamma], drafted[..., None], -1)[..., 0]
    q_x = jnp.take_along_axis(q, drafted[..., None], -1)[..., 0]
    # r < p/q written without the division (q_x > 0: x was drawn from q).
    accepted = jax.random.uniform(accept_key, (batch, gamma)) * q_x < p_x
    num_accepted = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1)
    q_next = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q_gamma = 0: bonus from p
    p_a = jnp.take_along_axis(p, num_accepted[:, None, None], 1)[:, 0]
    q_a = jnp.take_along_axis(q_next, num_accepted[:, None, None], 1)[:, 0]
    residual = jnp.maximum(p_a - q_a, 0.0)
    total = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p_a)
    token = jax.random.categorical(resample_key, jnp.log(residual), axis=-1).astype(jnp.int32)
    return num_accepted, token


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6), static_argnames="pallas_step")
def _speculative_loop(target_cfg, draft_cfg, sampling, gamma, max_new_tokens, eos_id, cache_len,
                      target_params, draft_params, tokens, lengths, key, real, pallas_step=False):
    """As _generate_loop (real, and the first overflowed new token or -1, included), with a
    draft proposing gamma tokens a target forward; pallas_step: the draft's decode steps."""
    target_params = model.inference_params(target_cfg, target_params)
    draft_inference = model.inference_params(draft_cfg, draft_params)
    target_cache = _new_cache(target_cfg, tokens.shape[0], cache_len, False)
    draft_cache = _new_cache(draft_cfg, tokens.shape[0], cache_len, False)
    logits, target_cache = _prefill(target_cfg, target_params, tokens, target_cache, lengths)
    _, draft_cache = _prefill(draft_cfg, draft_inference, tokens, draft_cache, lengths)
    draft_one, draft_cache = _token_stepper(draft_cfg, draft_params, draft_inference, draft_cache,
                                            cache_len, pallas_step)
    batch = tokens.shape[0]
    token = sample(logits, jax.random.fold_in(key, 0), sampling)
    width = max_new_tokens + gamma + 1
    padding = jnp.zeros(token.shape, bool) if real is None else ~real
    first_bad = jnp.where(_non_finite_rows(logits, padding), 0, -1)
    out = jnp.full((batch, width), PAD, jnp.int32).at[:, 0].set(jnp.where(padding, PAD, token))
    count = jnp.ones((batch,), jnp.int32)
    done = _is_eos(token, eos_id) | (count >= max_new_tokens) | padding

    def draft(carry, step_key):
        token, cache, position = carry
        logits, cache = draft_one(token, cache, position)
        token = sample(logits, step_key, sampling)
        return (token, cache, position + 1), (token, probabilities(logits, sampling))

    def body(state):
        step, token, done, count, out, target_cache, draft_cache, accepted, drafted, first_bad = (
            state)
        keys = jax.random.split(jax.random.fold_in(key, step), gamma + 2)
        start = target_cache["lengths"]
        # gamma + 1 draft steps: the last one only writes x_{gamma-1} into the draft cache.
        (_, draft_cache, _), (xs, qs) = jax.lax.scan(draft, (token, draft_cache, start[0]),
                                                     keys[:gamma + 1])
        xs, qs = xs[:gamma].T, jnp.swapaxes(qs[:gamma], 0, 1)  # [B, gamma], [B, gamma, V]
        verify = jnp.concatenate([token[:, None], xs], axis=1)  # [B, gamma + 1]
        logits, target_cache = model.forward(target_cfg, target_params, verify, cache=target_cache)
        num_accepted, next_token = _verify(probabilities(logits, sampling), qs, xs, keys[-1])
        j = jnp.arange(gamma + 1)[None, :]
        emitted = jnp.where(j < num_accepted[:, None], jnp.pad(xs, ((0, 0), (0, 1))),
                            next_token[:, None])
        valid = (j <= num_accepted[:, None]) & ~done[:, None]
        # NaN or inf in the target's logits or the draft's probabilities at a window position
        # whose token is emitted (the rejection test there compares NaN): that new token,
        # count + j, is the first it spoils.
        bad = ~jnp.all(jnp.isfinite(logits), axis=-1) | jnp.pad(
            ~jnp.all(jnp.isfinite(qs), axis=-1), ((0, 0), (0, 1)))
        kept = valid & (count[:, None] + j < max_new_tokens)
        spoiled = jnp.min(jnp.where(bad & kept, count[:, None] + j, width))
        first_bad = jnp.where((first_bad < 0) & (spoiled < width), spoiled, first_bad)
        slots = jnp.where(valid, count[:, None] + j, width)  # width: dropped
        out = out.at[jnp.arange(batch)[:, None], slots].set(emitted, mode="drop")
        new_lengths = jnp.where(done, start, start + 1 + num_accepted)
        target_cache = kv_cache.set_lengths(target_cache, new_lengths)
        if pallas_step != "chain":  # (the chain's state is rolled back by position alone)
            draft_cache = kv_cache.set_lengths(draft_cache, new_lengths)
        accepted += jnp.sum(jnp.where(done, 0, num_accepted))
        drafted += jnp.sum(jnp.where(done, 0, gamma))
        count = count + jnp.where(done, 0, num_accepted + 1)
        token = jnp.where(done, token, next_token)
        done = done | jnp.any(valid & _is_eos(emitted, eos_id), axis=1) | (count >= max_new_tokens)
        return (step + 1, token, done, count, out, target_cache, draft_cache, accepted,
                drafted, first_bad)

    state = (jnp.int32(1), token, done, count, out, target_cache, draft_cache, jnp.int32(0),
             jnp.int32(0), first_bad)
    state = jax.lax.while_loop(lambda s: ~jnp.all(s[2]), body, state)
    step, _, _, count, out, _, _, accepted, drafted, first_bad = state
    return out, count, accepted, drafted, step - 1, first_bad


def speculative_generate(target_cfg: ModelConfig, target_params: dict, draft_cfg: ModelConfig,
                         draft_params: dict, prompts: Sequence[Sequence[int]], *, gamma: int = 4,
                         max_new_tokens: int, temperature: float = 1.0,
                         top_k: Optional[int] = None, top_p: Optional[float] = None,
                         seed: int = 0, eos_id: Optional[int] = None,
                         mesh: Optional[Mesh] = None, vocab_limit: Optional[int] = None,
                         pallas_step: Optional[bool | str] = None
                         ) -> tuple[list[list[int]], dict]:
    """`generate` with a draft model proposing `gamma` tokens per target forward.

    pallas_step: which step the draft's one-token steps run as, with `generate`'s choices and
    default (a Pallas step at batch 1 on a Hopper GPU: the chain step for bf16 drafts it takes);
    the target verifies gamma + 1 tokens a forward, always by `model.forward`.

    Returns the new tokens (distributed exactly as the target's `generate`; equal to its greedy
    output at temperature 0) and stats: acceptance_rate (accepted / drafted tokens),
    accepted, drafted, target_calls (verification forwards after prefill).
    """
    sampling = Sampling(float(temperature), top_k, top_p, vocab_limit)
    check_request(target_cfg, prompts, max_new_tokens, sampling, eos_id)
    check_request(draft_cfg, prompts, max_new_tokens, sampling, eos_id)
    check_finite_weights(target_params)
    check_finite_weights(draft_params)
    if target_cfg.vocab_size != draft_cfg.vocab_size:
        raise ValueError(f"the draft's vocab_size {draft_cfg.vocab_size} differs from the "
                         f"target's {target_cfg.vocab_size}")
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be a positive integer, got {gamma!r}")
    pallas_step = use_pallas_step(draft_cfg, len(prompts), False, mesh, pallas_step)
    tokens, lengths, cache_len, real = _batch(prompts, mesh, gamma + 1, max_new_tokens)
    with _maybe_mesh(mesh):
        out, count, accepted, drafted, calls, first_bad = _speculative_loop(
            target_cfg, draft_cfg, sampling, gamma, max_new_tokens, eos_id, cache_len,
            target_params, draft_params, tokens, lengths, jax.random.key(seed), real,
            pallas_step=pallas_step)
    if int(first_bad) >= 0:
        raise ValueError(_overflow_message(int(first_bad)))
    out, count = np.asarray(out), np.asarray(count)
    results = [_trim(out[i], int(count[i]), max_new_tokens, eos_id) for i in range(len(prompts))]
    accepted, drafted = int(accepted), int(drafted)
    stats = {"acceptance_rate": accepted / drafted if drafted else float("nan"),
             "accepted": accepted, "drafted": drafted, "target_calls": int(calls)}
    return results, stats


# ---------------------------------------------------------------------------------------------
# Tokenizers (the command line is in decode_cli.py)


def vocab_limit_of(cfg: ModelConfig, tokenizer) -> Optional[int]:
    """The tokenizer's id count when the model's vocab is larger (padded), else None.

    len() where the tokenizer has it (Hugging Face: counts added tokens, which its vocab_size
    leaves out), else `vocab_size` (a jaxlm Tokenizer), else None.
    """
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
    return size if isinstance(size, int) and size < cfg.vocab_size else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m jaxlm.decode`: see jaxlm/decode_cli.py."""
    from jaxlm import decode_cli  # imports this module: not at the top

    return decode_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
