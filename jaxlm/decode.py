"""KV-cached autoregressive decoding: batched generation, streaming, speculative decoding.

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

Sampling (jaxlm/sampling.py): temperature, top-k, top-p; temperature 0 is greedy. Step i of
every loop draws with `fold_in(key(seed), i)`, so `stream` and `generate` give the same tokens
for the same seed. Which step decodes a token at batch 1 (XLA's, the fused Triton step or the
chain step) is jaxlm/decode_steps.py's choice.

Speculative decoding (`speculative_generate`) lives in jaxlm/speculative.py and is reachable
from here.

The result of `generate` holds the new tokens only, up to and including eos.
"""

from __future__ import annotations

import functools
import sys
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlm import decode_steps, kv_cache, model, sharding
from jaxlm.config import ModelConfig
from jaxlm.decode_steps import PALLAS_STEP_MAX_EMBED, use_pallas_step
from jaxlm.sampling import Sampling, filter_logits, probabilities, restrict_vocab, sample

# (and speculative_generate, from jaxlm/speculative.py on first use: __getattr__ below)
__all__ = ["generate", "stream", "init_cache", "prefill", "decode_step", "check_request",
           "check_finite_weights", "vocab_limit_of", "use_pallas_step", "PALLAS_STEP_MAX_EMBED",
           "Sampling", "sample", "probabilities", "filter_logits", "restrict_vocab"]

PAD = -1  # marks "no token" in the output buffers
CACHE_MULTIPLE = 64  # cache lengths are rounded up to this, so similar requests share programs
PROMPT_MULTIPLE = 16


# ---------------------------------------------------------------------------------------------
# Building blocks


def init_cache(cfg: ModelConfig, batch: int, max_len: int, mesh: Optional[Mesh] = None, *,
               quantize: bool = False) -> dict:
    """An empty KV cache (kv_cache.py), sharded by kv_cache.CACHE_AXES when a mesh is given."""
    return kv_cache.init_cache(cfg, batch, max_len, mesh=mesh, quantize=quantize)


def prefill_traced(cfg, params, tokens, cache, lengths):
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
    return prefill_traced(cfg, params, tokens, cache, lengths)


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


def batch_prompts(prompts, mesh: Optional[Mesh], extra_slots: int, max_new_tokens: int):
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


def trim_row(row: np.ndarray, count: int, max_new_tokens: int, eos_id: Optional[int]) -> list[int]:
    out = [int(t) for t in row[:min(count, max_new_tokens)] if t != PAD]
    if eos_id is not None and eos_id in out:
        out = out[:out.index(eos_id) + 1]
    return out


# ---------------------------------------------------------------------------------------------
# Generation


def is_eos(tokens: jax.Array, eos_id: Optional[int]) -> jax.Array:
    return jnp.zeros(tokens.shape, bool) if eos_id is None else tokens == eos_id


