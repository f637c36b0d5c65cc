"""A batch-1 decode step in one kernel launch (Pallas, Triton GPU backend), or one launch per
stage.

Why: at batch 1 a decode step reads every weight once and does almost no arithmetic, so its
floor is weight bytes / memory bandwidth. A 125m model's 0.27 GB take about 90 us at 3 TB/s;
XLA runs the step as ~275 small kernels (matrix-vector products, norms, RoPE, the cache write,
attention, the residual adds), each paying a launch gap and a ramp-up that its few microseconds
of memory traffic cannot hide.

Here each layer is five stages, each spread over `programs` (= the SM count) programs:

  1. qkv:       rms_norm(x) @ [Wq | Wk | Wv]               rows of the output split over programs
  2. attention: split-K over the cache: unit (kv head, split) scores its slice of the keys for
                the G query heads of the kv head (each K/V byte read once), with RoPE applied
                to q and, by the unit owning the new slot, to k, which it also writes to the
                cache; partial (max, sum, output) per unit; the last unit of a kv head to
                finish (an atomic count) merges the head's partials
  3. o-proj:    x += attn @ Wo
  4. gate/up:   h = silu(rms_norm(x) @ Wg) * (rms_norm(x) @ Wu), rows split over programs
  5. down:      x += h @ Wd
and after the last layer logits = rms_norm(x) @ W_out. Weights are matrix-vector friendly:
`prepare` transposes each matrix to [out, in] once per generate call, so each program streams
whole contiguous rows. Activations that cross programs go through small float32 scratch
buffers in global memory, read with volatile loads (from L2, never a stale L1 line); with
`data_waits`, q/k/v, the attention output and the MLP hidden get one buffer per layer.

`one_launch=True` runs all stages in one kernel with a grid-wide barrier between stages (each
program adds one to an arrival counter, then polls it; programs never outnumber the SMs, so all
are resident and the spin cannot deadlock), each stage issuing the loads of its first weight
tile between its arrival and its wait (with `lookahead`, a stage earlier). With `data_waits`
a stage whose input is a per-layer buffer skips its barrier and polls the input instead until
no value is NOT_WRITTEN (the buffers start so); the in-place residual writes of o-proj and
down stay safe because their input exists only once every program has read x. Otherwise each
stage is its own launch (5 L + 1 launches): the reference for the barrier, and how the CPU
tests run several programs (interpret mode runs programs one after another, so a barrier would
wait forever there; the one-launch form is tested with one).

Numerics follow `model.forward` in the compute dtype: with bf16, every value the model rounds
to bf16 (normed x, q/k/v, rotated q/k, attention output, projections, the residual stream, the
MLP hidden) is rounded here at the same point; sums accumulate in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxlm.layers import rope_inverse_frequencies

from pallas_kernels.fused_decode_kernel import (ATTENTION_PARTS, MASK_VALUE, NOT_WRITTEN, STAGES,
                                                STATE, TILE_ELEMENTS, TILED, WAITABLE, WEIGHTS,
                                                _kernel, barriers)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shapes and tiling of one compiled step."""

    layers: int
    embed: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    eps: float
    programs: int
    splits: int  # attention units per kv head
    round_bf16: bool
    interpret: bool
    num_warps: int = 8
    tile_elements: int = TILE_ELEMENTS
    stage_tiles: tuple = ()  # (weight name, tile elements) pairs overriding tile_elements
    # One launch: the stages (names from STAGES) whose first weight tile is loaded while the
    # stage before them runs, instead of after their own barrier's arrival.
    lookahead: tuple = ()
    # One launch: the stages (from WAITABLE) that poll their input data instead of waiting at
    # a grid barrier (off by default: 2-4% at 125m, 0.5% at 1b; docs/benchmarks.md).
    data_waits: tuple = ()
    # Timing experiments only (tools/check_fused_decode.py): stages (or "barrier") to leave
    # out; the results are then wrong.
    skip: tuple = ()
    # Timing experiments only: one launch records the GPU's global timer (ns, low 32 bits) per
    # program at each barrier (stage done, arrival counted, released), at the end and at four
    # points of its attention unit (state["trace"]; tools/check_fused_decode.timeline reads it).
    trace: bool = False

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


def dense_step_reasons(cfg, batch: int, int8_cache: bool) -> list[str]:
    """What no batch-1 dense decode step here runs (this one and chain_step.py's)."""
    reasons = []
    if batch != 1:
        reasons.append(f"batch {batch} (it runs batch 1)")
    if cfg.num_experts:
        reasons.append("MoE layers")
    for flag in ("qkv_bias", "qk_norm", "sliding_window"):
        if getattr(cfg, flag):
            reasons.append(flag)
    if cfg.parameterization != "standard":
        reasons.append(f"parameterization {cfg.parameterization}")
    if int8_cache:
        reasons.append("an int8 cache")
    return reasons


