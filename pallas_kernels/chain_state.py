"""The arrays around pallas_kernels/stage_chain.py's kernel: the state a call carries to the
next (`init_chain_state`: two parities of every stage's partial sums and every norm stage's
residual, armed with NOT_WRITTEN, and the cache), the norm weights in the layout the kernel
takes (`_norm_inputs`, which checks them), and attention's partials merged the way o-proj's
prologue merges them (`merge_attention_partials`, for references and tests). stage_chain
re-exports the public names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.chain_plan import CHUNK, HEAD_DIM, ChainPlan
from pallas_kernels.ring_matvec import K_STEP, NOT_WRITTEN


def _parts_shapes(plan: ChainPlan):
    """Each stage's partial sums: [L (1 for tail stages), splits, rows / 64, 64] float32; the
    qkv stage before attention has one more block of 64 (zeros, never written: attention
    polls two blocks at a time); the attention stage's are [L, chunks + 1, heads, 128] (per
    query head, its 64 outputs normalized, then 64 copies of its log-sum-exp)."""
    shapes = []
    for i, st in enumerate(plan.layer + plan.tail):
        layers = plan.num_layers if i < len(plan.layer) else 1
        if st.prologue == "attention":
            shapes.append((layers, st.chunks + 1, st.rows // HEAD_DIM, 2 * HEAD_DIM))
        else:
            pad = int(plan.attention is not None and i == plan.attention - 1)
            shapes.append((layers, st.splits, st.rows // K_STEP + pad, K_STEP))
    return shapes


def _residual_shapes(plan: ChainPlan):
    """Each norm stage's residual stream: [L (1 for tail stages), D / 64, 64] float32."""
    return [(plan.num_layers if i < len(plan.layer) else 1, st.cols // K_STEP, K_STEP)
            for i, st in enumerate(plan.layer + plan.tail) if st.prologue == "norm"]


def init_chain_state(plan: ChainPlan, cache=None) -> dict:
    """The state that lets stage_chain skip its per-call arming (stage_chain(..., state=)):
    two parities of every stage's partial sums and every norm stage's residual, all NaN,
    and the parity the next call uses. With an attention stage also the cache: (k, v), each
    [L, kv heads, chunks * CHUNK, 64] bf16 (zeros if None), which each call extends."""
    parts = []
    for i, shape in enumerate(_parts_shapes(plan)):
        buffer = jnp.full((2, *shape), NOT_WRITTEN, jnp.float32)
        if plan.attention is not None and i == plan.attention - 1:
            buffer = buffer.at[:, :, :, -1].set(0.0)  # the padding block
        parts.append(buffer)
    state = {"parts": tuple(parts),
             "residuals": tuple(jnp.full((2, *shape), NOT_WRITTEN, jnp.float32)
                                for shape in _residual_shapes(plan)),
             "parity": jnp.int32(0)}
    if plan.attention is not None:
        att = plan.layer[plan.attention]
        want = (plan.num_layers, att.kv_heads, att.chunks * CHUNK, HEAD_DIM)
        if cache is None:
            cache = (jnp.zeros(want, jnp.bfloat16),) * 2
        if len(cache) != 2 or any(c.shape != want or c.dtype != jnp.bfloat16 for c in cache):
            raise ValueError(f"a cache of {[(c.shape, c.dtype) for c in cache]}: want (k, v), "
                             f"each {want} bfloat16")
        state["cache"] = tuple(cache)
    elif cache is not None:
        raise ValueError("a cache for a plan without attention")
    return state


def merge_attention_partials(parts):
    """[L, chunks + 1, heads, 128] attention partials (normalized outputs, log-sum-exps) ->
    [L, heads * 64]: each head's output over all chunks."""
    o, lse = parts[..., :HEAD_DIM], parts[..., HEAD_DIM:HEAD_DIM + 1]
    weights = jax.nn.softmax(lse, axis=1)
    return (weights * o).sum(axis=1).reshape(parts.shape[0], -1)


def _norm_inputs(plan: ChainPlan, norms, norm_stages):
    """The norm stages' weights as the kernel takes them, [L (1 in the tail), D / 64, 64]
    float32, after checking `norms` (per stage, None where there is no norm)."""
    stages = plan.layer + plan.tail
    if not norm_stages:
        if norms is not None and any(g is not None for g in norms):
            raise ValueError("norm weights for a plan without norm stages")
        return []
    if norms is None or len(norms) != len(stages):
        raise ValueError(f"norm stages {norm_stages} need norms: one entry per stage "
                         f"({len(stages)}), the norm weights where the stage has a norm")
    out = []
    for i in norm_stages:
        tail = i >= len(plan.layer)
        want = (stages[i].cols,) if tail else (plan.num_layers, stages[i].cols)
        g = norms[i]
        if g is None or tuple(g.shape) != want:
            raise ValueError(f"norm weights of stage {i}: {None if g is None else g.shape}, "
                             f"want {want}")
        out.append(jnp.asarray(g, jnp.float32).reshape(-1, stages[i].cols // K_STEP, K_STEP))
    return out