def new_cache(cfg: ModelConfig, batch: int, cache_len: int, quantize: bool) -> dict:
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
    cache = new_cache(cfg, tokens.shape[0], cache_len, quantize)
    logits, cache = prefill_traced(cfg, inference, tokens, cache, lengths)
    first_position = cache["lengths"][0]
    decode_one, cache = decode_steps.token_stepper(cfg, params, inference, cache, cache_len,
                                                   pallas_step)
    token = sample(logits, jax.random.fold_in(key, 0), sampling)
    padding = jnp.zeros(token.shape, bool) if real is None else ~real
    first_bad = jnp.where(non_finite_rows(logits, padding), 0, -1)
    out = jnp.full((tokens.shape[0], max_new_tokens), PAD, jnp.int32).at[:, 0].set(
        jnp.where(padding, PAD, token))
    log_probs = jnp.zeros(out.shape, jnp.float32)
    if with_log_probs:
        log_probs = log_probs.at[:, 0].set(_token_log_prob(logits, token))

    def body(state):
        step, token, done, out, log_probs, first_bad, cache = state
        logits, cache = decode_one(token, cache, first_position + step - 1)
        token = sample(logits, jax.random.fold_in(key, step), sampling)
        first_bad = jnp.where((first_bad < 0) & non_finite_rows(logits, done), step, first_bad)
        out = out.at[:, step].set(jnp.where(done, PAD, token))
        if with_log_probs:
            log_probs = log_probs.at[:, step].set(
                jnp.where(done, 0.0, _token_log_prob(logits, token)))
        done = done | is_eos(token, eos_id)
        return step + 1, token, done, out, log_probs, first_bad, cache

    def run(state, count: int):  # count steps, a loop of known length
        return jax.lax.fori_loop(0, count, lambda _, s: body(s), state) if count else state

    state = (jnp.int32(1), token, is_eos(token, eos_id) | padding, out, log_probs, first_bad,
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
    tokens, lengths, cache_len, real = batch_prompts(prompts, mesh, 0, max_new_tokens)
    with on_mesh(mesh):
        out = _generate_loop(cfg, sampling, max_new_tokens, eos_id, cache_len, quantize_cache,
                             params, tokens, lengths, jax.random.key(seed), real,
                             with_log_probs=return_log_probs, pallas_step=pallas_step,
                             steps_per_check=(STEPS_PER_CHECK if len(prompts) == 1
                                              else BATCHED_STEPS_PER_CHECK))
    out, log_probs, first_bad = (out if return_log_probs else (out[0], None, out[1]))
    if int(first_bad) >= 0:
        raise ValueError(overflow_message(int(first_bad)))
    out = np.asarray(out)
    log_probs = None if log_probs is None else np.asarray(log_probs)
    results = [trim_row(out[i], max_new_tokens, max_new_tokens, eos_id)
               for i in range(len(prompts))]
    if not return_log_probs:
        return results
    return results, [[float(x) for x in log_probs[i, :len(row)]] for i, row in enumerate(results)]


_sample_checked = jax.jit(lambda logits, key, sampling: (
    sample(logits, key, sampling), jnp.isfinite(logits).all()), static_argnums=2)
_non_finite = jax.jit(lambda params: jax.tree.map(lambda x: ~jnp.all(jnp.isfinite(x)), params))


def non_finite_rows(logits: jax.Array, done: jax.Array) -> jax.Array:
    """Whether any sequence not yet done has a NaN or inf logit (a scalar)."""
    return jnp.any(~jnp.all(jnp.isfinite(logits), axis=-1) & ~done)


def overflow_message(step: int) -> str:
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


def on_mesh(mesh: Optional[Mesh]):
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
    tokens, lengths, cache_len, _ = batch_prompts([prompt], None, 0, max_new_tokens)
    cache = init_cache(cfg, 1, cache_len, quantize=quantize_cache)
    key = jax.random.key(seed)
    chain = pallas_step == "chain"
    if chain:
        weights = decode_steps.chain_prepare_jit(cfg, params, cache_len)
    elif pallas_step:
        weights = decode_steps.pallas_weights_jit(cfg, params)
        plan = decode_steps.pallas_plan(cfg, cache)
    params = _inference_params(cfg, params)  # per-layer, compute dtype: no copies per step
    logits, cache = prefill(cfg, params, tokens, cache, lengths)
    if chain:
        position, cache = int(cache["lengths"][0]), decode_steps.chain_state_jit(weights, cache)
    for step in range(max_new_tokens):
        token, finite = _sample_checked(logits, jax.random.fold_in(key, step), sampling)
        value, finite = jax.device_get((token[0], finite))
        if not finite:
            raise ValueError(overflow_message(step))
        value = int(value)
        yield value
        if value == eos_id or step + 1 == max_new_tokens:
            return
        if chain:
            logits, cache = decode_steps.chain_step_jit(weights, token, cache,
                                                        jnp.int32(position + step))
        elif pallas_step:
            logits, cache = decode_steps.pallas_step_jit(cfg, plan, weights, token, cache)
        else:
            logits, cache = decode_step(cfg, params, token[:, None], cache)
            logits = logits[:, 0]


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


def __getattr__(name: str):
    """`decode.speculative_generate`, loaded on first use (jaxlm/speculative.py imports this
    module)."""
    if name == "speculative_generate":
        from jaxlm.speculative import speculative_generate

        return speculative_generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