def unsupported(cfg, cache: dict, batch: int) -> Optional[str]:
    """Why the fused step cannot run this model/cache (None when it can)."""
    reasons = dense_step_reasons(cfg, batch, "k_scale" in cache)
    if jnp.dtype(cfg.compute_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        reasons.append(f"compute dtype {cfg.compute_dtype} (it rounds like bfloat16 or float32)")
    group = cfg.num_heads // cfg.num_kv_heads
    head_dim = cfg.resolved_head_dim
    if group & (group - 1) or head_dim & (head_dim - 1) or head_dim < 16:
        reasons.append(f"query heads per kv head {group} and head_dim {head_dim} must be powers "
                       "of 2 (head_dim >= 16)")
    for name, dim in (("embed_dim", cfg.embed_dim), ("mlp_dim", cfg.mlp_dim)):
        if dim % 16:
            reasons.append(f"{name} {dim} must be a multiple of 16")
    return "; ".join(reasons) or None


def prepare(cfg, params: dict) -> dict:
    """The weights in the layouts the kernel reads, in the compute dtype (one copy per call).

    Matrices become [out, in] (rows contiguous for matrix-vector products), q/k/v one matrix;
    the output projection [L, D, K, G, H] so a row block's slice for one kv head is one tile.
    """
    dtype = jnp.dtype(cfg.compute_dtype)
    blocks = params["blocks"]
    if isinstance(blocks, (list, tuple)):
        blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    attn, mlp = blocks["attn"], blocks["mlp"]
    L, D = attn["q"].shape[:2]
    K, H = attn["k"].shape[2:]
    N = attn["q"].shape[2]
    qkv = jnp.concatenate([attn[name].reshape(L, D, -1) for name in ("q", "k", "v")], axis=-1)
    if cfg.tie_embeddings:
        head = params["embed"]
    else:
        head = params["lm_head"].T
    return {
        "embed": params["embed"].astype(dtype),
        "attn_norm": blocks["attn_norm"].astype(jnp.float32),
        "mlp_norm": blocks["mlp_norm"].astype(jnp.float32),
        "final_norm": params["final_norm"].astype(jnp.float32),
        "wqkv": jnp.swapaxes(qkv, 1, 2).astype(dtype),
        "wo": jnp.transpose(attn["o"], (0, 3, 1, 2)).reshape(L, D, N * H).astype(dtype),
        "gate": jnp.swapaxes(mlp["gate"], 1, 2).astype(dtype),
        "up": jnp.swapaxes(mlp["up"], 1, 2).astype(dtype),
        "down": jnp.swapaxes(mlp["down"], 1, 2).astype(dtype),
        "head": head.astype(dtype),
    }


def _launch(plan: Plan, stage: Optional[str], scalars, freq, weights: dict, state: dict) -> dict:
    n_in = 2 + len(WEIGHTS)
    args = [scalars, freq, *(weights[n] for n in WEIGHTS), *(state[n] for n in STATE)]
    out = pl.pallas_call(
        functools.partial(_kernel, plan=plan, stage=stage),
        grid=(plan.programs,),
        out_shape=[jax.ShapeDtypeStruct(state[n].shape, state[n].dtype) for n in STATE],
        input_output_aliases={n_in + i: i for i in range(len(STATE))},
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=1),
        interpret=plan.interpret,
        name=f"fused_decode_{stage or 'step'}",
    )(*args)
    return dict(zip(STATE, out))


def trace_columns(plan: Plan) -> int:
    """state["trace"]'s columns per program: done / counted / released at each barrier, the
    end, then ATTENTION_PARTS stamps per layer inside attention (1 without Plan.trace)."""
    if not plan.trace:
        return 1
    return 3 * barriers(plan) + 1 + ATTENTION_PARTS * plan.layers


def _zero_counter(pos) -> jax.Array:
    """The barrier's arrival counter, 0. Built from pos rather than as a constant: the kernel
    writes it in place, and a fresh buffer per step is the point."""
    return jnp.minimum(pos, 0).astype(jnp.int32)[None]


def _unwritten(size: int) -> jax.Array:
    """A per-layer activation buffer, every value NOT_WRITTEN (the step writes each once)."""
    return lax.bitcast_convert_type(jnp.full((size,), NOT_WRITTEN, jnp.int32), jnp.float32)


def _stage_names(field: str, value, allowed: tuple, problem: str) -> tuple:
    """A Plan option naming stages: True / False (all of `allowed` / none) or names from it."""
    if isinstance(value, bool):
        return allowed if value else ()
    bad = sorted(set(value) - set(allowed))
    if bad:
        raise ValueError(f"{field}: {problem.format(bad)}; allowed: {allowed}")
    return tuple(value)


