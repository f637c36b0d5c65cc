"""Mixture-of-Experts MLP: routers, balancing losses, dropless and capacity dispatch, expert parallelism.

    y, stats = moe_mlp(cfg, p, x)          # x [B, T, D] normed; p: one layer's "moe" params

Einsum letters as in model.py, plus E experts, F the expert mlp dim, P expert shards, A token-to-
expert assignments (tokens x top_k), C capacity per expert.

Routing (per token, float32). Router logits z = x @ router [D, E].
- "softmax" (Mixtral, Qwen3-MoE): probs = softmax(z); weights = probs of the top-k experts,
  divided by their sum when `router_renormalize`.
- "sigmoid" (DeepSeek-V3, Liu et al. 2024, sec. 2.1.2): scores = sigmoid(z); same selection and
  optional renormalization; `routed_scaling` multiplies the weights.
Selection ranks `scores + router_bias`; the weights use the scores alone. The bias [E] is zero
unless auxiliary-loss-free balancing is on (`moe_bias_update_rate` > 0): then the train step
moves it by rate * sign(mean load - load) after every step (DeepSeek-V3 sec. 2.1.2). It lives in
the params (so checkpoints, shardings and decoding carry it), sees no gradient (stop_gradient)
and the train step overwrites whatever the optimizer did to it.

Losses, from counts over the whole batch (all devices), so sharded == single device:
- balance (Switch, Fedus et al. 2021, eq. 4): E * sum_i f_i * P_i, f_i = share of the A
  assignments that go to expert i, P_i = mean router probability of expert i (for "sigmoid":
  scores normalized per token). Equals 1 at perfect balance.
- router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(z)^2.

Dispatch (`moe_dispatch`):
- "dropless": assignments sorted by expert, two grouped matmuls over the sorted rows (gate and
  up as one, `fuse_gate_up`; then down), then unsorted and summed with the routing weights. No
  token is dropped. When all experts are local (no `expert` axis) the rows are gathered
  straight from the tokens and back by the inverse permutation, with gather-only backward
  passes (custom_vjp): autodiff's scatters dominated the GPU profile. The grouped matmul is
  chosen once per process, not per config: `set_grouped_matmul("auto")` (the default) runs
  pallas_kernels/grouped_matmul.py on GPU and `jax.lax.ragged_dot` elsewhere (on GPU ragged_dot
  lowers to a masked dense matmul over all experts, ~100x slower at 64 experts); "pallas",
  "pallas_triton" (the Triton kernels also on Hopper, where "pallas" runs the forward and dx
  on Mosaic GPU), "pallas_interpret" (the kernel on CPU, for tests) and "ragged_dot" force
  one. Both have
  ragged_dot's semantics, so results agree to rounding; read at trace time, so set it before
  jitting.
- "capacity": each expert takes at most C = ceil(capacity_factor * A / E) assignments of a
  dispatch group. Drop order: all first choices come before all second choices (and so on),
  and within one choice rank tokens come in flattened [B, T] order, batch row first; an
  assignment past its expert's C is dropped (its token keeps the residual and the other
  experts). Experts then run as one batched matmul over an [E, C, D] buffer.

Expert parallelism. Under a mesh (`jax.set_mesh`), the layer is a `jax.shard_map`: tokens split
over the batch axes (data, fsdp, expert: outside MoE layers `expert` is data parallelism). Each
device routes its own tokens (a batch too small to split is replicated, and each device of the
`expert` axis takes one chunk of it instead), packs one buffer per destination shard (experts
are contiguous: shard j holds experts j*E/P ... (j+1)*E/P - 1), exchanges them with one
`all_to_all`, runs its experts, sends the results back with a second `all_to_all` and combines.
Expert weights are sharded over `expert` (experts dim) and `tensor` (mlp dim; partial sums are
psum-ed over tensor); FSDP shards of the embed dim are gathered on entry, like every FSDP
weight. A dispatch group is one device's chunk: capacity is counted per chunk.
NOTE: dropless buffers between shards are sized for the worst case (every assignment to one
shard), P times the average; capacity mode bounds them by C.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.config import ModelConfig

BATCH_AXES = sharding.LOGICAL_RULES["batch"]
EXPERT_AXES = sharding.LOGICAL_RULES["experts"]
TENSOR_AXES = sharding.LOGICAL_RULES["mlp"]


# ---------------------------------------------------------------------------------------------
# Which layers are MoE


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """After `first_dense_layers` dense ones, the last layer of every `moe_every` is MoE."""
    if not cfg.num_experts or layer < cfg.first_dense_layers:
        return False
    return (layer - cfg.first_dense_layers) % cfg.moe_every == cfg.moe_every - 1


def layer_indices(cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """(global indices of the dense layers, of the MoE layers), each in stack order."""
    moe = [i for i in range(cfg.num_layers) if is_moe_layer(cfg, i)]
    return [i for i in range(cfg.num_layers) if i not in moe], moe


def expert_mlp_dim(cfg: ModelConfig) -> int:
    return cfg.expert_mlp_dim or cfg.mlp_dim


# ---------------------------------------------------------------------------------------------
# Routing


def route(cfg: ModelConfig, router: jax.Array, bias: jax.Array, x: jax.Array):
    """x [T, D] -> expert ids [T, k] int32, weights [T, k] float32, probs [T, E], logits [T, E]."""
    logits = jnp.einsum("td,de->te", x.astype(jnp.float32), router.astype(jnp.float32))
    if cfg.router == "softmax":
        scores = probs = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    _, ids = jax.lax.top_k(scores + jax.lax.stop_gradient(bias.astype(jnp.float32)), cfg.top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.router_renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), weights * cfg.routed_scaling, probs, logits


def capacity(cfg: ModelConfig, num_tokens: int) -> int:
    """Slots per expert for a dispatch group of `num_tokens` tokens."""
    return max(1, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts))


def router_stats(cfg: ModelConfig, ids, probs, logits, valid, kept) -> dict:
    """Sums over one dispatch group, to be summed over groups before `losses_and_metrics`."""
    valid = valid.astype(jnp.float32)
    assigned = jax.nn.one_hot(ids, cfg.num_experts, dtype=jnp.float32) * valid[:, None, None]
    log_probs = jnp.log(jnp.maximum(probs, 1e-30))
    return {
        "counts": jnp.sum(assigned, axis=(0, 1)),  # [E] assignments per expert
        "prob_sum": jnp.sum(probs * valid[:, None], axis=0),  # [E]
        "z_sum": jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * valid),
        "entropy_sum": -jnp.sum(jnp.sum(probs * log_probs, axis=-1) * valid),
        "dropped": jnp.sum((1.0 - kept.astype(jnp.float32)) * valid[:, None]),
        "tokens": jnp.sum(valid),
    }


def losses_and_metrics(cfg: ModelConfig, stats: dict) -> dict:
    """Balance and z losses, per-expert load share [E], dropped fraction and router entropy."""
    tokens = jnp.maximum(stats["tokens"], 1.0)
    load = stats["counts"] / (tokens * cfg.top_k)
    mean_probs = stats["prob_sum"] / tokens
    return {
        "balance_loss": cfg.num_experts * jnp.sum(jax.lax.stop_gradient(load) * mean_probs),
        "router_z_loss": stats["z_sum"] / tokens,
        "expert_load": load,
        "dropped_fraction": stats["dropped"] / (tokens * cfg.top_k),
        "router_entropy": stats["entropy_sum"] / tokens,
    }


def update_router_bias(bias: jax.Array, expert_load: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's auxiliary-loss-free step: raise underloaded experts' bias, lower overloaded."""
    mean = jnp.mean(expert_load, axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean - expert_load).astype(bias.dtype)


