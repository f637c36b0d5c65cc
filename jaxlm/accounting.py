"""Resource accounting: parameters, FLOPs, per-device memory and decode arithmetic intensity.

    python -m jaxlm.accounting --config 1b --seq 2048 --batch 8 --mesh fsdp=8 --device h100

Everything here is arithmetic on `model.param_specs` shapes and mesh sizes: no device, no array
is allocated, so a plan for 8 GPUs prints on a laptop. The mesh is a `jax.sharding.AbstractMesh`,
so parameter shardings are exactly `model.param_shardings` (and its divisibility errors).

Conventions (docs/design.md, "Resource accounting", says why):
- FLOPs count a multiply-add as 2. "Per token" means per trained token of a [B, T] batch.
- Matmul parameters N = q, k, v, o, gate, up, down of every layer + the lm head (V x D; with tied
  embeddings the embedding matrix serves as the head and is counted once, here). The embedding
  lookup is a gather: 0 FLOPs. Norm scales and biases are elementwise: not in N.
- Training = forward + backward = 2N + 4N = 6N per token (Kaplan et al. 2020, sec. 2.1).
- Attention scores per layer and token: QK^T and AV, 2 * 2 * T * (num_heads * head_dim) forward,
  3x that for forward + backward: 12 * L * T * N_heads * H. XLA computes the full T x T
  score matrices ("full-mask" FLOPs); a causal mask makes only half useful. Model FLOPs, and so
  MFU, use the causal half (PaLM, Chowdhery et al. 2022, appendix B); hardware FLOPs (what
  XLA executes, incl. rematerialization) use the full mask.
- Memory is bytes per device. Activation estimates list what the backward pass keeps per layer
  (the residuals `jax.ad_checkpoint.print_saved_residuals` shows for model.forward).

Deliberate simplifications: sliding windows are ignored (an upper bound); the optimizer is
assumed to be Adam with two fp32 moments; elementwise FLOPs are a rough fit (see
`elementwise_flops_per_token`) that matters only for toy widths.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh

from jaxlm import model, sharding
from jaxlm.config import MeshConfig, ModelConfig

REMAT_POLICIES = ("none", "full", "save_dots")
MATMUL_WEIGHTS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
# Under remat "full", the forward matmuls the backward runs again (not o/down: see below).
_RECOMPUTED = ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up", "moe.gate", "moe.up",
               "moe.shared_gate", "moe.shared_up", "moe.router")


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Datasheet numbers of one accelerator (SXM parts, dense bf16, no sparsity)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    memory_bandwidth: float  # HBM bytes/s
    memory_bytes: float  # HBM capacity


DEVICES = {
    "h100": DeviceSpec("NVIDIA H100 SXM", 989e12, 3.35e12, 80e9),
    "h200": DeviceSpec("NVIDIA H200 SXM", 989e12, 4.8e12, 141e9),
    "a100": DeviceSpec("NVIDIA A100 SXM", 312e12, 2.039e12, 80e9),
}
PEAK_BF16_FLOPS = {name: device.peak_flops for name, device in DEVICES.items()}


def mfu(tokens_per_second: float, flops_per_token: float, num_devices: int, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' peak.

    Pass `training_flops_per_token(cfg, seq_len)` (causal attention, no rematerialization) so
    that MFU does not reward recomputation; `peak_flops` per device, e.g. PEAK_BF16_FLOPS["h100"].
    """
    return tokens_per_second * flops_per_token / (num_devices * peak_flops)


# ---------------------------------------------------------------------------------------------
# Parameters


def _flat_specs(cfg: ModelConfig) -> dict[str, model.ParamSpec]:
    leaves = jax.tree.leaves_with_path(model.param_specs(cfg),
                                       is_leaf=lambda x: isinstance(x, model.ParamSpec))
    return {".".join(str(getattr(p, "key", p)) for p in path): spec for path, spec in leaves}