def make_plan(cfg, cache: dict, *, programs: Optional[int] = None, splits: Optional[int] = None,
              interpret: bool = False, **options) -> Plan:
    if programs is None:
        programs = 1 if interpret else int(getattr(jax.devices()[0], "core_count", 0) or 132)
    K = cfg.num_kv_heads
    # Loading a stage ahead holds two stages' tiles in registers: every stage's up to embed
    # 1024 (2% at 125m), only qkv's above (1b: 2.2% faster; every stage's, 2.7% slower). True /
    # False: every stage / none (docs/benchmarks.md, eleventh session).
    options["lookahead"] = _stage_names(
        "lookahead", options.get("lookahead", STAGES if cfg.embed_dim <= 1024 else ("qkv",)),
        STAGES, "unknown stages {}")
    bad = sorted(set(dict(options.get("stage_tiles", ()))) - set(TILED))
    if bad:
        raise ValueError(f"stage_tiles: {bad} are not tiled weights; those are {TILED}")
    waits = options["data_waits"] = _stage_names("data_waits", options.get("data_waits", ()),
                                                 WAITABLE, "{} cannot wait on data")
    if options.get("trace") and interpret:
        raise ValueError("trace reads the GPU's timer: it needs a GPU (interpret=False)")
    if "attention" in waits and cfg.num_heads != cfg.num_kv_heads:
        # On an H200 the 350m and 1b steps (2 and 4 query heads per kv head) never finished
        # with it, while the o-proj and down waits did; the cause is not known yet.
        raise ValueError("data_waits: the attention wait hangs with grouped kv heads "
                         f"({cfg.num_heads} query heads over {cfg.num_kv_heads}); leave it out")
    return Plan(layers=cfg.num_layers, embed=cfg.embed_dim, heads=cfg.num_heads, kv_heads=K,
                head_dim=cfg.resolved_head_dim, mlp=cfg.mlp_dim, vocab=cfg.vocab_size,
                eps=float(cfg.norm_eps), programs=programs,
                splits=splits or max(1, programs // K),
                round_bf16=jnp.dtype(cfg.compute_dtype) == jnp.bfloat16, interpret=interpret,
                **options)


def decode_token(cfg, weights: dict, token: jax.Array, cache: dict, *, plan: Plan,
                 one_launch: bool = False) -> tuple[jax.Array, dict]:
    """One decode step of one sequence: token [1] int -> (logits [1, V] float32, cache).

    weights: `prepare(cfg, params)`; cache: kv_cache's layout, batch 1, k/v in the compute
    dtype; the token goes to slot cache["lengths"][0] and lengths grows by one.
    """
    state = step_state(cfg, weights, token, cache, plan=plan, one_launch=one_launch)
    new_cache = {**cache, "k": state["k"], "v": state["v"], "lengths": cache["lengths"] + 1}
    return state["logits"][None], new_cache


def step_state(cfg, weights: dict, token: jax.Array, cache: dict, *, plan: Plan,
               one_launch: bool = False) -> dict:
    """`decode_token`'s kernel state after the step (scratch buffers included: for tests)."""
    p = plan
    pos = cache["lengths"][0]
    scalars = jnp.stack([token[0].astype(jnp.int32), pos, jnp.int32(0)])
    freq = jnp.asarray(rope_inverse_frequencies(p.head_dim, cfg.rope_theta, cfg.rope_scaling))
    x = jnp.take(weights["embed"], token[0], axis=0).astype(jnp.float32)
    f32 = jnp.float32
    splits = pl.next_power_of_2(p.splits)
    copies = p.layers if p.data_waits else 1  # of the buffers _Kernel.slot picks from
    state = {
        "x": x, "qkv": _unwritten(copies * p.qkv_rows),
        # (splits padded to a power of 2 with empty ones: max -inf, sum 0, output 0)
        "part_o": jnp.zeros((p.kv_heads, splits, p.group, p.head_dim), f32),
        "part_m": jnp.full((p.kv_heads, splits, p.group), MASK_VALUE, f32),
        "part_l": jnp.zeros((p.kv_heads, splits, p.group), f32),
        "attn": _unwritten(copies * p.heads * p.head_dim),
        "arrivals": _zero_counter(pos).repeat(p.kv_heads),
        "hidden": _unwritten(copies * p.mlp), "logits": jnp.zeros((p.vocab,), f32),
        "k": cache["k"], "v": cache["v"], "counter": _zero_counter(pos),
        "polls": jnp.zeros((p.programs,), jnp.int32),
        "trace": jnp.zeros((p.programs, trace_columns(p)), jnp.int32),
    }
    if one_launch:
        state = _launch(p, None, scalars, freq, weights, state)
    else:
        def layer_body(layer, state):
            for name in STAGES:
                if name not in p.skip:
                    state = _launch(p, name, scalars.at[2].set(layer), freq, weights, state)
            return state

        state = lax.fori_loop(0, p.layers, layer_body, state)
        if "head" not in p.skip:
            state = _launch(p, "head", scalars, freq, weights, state)
    return state