# ---------------------------------------------------------------------------------------------
# Dispatch within one group (one device's tokens, or all tokens without a mesh)


GROUPED_MATMULS = ("auto", "pallas", "pallas_triton", "pallas_interpret", "ragged_dot")
_grouped_matmul_choice = "auto"


def set_grouped_matmul(name: str) -> None:
    """Which grouped matmul dropless dispatch traces with (see the module docstring)."""
    global _grouped_matmul_choice
    if name not in GROUPED_MATMULS:
        raise ValueError(f"grouped matmul {name!r} unknown; choose one of {GROUPED_MATMULS}")
    _grouped_matmul_choice = name


def _kernel_choice() -> str:
    if _grouped_matmul_choice != "auto":
        return _grouped_matmul_choice
    return "pallas" if jax.default_backend() == "gpu" else "ragged_dot"


def _grouped_matmul(x, w, group_sizes):
    """ragged_dot semantics: x [M, D] sorted by group, w [G, D, F] -> [M, F]."""
    if _kernel_choice() == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    from pallas_kernels.grouped_matmul import default_config, grouped_matmul
    config = default_config()
    if _kernel_choice() == "pallas_triton":
        config = dataclasses.replace(config, backend="triton")
    return grouped_matmul(x, w, group_sizes, config=config,
                          interpret=_kernel_choice() == "pallas_interpret")


