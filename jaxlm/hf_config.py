"""Hugging Face config.json <-> ModelConfig for the architectures jaxlm/hf.py loads and saves.

    cfg = config_from_hf(json.load(open("config.json")))
    hf_config = config_to_hf(cfg, infer_architecture(cfg), torch_dtype="bfloat16")

Llama, Mistral, Qwen2 and Qwen3 differ only in options that map to `ModelConfig` fields (q/k/v
biases, q/k RMSNorm, sliding window); Mixtral and Qwen3-MoE add the MoE fields. An unsupported
architecture or option, or a config that one cannot represent, is a `CheckpointError` naming it.
"""

from __future__ import annotations

from typing import Optional

from jaxlm.config import ModelConfig, RopeScaling
from jaxlm.safetensors_io import CheckpointError

MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
SUPPORTED_ARCHITECTURES = tuple(MODEL_TYPES)


def _require(hf: dict, key: str):
    if hf.get(key) is None:
        raise CheckpointError(f"config.json has no {key!r}, which jaxlm needs")
    return hf[key]


def architecture_of(hf: dict) -> str:
    """The one supported architecture named by an HF config, or a CheckpointError."""
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in MODEL_TYPES:
        shown = ", ".join(names) or f"none (model_type {hf.get('model_type')!r})"
        raise CheckpointError(f"unsupported architecture {shown}; jaxlm supports "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return names[0]


def _check_supported_options(hf: dict, architecture: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported; jaxlm's MLP is "
                              "SwiGLU (silu)")
    if architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM") and hf.get("attention_bias"):
        raise CheckpointError(f"{architecture} with attention_bias=true (biases on q, k, v and "
                              "o) is not supported; jaxlm has q/k/v biases only (Qwen2)")
    if hf.get("mlp_bias"):
        raise CheckpointError("mlp_bias=true is not supported; jaxlm's MLP has no biases")
    windowed_layers = "sliding_attention" in (hf.get("layer_types") or [])
    if architecture not in ("MistralForCausalLM", "MixtralForCausalLM") and (
            hf.get("use_sliding_window") or windowed_layers):
        raise CheckpointError(f"{architecture} with sliding-window layers (use_sliding_window or "
                              "layer_types) is not supported; only Mistral's all-layer window is")


def rope_scaling_from_hf(hf: dict) -> Optional[RopeScaling]:
    """`rope_scaling` (or transformers 5's `rope_parameters`) as a RopeScaling, None = plain."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise CheckpointError(f"rope_scaling type {rope_type!r} is not supported; supported: "
                              "none/'default' and 'llama3'")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_seq_len=int(scaling["original_max_position_embeddings"]),
    )


def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of an HF config dict (param_dtype/compute_dtype left at their defaults)."""
    architecture = architecture_of(hf)
    _check_supported_options(hf, architecture)
    embed_dim, num_heads = _require(hf, "hidden_size"), _require(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    return ModelConfig(
        vocab_size=_require(hf, "vocab_size"),
        embed_dim=embed_dim,
        num_layers=_require(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        # NOTE: None when it is the default, so configs compare equal after a round trip.
        head_dim=None if head_dim in (None, embed_dim // num_heads) else head_dim,
        mlp_dim=_require(hf, "intermediate_size"),
        max_seq_len=_require(hf, "max_position_embeddings"),
        rope_theta=float(rope_theta or 10000.0),
        rope_scaling=rope_scaling_from_hf(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=architecture == "Qwen2ForCausalLM",
        qk_norm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        sliding_window=(hf.get("sliding_window")
                        if architecture in ("MistralForCausalLM", "MixtralForCausalLM") else None),
        init_std=float(hf.get("initializer_range", 0.02)),
        **(_moe_fields_from_hf(hf, architecture) if architecture in MOE_ARCHITECTURES else {}),
    )


def _moe_fields_from_hf(hf: dict, architecture: str) -> dict:
    """Mixtral: every layer MoE, renormalized top-k. Qwen3-MoE: `mlp_only_layers` must be a
    dense prefix (-> first_dense_layers) or `decoder_sparse_step` groups (-> moe_every)."""
    fields = {"num_experts": hf.get("num_local_experts") or _require(hf, "num_experts"),
              "top_k": _require(hf, "num_experts_per_tok"), "router": "softmax"}
    if architecture == "MixtralForCausalLM":
        return {**fields, "router_renormalize": True}
    dense = sorted(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step", 1) or 1
    if dense != list(range(len(dense))) or (dense and step != 1):
        raise CheckpointError(f"Qwen3MoeForCausalLM with mlp_only_layers={dense} and "
                              f"decoder_sparse_step={step} is not supported; jaxlm needs dense "
                              "layers as a prefix (step 1) or every step-th layer MoE")
    return {**fields, "router_renormalize": bool(hf.get("norm_topk_prob", False)),
            "expert_mlp_dim": _require(hf, "moe_intermediate_size"),
            "first_dense_layers": len(dense), "moe_every": step}


def infer_architecture(cfg: ModelConfig) -> str:
    """MoE: qk_norm -> Qwen3-MoE, else Mixtral. Dense: qk_norm -> Qwen3, qkv_bias -> Qwen2,
    sliding_window -> Mistral, otherwise Llama."""
    if cfg.num_experts:
        return "Qwen3MoeForCausalLM" if cfg.qk_norm else "MixtralForCausalLM"
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM"
    if cfg.sliding_window is not None:
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


def check_representable(cfg: ModelConfig, architecture: str) -> None:
    if architecture not in MODEL_TYPES:
        raise CheckpointError(f"unsupported architecture {architecture!r}; jaxlm supports "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    needs = {"qk_norm": architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
             "qkv_bias": architecture == "Qwen2ForCausalLM"}
    if bool(cfg.num_experts) != (architecture in MOE_ARCHITECTURES):
        raise CheckpointError(f"{architecture} cannot hold a model with num_experts={cfg.num_experts}")
    if cfg.num_experts and (cfg.router != "softmax" or cfg.num_shared_experts or cfg.routed_scaling != 1.0):
        raise CheckpointError(f"{architecture} has a plain softmax router without shared experts; "
                              "the config has router, num_shared_experts or routed_scaling set")
    if architecture == "MixtralForCausalLM" and (
            cfg.first_dense_layers or cfg.moe_every != 1 or not cfg.router_renormalize
            or cfg.expert_mlp_dim not in (None, cfg.mlp_dim)):
        raise CheckpointError("MixtralForCausalLM has every layer MoE with renormalized top-k "
                              "weights and expert_mlp_dim = mlp_dim")
    if architecture == "Qwen3MoeForCausalLM" and cfg.first_dense_layers and cfg.moe_every != 1:
        raise CheckpointError("Qwen3MoeForCausalLM cannot have both first_dense_layers and moe_every > 1")
    for field, needed in needs.items():
        if getattr(cfg, field) != needed:
            raise CheckpointError(f"{architecture} {'needs' if needed else 'cannot have'} "
                                  f"model.{field}=True; the config has {getattr(cfg, field)}")
    if cfg.sliding_window is not None and architecture not in ("MistralForCausalLM", "MixtralForCausalLM"):
        raise CheckpointError(f"{architecture} cannot have a sliding window; use "
                              "MistralForCausalLM")


def config_to_hf(cfg: ModelConfig, architecture: str, torch_dtype: str) -> dict:
    """The config.json transformers needs to load `cfg` as `architecture`."""
    scaling = cfg.rope_scaling
    hf = {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if scaling is None else {
            "rope_type": "llama3", "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_seq_len},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }
    if architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        hf.update(attention_bias=False)
    if architecture == "MixtralForCausalLM":
        hf.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                  sliding_window=cfg.sliding_window, router_aux_loss_coef=cfg.moe_balance_loss)
    if architecture == "Qwen3MoeForCausalLM":
        hf.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                  moe_intermediate_size=cfg.expert_mlp_dim or cfg.mlp_dim,
                  norm_topk_prob=cfg.router_renormalize, decoder_sparse_step=cfg.moe_every,
                  mlp_only_layers=list(range(cfg.first_dense_layers)), use_sliding_window=False,
                  sliding_window=None, max_window_layers=cfg.num_layers,
                  router_aux_loss_coef=cfg.moe_balance_loss)
    if architecture == "LlamaForCausalLM":
        hf.update(mlp_bias=False, pretraining_tp=1)
    if architecture == "MistralForCausalLM":
        hf.update(sliding_window=cfg.sliding_window)
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return hf