def _component(name: str) -> str:
    """The component of a flat parameter name; layer stacks are `blocks` and `moe_blocks`."""
    if name in ("embed", "lm_head"):
        return "embedding" if name == "embed" else "lm_head"
    stack, _, rest = name.partition(".")
    if stack not in ("blocks", "moe_blocks"):
        return "norms"  # final_norm
    if rest.startswith("attn."):
        return "attention"
    if rest.startswith("mlp."):
        return "mlp"
    if rest.startswith("moe.router"):
        return "router"
    if rest.startswith("moe.shared_"):
        return "shared_experts"
    if rest.startswith("moe."):
        return "experts"
    return "norms"  # attn_norm, mlp_norm (per layer)


def _active_fraction(cfg: ModelConfig, name: str) -> float:
    """The share of a parameter one token uses: top_k / num_experts for routed expert weights."""
    return cfg.top_k / cfg.num_experts if _component(name) == "experts" else 1.0


def count_params_by_component(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of embedding, attention, mlp, norms, lm_head (0 when tied), all layers;
    for MoE models also the routed experts, the shared experts and the routers.

    Attention includes q/k/v biases and q/k norms when the config has them.
    """
    counts = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
    if cfg.num_experts:
        counts.update(experts=0, shared_experts=0, router=0)
    for name, spec in _flat_specs(cfg).items():
        counts[_component(name)] += math.prod(spec.shape)
    return counts


def count_active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses: all but the routed experts, of which top_k of num_experts.

    Equals `count_params` for a dense model.
    """
    return round(sum(math.prod(spec.shape) * _active_fraction(cfg, name)
                     for name, spec in _flat_specs(cfg).items()))


def count_params(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Total parameters; without the embedding table if `include_embedding` is False.

    With tied embeddings the table is also the lm head; excluding it then drops the head too.
    """
    counts = count_params_by_component(cfg)
    return sum(counts.values()) - (0 if include_embedding else counts["embedding"])


def _is_matmul_weight(name: str) -> bool:
    last = name.split(".")[-1]
    return last in MATMUL_WEIGHTS or last.startswith("shared_") or last == "router"


def matmul_params(cfg: ModelConfig) -> int:
    """N of the 6N rule: weights used in matmuls per token (layers' projections + lm head).

    For MoE models only the active share of the routed experts counts (top_k of num_experts),
    plus the shared experts and the router: MFU of an MoE model is measured on active FLOPs.
    """
    layers = sum(math.prod(spec.shape) * _active_fraction(cfg, name)
                 for name, spec in _flat_specs(cfg).items()
                 if _is_matmul_weight(name) and name != "lm_head" and name != "embed")
    return round(layers) + cfg.embed_dim * cfg.vocab_size


# ---------------------------------------------------------------------------------------------
# FLOPs


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward + backward FLOPs of QK^T and AV per token: 12 * L * T * N_heads * H (full mask).

    `causal=True` gives the useful half under a causal mask (the MFU convention).
    """
    full = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.resolved_head_dim
    return full / 2 if causal else float(full)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token: 6N + causal attention. The numerator of MFU."""
    return 6 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, causal=True)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward share of `training_flops_per_token`: one third (2N + 4 L T N_heads H / 2)."""
    return training_flops_per_token(cfg, seq_len) / 3


def backward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Backward share: twice the forward (gradients w.r.t. both activations and weights)."""
    return 2 * training_flops_per_token(cfg, seq_len) / 3


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int, remat: str) -> float:
    """Matmul FLOPs the backward pass spends re-running forward ops under a remat policy.

    full: each layer's forward again, except the o and down projections, whose outputs only
    feed residual adds (not needed by the backward; XLA drops them). save_dots: only the
    attention score matmuls (QK^T and AV have batch dims, so the policy does not save them).
    """
    _check_remat(remat)
    attention_forward = 4 * cfg.num_layers * seq_len * cfg.num_heads * cfg.resolved_head_dim
    if remat == "none":
        return 0.0
    if remat == "save_dots":
        return float(attention_forward)
    recomputed = sum(math.prod(spec.shape) * _active_fraction(cfg, name)
                     for name, spec in _flat_specs(cfg).items()
                     if name.split(".", 1)[-1] in _RECOMPUTED)
    return 2.0 * recomputed + attention_forward


def hardware_flops_per_token(cfg: ModelConfig, seq_len: int, remat: str = "none") -> float:
    """Matmul FLOPs the hardware executes per token: 6N + full-mask attention + recomputation."""
    return (6 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, causal=False)
            + recompute_flops_per_token(cfg, seq_len, remat))


def elementwise_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Rough forward + backward elementwise FLOPs per token as XLA's cost analysis counts them.

    Coefficients fitted to XLA's count for this model and the xla attention (no remat): about
    26 per attention score (scale, mask, softmax and their gradients), 21 per mlp unit (SiLU,
    gating), 48 per embed unit per layer and 16 outside (norms, residual adds), 10 per q/k/v
    head dim (RoPE), 9 per logit (softmax cross-entropy). Under 1% of the total from 125m up.
    """
    per_layer = (26 * cfg.num_heads * seq_len + 21 * cfg.mlp_dim + 48 * cfg.embed_dim
                 + 10 * (cfg.num_heads + cfg.num_kv_heads) * cfg.resolved_head_dim)
    return float(cfg.num_layers * per_layer + 16 * cfg.embed_dim + 9 * cfg.vocab_size)


def xla_flops_per_token(cfg: ModelConfig, seq_len: int, remat: str = "none") -> float:
    """What `compiled.cost_analysis()["flops"]` should report per token for a loss+grad step.

    NOTE: XLA's HloCostAnalysis counts a while loop's body once, not once per iteration, so for
    the scanned layers it reports one layer's worth; compare with num_layers=1.
    """
    return hardware_flops_per_token(cfg, seq_len, remat) + elementwise_flops_per_token(cfg, seq_len)


def _check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {', '.join(REMAT_POLICIES)}")


# ---------------------------------------------------------------------------------------------
# Memory


def abstract_mesh(mesh_config: MeshConfig) -> AbstractMesh:
    """A device-free mesh with the project's four axes and `mesh_config`'s sizes."""
    sizes = tuple(getattr(mesh_config, axis) for axis in sharding.MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(sizes)
    return AbstractMesh(sizes, sharding.MESH_AXES, axis_types=axis_types)


def check_device_count(mesh_config: MeshConfig, num_devices: int) -> None:
    """Raise sharding.MeshError when the mesh's product is not `num_devices` (as make_mesh does)."""
    sizes = [getattr(mesh_config, axis) for axis in sharding.MESH_AXES]
    if math.prod(sizes) != num_devices:
        described = ",".join(f"{a}={s}" for a, s in zip(sharding.MESH_AXES, sizes))
        raise sharding.MeshError(
            f"mesh {described} needs {math.prod(sizes)} devices but {num_devices} are available; "
            f"make the product of the axis sizes equal {num_devices}")


def _batch_shards(mesh_config: MeshConfig) -> int:
    return math.prod(getattr(mesh_config, axis) for axis in sharding.LOGICAL_RULES["batch"])


def tensor_shards(mesh_config: MeshConfig) -> int:
    return math.prod(getattr(mesh_config, axis) for axis in sharding.LOGICAL_RULES["heads"])


def _dtype_bytes(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def param_bytes_per_device(cfg: ModelConfig, mesh_config: MeshConfig = MeshConfig(),
                           dtype: Optional[str] = None, names: Optional[Sequence[str]] = None) -> int:
    """Bytes of one device's shard of the parameters (optionally only the leaves whose last
    name is in `names`), sharded as `model.param_shardings`, in `dtype` (default param_dtype)."""
    shardings = jax.tree.leaves(model.param_shardings(cfg, abstract_mesh(mesh_config)))
    itemsize = _dtype_bytes(dtype or cfg.param_dtype)
    total = 0
    for (name, spec), named in zip(_flat_specs(cfg).items(), shardings):
        if names is None or name.split(".")[-1] in names:
            total += math.prod(named.shard_shape(spec.shape)) * itemsize
    return total


@dataclasses.dataclass(frozen=True)
class SavedActivation:
    """One array kept for the backward pass: elements per token per layer, bytes per element,
    and whether its dims are split over the tensor axis (heads or mlp)."""

    name: str
    elements: int
    dtype_bytes: int
    tensor_sharded: bool = False


def saved_activations_per_layer(cfg: ModelConfig, seq_len: int, remat: str) -> list[SavedActivation]:
    """What one layer keeps for its backward pass, per token, under a remat policy.

    none: every residual of the forward, float32 where the code computes in float32 (RMSNorm
    internals, attention scores; with attention_impl="cudnn" only a logsumexp per head).
    full: only the layer input [B, T, D]. save_dots: the layer input and the outputs of the
    weight matmuls (q, k, v, o, gate, up; not down, whose output only feeds a residual add);
    the attention scores and the rest are recomputed. Under full and save_dots, the
    activations named in cfg.remat_save are kept as well.
    """
    _check_remat(remat)
    D, N, K, H, F = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.mlp_dim)
    c = _dtype_bytes(cfg.compute_dtype)
    names = cfg.remat_save_names
    extra = {"norm": SavedActivation("remat_save norm: 2 RMSNorm outputs", 2 * D, c),
             "rope": SavedActivation("remat_save rope: q, k after RoPE", (N + K) * H, c, True),
             "mlp_hidden": SavedActivation("remat_save mlp_hidden: silu(gate) * up", F, c, True)}
    if remat == "full":
        return [SavedActivation("layer input x", D, c), *(extra[name] for name in names)]
    if remat == "save_dots":
        # Roped q and k replace the q and k projections (RoPE's backward needs neither).
        qkv = "q, k after RoPE (remat_save rope), v projection" if "rope" in names else "q, k, v projections"
        return [SavedActivation("layer input x", D, c),
                SavedActivation(qkv, (N + 2 * K) * H, c, True),
                SavedActivation("o projection output", D, c),
                SavedActivation("gate, up projections", 2 * F, c, True),
                *(extra[name] for name in names if name != "rope")]
    return [
        SavedActivation("2 RMSNorms: float32 input and normalized x, rsqrt stats", 2 * (2 * D + 2), 4),
        SavedActivation("2 RMSNorm outputs (inputs of q/k/v and gate/up)", 2 * D, c),
        SavedActivation("q, k after RoPE, v", (N + 2 * K) * H, c, True),
        *_attention_residuals(cfg, seq_len),
        SavedActivation("attention output (input of o)", N * H, c, True),
        SavedActivation("gate, up, sigmoid, silu, gated product (SwiGLU)", 6 * F, c, True),
    ]


def _attention_residuals(cfg: ModelConfig, seq_len: int) -> list[SavedActivation]:
    N, c = cfg.num_heads, _dtype_bytes(cfg.compute_dtype)
    if cfg.attention_impl == "cudnn":  # flash attention keeps only the softmax logsumexp
        return [SavedActivation("softmax logsumexp (float32)", N, 4, True)]
    return [SavedActivation("masked scores (float32) and softmax max/sum", N * seq_len + 2 * N, 4, True),
            SavedActivation("attention probabilities", N * seq_len, c, True)]


def activation_bytes(entries: list[SavedActivation], tokens: float, tensor: int) -> float:
    return sum(tokens * e.elements * e.dtype_bytes / (tensor if e.tensor_sharded else 1) for e in entries)


def activation_bytes_per_device(cfg: ModelConfig, mesh_config: MeshConfig, batch_size: int,
                                seq_len: int, remat: Optional[str] = None) -> dict[str, float]:
    """Peak activation bytes of one device for a training step, by part.

    layers: `saved_activations_per_layer` x num_layers. recompute: under full/save_dots the
    backward re-creates one layer's full residual set at a time. weight_copies: compute-dtype
    casts of the weights the backward keeps (all layers' under none, one layer's otherwise,
    plus the lm head) when param and compute dtypes differ. attention_backward: gradients of
    the probabilities and scores (float32) of the layer being differentiated. logits: the loss's
    working set (`_logits_bytes`). batch shards over
    data x fsdp x expert; heads, mlp and vocab over tensor; embed-sized activations are
    replicated over tensor.
    """
    remat = remat or cfg.remat
    tokens = tokens_per_device(mesh_config, batch_size, seq_len)
    tensor = tensor_shards(mesh_config)
    D, c = cfg.embed_dim, _dtype_bytes(cfg.compute_dtype)
    saved = saved_activations_per_layer(cfg, seq_len, remat)
    layers = cfg.num_layers * activation_bytes(saved, tokens, tensor)
    full_layer = activation_bytes(saved_activations_per_layer(cfg, seq_len, "none"), tokens, tensor)
    parts = {
        "layers": layers,
        "recompute": 0.0 if remat == "none" else full_layer,
        "weight_copies": float(_weight_copy_bytes(cfg, mesh_config, remat)),
        "attention_backward": (0.0 if cfg.attention_impl == "cudnn"
                               else tokens * 2 * 4 * cfg.num_heads * seq_len / tensor),
        "final_norm": tokens * (4 * (2 * D + 2) + c * D),
        "logits": _logits_bytes(cfg, tokens, seq_len, tensor),
    }
    parts["total"] = sum(parts.values())
    return parts


def _logits_bytes(cfg: ModelConfig, tokens: float, seq_len: int, tensor: int) -> float:
    """The loss's working set: float32 logits and their gradient [B, T, V]; with
    model.loss_chunk, one chunk's, plus the float32 output-weight gradient [D, V] the chunks
    accumulate and the hidden-state gradient [B, T, D] they leave (loss.chunked_loss_sums)."""
    if not cfg.loss_chunk:
        return tokens * 2 * 4 * cfg.vocab_size / tensor
    chunk_tokens = tokens * min(cfg.loss_chunk, seq_len) / seq_len
    return ((chunk_tokens * 2 * 4 + 4 * cfg.embed_dim) * cfg.vocab_size / tensor
            + tokens * cfg.embed_dim * _dtype_bytes(cfg.compute_dtype))


def tokens_per_device(mesh_config: MeshConfig, batch_size: int, seq_len: int) -> float:
    shards = _batch_shards(mesh_config)
    if batch_size % shards:
        raise sharding.MeshError(f"batch {batch_size} is not divisible by the batch shards "
                                 f"data x fsdp x expert = {shards}; choose a multiple of {shards}")
    return batch_size // shards * seq_len


def _weight_copy_bytes(cfg: ModelConfig, mesh_config: MeshConfig, remat: str) -> int:
    if cfg.compute_dtype == cfg.param_dtype:
        return 0
    layer_names = tuple(n for n in MATMUL_WEIGHTS if n != "lm_head")
    layers = param_bytes_per_device(cfg, mesh_config, cfg.compute_dtype, layer_names)
    if remat != "none":
        layers //= cfg.num_layers
    head = cfg.embed_dim * cfg.vocab_size * _dtype_bytes(cfg.compute_dtype) // (
        mesh_config.fsdp * tensor_shards(mesh_config))
    return layers + head


def training_memory_per_device(cfg: ModelConfig, mesh_config: MeshConfig, batch_size: int,
                               seq_len: int, remat: Optional[str] = None) -> dict[str, float]:
    """Bytes per device of a training step with Adam, by part.

    params in param_dtype; master: a float32 copy when params are narrower (bf16); grads in
    param_dtype; adam: two float32 moments; batch: int32 tokens [B, T]; activations: under
    `remat` (default cfg.remat). All sharded as `model.param_shardings` over the mesh.
    """
    params = param_bytes_per_device(cfg, mesh_config)
    float32 = param_bytes_per_device(cfg, mesh_config, "float32")
    parts = {
        "params": float(params),
        "master_params": float(float32 if _dtype_bytes(cfg.param_dtype) < 4 else 0),
        "grads": float(params),
        "adam_moments": 2.0 * float32,
        "batch": 4.0 * tokens_per_device(mesh_config, batch_size, seq_len),
        "activations": activation_bytes_per_device(cfg, mesh_config, batch_size, seq_len, remat)["total"],
    }
    parts["total"] = sum(parts.values())
    return parts


def kv_cache_bytes(cfg: ModelConfig, batch_size: int, cache_len: int,
                   mesh_config: MeshConfig = MeshConfig(), dtype: Optional[str] = None) -> float:
    """Decode KV cache bytes per device: 2 (k and v) * L * B * S * K * H * bytes, with batch
    over data x fsdp x expert and kv heads over tensor (kv_cache.CACHE_AXES)."""
    itemsize = _dtype_bytes(dtype or cfg.compute_dtype)
    total = 2 * cfg.num_layers * batch_size * cache_len * cfg.num_kv_heads * cfg.resolved_head_dim * itemsize
    return total / (_batch_shards(mesh_config) * tensor_shards(mesh_config))


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_step_flops(cfg: ModelConfig, batch_size: int, context_len: int) -> float:
    """FLOPs of one decode step: per sequence 2N + attention over the context, 4 L S N_heads H."""
    attention = 4 * cfg.num_layers * context_len * cfg.num_heads * cfg.resolved_head_dim
    return float(batch_size * (2 * matmul_params(cfg) + attention))


def decode_weight_bytes(cfg: ModelConfig, batch_size: int) -> float:
    """Weight bytes one decode step reads, in param_dtype: every weight once, but of an untied
    embedding table only the B gathered rows."""
    counts = count_params_by_component(cfg)
    read = count_params(cfg) - (0 if cfg.tie_embeddings else counts["embedding"])
    rows = 0 if cfg.tie_embeddings else batch_size * cfg.embed_dim
    return float((read + rows) * _dtype_bytes(cfg.param_dtype))


def decode_step_bytes(cfg: ModelConfig, batch_size: int, context_len: int) -> float:
    """HBM bytes one decode step reads: the weights plus the whole KV cache of the context."""
    return decode_weight_bytes(cfg, batch_size) + kv_cache_bytes(cfg, batch_size, context_len)


def decode_arithmetic_intensity(cfg: ModelConfig, batch_size: int, context_len: int) -> float:
    """FLOPs per HBM byte of one decode step; below a device's ridge point it is memory bound."""
    return decode_step_flops(cfg, batch_size, context_len) / decode_step_bytes(cfg, batch_size, context_len)


def ridge_point(device: DeviceSpec) -> float:
    """FLOPs per byte at which a kernel turns compute bound: peak FLOP/s / HBM bytes/s."""
    return device.peak_flops / device.memory_bandwidth


def count_params_from_init(cfg: ModelConfig) -> int:
    """Parameters of `model.init_params`, traced with `jax.eval_shape` (nothing allocated)."""
    shapes = jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.key(0))
    return model.count_params(shapes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m jaxlm.accounting`: see jaxlm/accounting_report.py."""
    from jaxlm import accounting_report  # imports this module: not at the top

    return accounting_report.main(argv)


if __name__ == "__main__":
    sys.exit(main())