def fuse_gate_up(p: dict) -> dict:
    """p with gate and up [..., E, D, F] replaced by gate_up [..., E, D, 2, F] (gate first).

    The form dispatch reads: one grouped matmul computes both halves, so x is read once and the
    backward's dx is one kernel, not two and a sum. The mlp dim stays last, so a shard of it
    over `tensor` holds matching gate and up columns and [E, D, 2, F] reshapes to [E, D, 2F]
    for free. model._cast_weights fuses them, so the stack rides on the cast to the compute
    dtype; `moe_mlp` accepts either form.
    """
    if "gate_up" in p:
        return p
    fused = {name: w for name, w in p.items() if name not in ("gate", "up")}
    fused["gate_up"] = jnp.stack([p["gate"], p["up"]], axis=-2)
    return fused


def _swiglu_ragged(x, gate_up, down, group_sizes):
    """x [A, D] sorted by expert -> [A, D]: SwiGLU through two grouped matmuls."""
    experts, dim, _, mlp = gate_up.shape
    both = _grouped_matmul(x, gate_up.reshape(experts, dim, 2 * mlp), group_sizes)
    h = jax.nn.silu(both[:, :mlp]) * both[:, mlp:]
    return _grouped_matmul(h, down, group_sizes)


def _slots(cfg: ModelConfig, ids_flat, valid_flat, num_shards: int):
    """Buffer row of each assignment (rank-major order) and whether it is kept.

    Rows: destination shard * M + slot; M = E/P * C (capacity) or A (dropless).
    """
    num_local = cfg.num_experts // num_shards
    shard = ids_flat // num_local
    count = ids_flat.shape[0]
    if cfg.moe_dispatch == "capacity":
        slots_per_expert = capacity(cfg, count // cfg.top_k)
        one_hot = jax.nn.one_hot(ids_flat, cfg.num_experts, dtype=jnp.int32) * valid_flat[:, None]
        position = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0), ids_flat[:, None], axis=1)[:, 0] - 1
        kept = valid_flat & (position < slots_per_expert)
        rows_per_shard = num_local * slots_per_expert
        slot = (ids_flat % num_local) * slots_per_expert + position
    else:
        rows_per_shard = count
        if num_shards == 1:
            slot = jnp.arange(count, dtype=jnp.int32)
        else:
            one_hot = jax.nn.one_hot(shard, num_shards, dtype=jnp.int32)
            slot = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0), shard[:, None], axis=1)[:, 0] - 1
        kept = valid_flat
    row = jnp.where(kept, shard * rows_per_shard + slot, num_shards * rows_per_shard)
    return row, kept, rows_per_shard


def _run_local_experts(cfg, p, buffer, local_ids, num_local):
    """buffer [P, M, D] of rows for this shard's experts; local_ids [P, M] (num_local = empty)."""
    shards, rows, dim = buffer.shape
    if cfg.moe_dispatch == "capacity":
        slots = buffer.reshape(shards, num_local, rows // num_local, dim)  # [P, E/P, C, D]
        both = jnp.einsum("pecd,edgf->pecgf", slots, p["gate_up"])
        h = jax.nn.silu(both[..., 0, :]) * both[..., 1, :]
        return jnp.einsum("pecf,efd->pecd", h, p["down"]).reshape(shards, rows, dim)
    flat_ids = local_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    group_sizes = jnp.zeros((num_local,), jnp.int32).at[flat_ids].add(1, mode="drop")
    # NOTE: `order` is a permutation: unique_indices lets XLA's GPU scatters (the gather's
    # transpose in the backward, and the unsort) skip atomics.
    sorted_rows = buffer.reshape(-1, dim).at[order].get(unique_indices=True)
    out = _swiglu_ragged(sorted_rows, p["gate_up"], p["down"], group_sizes)
    out = jnp.where((flat_ids[order] < num_local)[:, None], out, 0)  # rows of no group
    unsorted = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
    return unsorted.reshape(shards, rows, dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_assignments(x, order, inverse, top_k: int):
    """Rows x[t] of the assignments in `order` (rank-major a = r * T + t): [A, D] sorted by expert.

    The backward is a gather too (the cotangent unsorted by `inverse`, summed over the top_k
    ranks), not the scatter-add autodiff would emit: on GPU that scatter was one of the three
    2.4 ms scatter kernels of the layer's fwd+bwd profile (H100, 16k tokens, 64 experts, top-8).
    """
    return x[order % x.shape[0]]


def _gather_assignments_fwd(x, order, inverse, top_k):
    return _gather_assignments(x, order, inverse, top_k), inverse


def _gather_assignments_bwd(top_k, inverse, grad):
    return _sum_over_ranks(grad, inverse, top_k).astype(grad.dtype), None, None


_gather_assignments.defvjp(_gather_assignments_fwd, _gather_assignments_bwd)


def _sum_over_ranks(rows, inverse, top_k: int, weights=None):
    """sum_j weights[j T + t] * rows[inverse[j T + t]] per token t, float32: [T, D].

    NOTE: top_k gathers of [T, D] summed elementwise, one loop fusion; the same sum written as
    a reduction over a gathered [top_k, T, D] ran at a third of the memory bandwidth on GPU.
    """
    num_tokens = inverse.shape[0] // top_k
    total = None
    for j in range(top_k):
        part = rows[inverse[j * num_tokens:(j + 1) * num_tokens]].astype(jnp.float32)
        if weights is not None:
            part = part * weights[j * num_tokens:(j + 1) * num_tokens, None]
        total = part if total is None else total + part
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _combine(out, gate, order, inverse, top_k: int):
    """y[t] = sum_j gate[j T + t] * out[inverse[j T + t]]: expert outputs (rows sorted by
    expert) weighted back onto their tokens, [T, D] in out's dtype; gate [A] float32.

    The backward is gathers too: d_out[i] = gate[order[i]] * dy[order[i] % T] (rows sorted by
    expert) and d_gate[a] = <out[inverse[a]], dy[a % T]>; autodiff would scatter.
    """
    return _sum_over_ranks(out, inverse, top_k, gate).astype(out.dtype)


def _combine_fwd(out, gate, order, inverse, top_k):
    return _combine(out, gate, order, inverse, top_k), (out, gate, order, inverse)


def _combine_bwd(top_k, residuals, dy):
    out, gate, order, inverse = residuals
    num_tokens = dy.shape[0]
    d_out = (dy[order % num_tokens].astype(jnp.float32) * gate[order][:, None]).astype(out.dtype)
    per_rank = [jnp.sum(out[inverse[j * num_tokens:(j + 1) * num_tokens]].astype(jnp.float32)
                        * dy.astype(jnp.float32), axis=-1) for j in range(top_k)]
    return d_out, jnp.concatenate(per_rank), None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def _dropless_local(cfg: ModelConfig, p: dict, x, valid, in_shard_map: bool):
    """Dropless dispatch when all experts are local: gathers only, no dispatch buffer, no
    scatters of rows.

    Assignments (rank-major) are sorted by expert (invalid tokens' assignments last, in no
    group), gathered from x, run through the grouped matmuls, gathered back into rank-major
    order by the inverse permutation and combined with the gate weights. In the shard_map the
    mlp dim may be split over tensor: the expert outputs are summed over it.
    """
    num_tokens = x.shape[0]
    k, num_experts = cfg.top_k, cfg.num_experts
    ids, weights, probs, logits = route(cfg, p["router"], p["router_bias"], x)
    valid_flat = jnp.tile(valid, k)
    keys = jnp.where(valid_flat, ids.T.reshape(-1), num_experts)
    order = jnp.argsort(keys, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype),
                                                  unique_indices=True)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[keys].add(1, mode="drop")
    rows = _gather_assignments(x, order, inverse, k)  # [A, D], sorted by expert
    out = _swiglu_ragged(rows, p["gate_up"], p["down"], group_sizes)
    if in_shard_map:
        out = jax.lax.psum(out, TENSOR_AXES)
    gate = weights.T.reshape(-1).astype(jnp.float32) * valid_flat
    y = _combine(out, gate, order, inverse, k)
    kept = jnp.broadcast_to(valid[:, None], (num_tokens, k))
    return y, router_stats(cfg, ids, probs, logits, valid, kept)


def _dispatch_group(cfg: ModelConfig, p: dict, x, valid, expert_axis, num_shards: int):
    """x [T, D] one group's tokens -> (y [T, D], stats). Collectives over `expert_axis` if P > 1."""
    if num_shards == 1 and cfg.moe_dispatch == "dropless":
        return _dropless_local(cfg, p, x, valid, in_shard_map=expert_axis is not None)
    num_tokens, dim = x.shape
    k, num_local = cfg.top_k, cfg.num_experts // num_shards
    ids, weights, probs, logits = route(cfg, p["router"], p["router_bias"], x)
    # Rank-major: all first choices, then all second choices, ... (the capacity drop order).
    ids_flat = ids.T.reshape(-1)
    token_flat = jnp.tile(jnp.arange(num_tokens), k)
    row, kept, rows_per_shard = _slots(cfg, ids_flat, jnp.tile(valid, k), num_shards)
    total_rows = num_shards * rows_per_shard
    send = jnp.zeros((total_rows, dim), x.dtype).at[row].set(x[token_flat], mode="drop")
    send_ids = jnp.full((total_rows,), num_local, jnp.int32).at[row].set(ids_flat % num_local, mode="drop")
    send, send_ids = send.reshape(num_shards, rows_per_shard, dim), send_ids.reshape(num_shards, -1)
    if num_shards > 1:
        send = jax.lax.all_to_all(send, expert_axis, 0, 0, tiled=True)
        send_ids = jax.lax.all_to_all(send_ids, expert_axis, 0, 0, tiled=True)
    out = _run_local_experts(cfg, p, send, send_ids, num_local)
    if expert_axis is not None:  # inside the shard_map: the mlp dim is split over tensor
        out = jax.lax.psum(out, TENSOR_AXES)
    if num_shards > 1:
        out = jax.lax.all_to_all(out, expert_axis, 0, 0, tiled=True)
    per_assignment = out.reshape(total_rows, dim).at[row].get(mode="fill", fill_value=0)  # [A, D]
    gate = (weights.T.reshape(-1) * kept).astype(x.dtype)
    y = jnp.sum((per_assignment * gate[:, None]).reshape(k, num_tokens, dim), axis=0)
    stats = router_stats(cfg, ids, probs, logits, valid, kept.reshape(k, num_tokens).T)
    return y, stats


# ---------------------------------------------------------------------------------------------
# The layer


def _shared_mlp(p: dict, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(jnp.einsum("btd,df->btf", x, p["shared_gate"])) * jnp.einsum(
        "btd,df->btf", x, p["shared_up"])
    return jnp.einsum("btf,fd->btd", h, p["shared_down"])


def _sum_rows(stats: dict) -> dict:
    """Sum the per-device rows of the router statistics.

    NOTE: not a psum inside the shard_map: psum refuses axes over which a value is typed as
    invariant (a token count that does not depend on the data, say), and how to ask for that
    type differs between JAX versions. Stacking rows in out_specs works everywhere.
    """
    return jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)


def _sharded_routed(cfg: ModelConfig, p: dict, x: jax.Array, mesh) -> tuple[jax.Array, dict]:
    """The routed experts as a shard_map over `mesh` (see the module docstring)."""
    from jax.sharding import PartitionSpec as P

    batch, length, dim = x.shape
    batch_shards = sharding.batch_shards(mesh)
    num_shards = math.prod(mesh.shape[a] for a in EXPERT_AXES)
    if cfg.num_experts % num_shards:
        raise ValueError(f"model.num_experts={cfg.num_experts} is not divisible by the expert "
                         f"mesh axis size {num_shards}")
    split_batch = batch % batch_shards == 0
    local_tokens = (batch // batch_shards if split_batch else batch) * length
    # Split over the batch axes (expert among them), every device routes its own tokens. A batch
    # that does not divide (decoding one sequence, say) is replicated: then each device of the
    # expert axis routes one chunk of it, so no expert work is done twice.
    chunks = 1 if split_batch else num_shards
    chunk = -(-local_tokens // chunks)
    routed = {name: p[name] for name in ("router", "router_bias", "gate_up", "down")}
    specs = {"router": P(), "router_bias": P(),
             "gate_up": sharding.logical_to_spec(("experts", None, None, "mlp")),
             "down": sharding.logical_to_spec(("experts", "mlp", None))}
    x_spec = sharding.logical_to_spec(("batch", None, None)) if split_batch else P()
    # Outputs leave as rows ordered by batch shard (or expert chunk): the gather of replicated
    # chunks is left to XLA (inside, all_gather's result would be typed as varying).
    row_axes = BATCH_AXES if split_batch else EXPERT_AXES

    def local(p, x):
        flat = x.reshape(-1, dim)
        padded = jnp.pad(flat, ((0, chunk * chunks - flat.shape[0]), (0, 0)))
        valid = jnp.arange(chunk * chunks) < flat.shape[0]
        index = jax.lax.axis_index(EXPERT_AXES) if chunks > 1 else 0
        mine = jax.lax.dynamic_slice_in_dim(padded, index * chunk, chunk)
        mine_valid = jax.lax.dynamic_slice_in_dim(valid, index * chunk, chunk)
        y, stats = _dispatch_group(cfg, p, mine, mine_valid, EXPERT_AXES, num_shards)
        # Summed outside: one row per device of row_axes (see the NOTE in `_sum_rows`).
        return y, jax.tree.map(lambda s: s[None], stats)

    stat_specs = {name: P(row_axes) for name in ("counts", "prob_sum", "z_sum", "entropy_sum",
                                                  "dropped", "tokens")}
    # NOTE: check_vma=False because the Pallas grouped matmul's output type carries no
    # varying-axes annotation (its spelling differs between JAX versions), as in attention.py.
    fn = jax.shard_map(local, mesh=mesh, in_specs=(specs, x_spec), out_specs=(P(row_axes), stat_specs),
                       check_vma=False)
    y, stats = fn(routed, x)
    groups = batch_shards if split_batch else 1
    y = y.reshape(groups, chunk * chunks, dim)[:, :local_tokens].reshape(batch, length, dim)
    return y, _sum_rows(stats)


def moe_mlp(cfg: ModelConfig, p: dict, x: jax.Array) -> tuple[jax.Array, dict]:
    """The MoE MLP of one layer: x [B, T, D] (normed) -> (y [B, T, D], `losses_and_metrics`)."""
    p = fuse_gate_up(p)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        flat = x.reshape(-1, x.shape[-1])
        valid = jnp.ones((flat.shape[0],), bool)
        y, stats = _dispatch_group(cfg, p, flat, valid, None, 1)
        y = y.reshape(x.shape)
    else:
        y, stats = _sharded_routed(cfg, p, x, mesh)
    if cfg.num_shared_experts:
        y = y + _shared_mlp(p, x)
    return y, losses_and_metrics(cfg, stats)


def reference_moe_mlp(cfg: ModelConfig, p: dict, x: jax.Array) -> jax.Array:
    """Oracle: a plain loop over every token's top-k experts (dropless), for tests."""
    flat = x.reshape(-1, x.shape[-1])
    ids, weights, _, _ = route(cfg, p["router"], p["router_bias"], flat)
    rows = []
    for t in range(flat.shape[0]):
        out = jnp.zeros_like(flat[t])
        for j in range(cfg.top_k):
            e = int(ids[t, j])
            h = jax.nn.silu(flat[t] @ p["gate"][e]) * (flat[t] @ p["up"][e])
            out = out + weights[t, j] * (h @ p["down"][e])
        rows.append(out)
    y = jnp.stack(rows).reshape(x.shape)
    if cfg.num_shared_experts:
        y = y + _shared_mlp(p, x)
    return y

