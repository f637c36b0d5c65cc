"""Typed, frozen configuration and dotted command-line overrides.

Every config is a frozen dataclass, so it is hashable and can be a static argument of `jax.jit`.
Presets are Python files in the top-level `configs/` folder (importable as `jaxlm.configs.<name>`);
each defines `CONFIG`. Overrides are dotted paths into the nested dataclasses:

    cfg = load_config("tiny", ["--model.num_layers=4", "--model.attention_impl=cudnn"])

An unknown preset, an unknown key or a value of the wrong type raises `ConfigError`, whose message
lists what is valid. Values are parsed from strings according to the field's annotated type.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pathlib
import pkgutil
import sys
import types
import typing
from typing import Any, Literal, Optional

AttentionImpl = Literal["xla", "cudnn", "pallas"]
RematPolicy = Literal["none", "full", "save_dots"]
# Activations that `ModelConfig.remat_save` can add to a remat policy's saved set (model.py tags them).
REMAT_SAVE_NAMES = ("norm", "rope", "mlp_hidden")
DataLayout = Literal["windows", "documents"]
RouterType = Literal["softmax", "sigmoid"]
MoeDispatch = Literal["dropless", "capacity"]
Parameterization = Literal["standard", "mup"]
LossKernel = Literal["xla", "triton"]


class ConfigError(ValueError):
    """A preset, key or value that does not exist or does not parse."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (HF `rope_scaling` with rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only Llama-style Transformer.

    `head_dim=None` means embed_dim // num_heads. `num_kv_heads` must divide `num_heads`
    (1 = multi-query, num_heads = multi-head, anything between = grouped-query attention).
    """

    vocab_size: int = 32000
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 12
    head_dim: Optional[int] = None
    mlp_dim: int = 2048
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of q and k before RoPE
    sliding_window: Optional[int] = None  # Mistral: attend to at most this many past keys
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    attention_impl: AttentionImpl = "xla"
    remat: RematPolicy = "none"
    # Comma-separated activations the remat policy also keeps, trading memory for recompute in
    # the backward pass: norm (the RMSNorm outputs feeding q/k/v and gate/up), rope (q and k
    # after RoPE), mlp_hidden (silu(gate) * up, the down projection's input). "" = none.
    # (remat none keeps every activation anyway.)
    remat_save: str = ""
    # Layers per iteration of the layer scan; >= num_layers unrolls it fully (no loop: XLA keeps
    # each layer's saved activations in their own buffers instead of copying them into stacked
    # [L, ...] arrays, at the cost of compile time growing with depth).
    scan_unroll: int = 1
    # Training loss (loss.py): > 0 runs the output layer and cross-entropy this many sequence
    # positions at a time with the gradient computed in the forward pass, never holding the
    # [B, T, V] logits; 0 materializes them. loss_kernel "triton": the chunks' softmax and
    # gradient as Triton kernels (GPU, jax_triton; pallas_kernels/triton_cross_entropy.py).
    loss_chunk: int = 0
    loss_kernel: LossKernel = "xla"
    # Mixture-of-Experts (jaxlm/moe.py); num_experts=0 is a dense model and ignores the rest.
    num_experts: int = 0
    top_k: int = 2
    expert_mlp_dim: Optional[int] = None  # None = mlp_dim; smaller = fine-grained experts
    num_shared_experts: int = 0  # always-on experts of expert_mlp_dim each (DeepSeek)
    first_dense_layers: int = 0  # the first layers keep the dense MLP
    moe_every: int = 1  # then the last layer of every group of this many is MoE
    router: RouterType = "softmax"
    router_renormalize: bool = True  # top-k weights sum to 1 (Mixtral; Qwen3-MoE norm_topk_prob)
    routed_scaling: float = 1.0  # DeepSeek-V3 routed_scaling_factor
    moe_dispatch: MoeDispatch = "dropless"
    capacity_factor: float = 1.25  # "capacity" dispatch: slots per expert = ceil(cf * T * k / E)
    moe_balance_loss: float = 0.0  # coefficient of the Switch load-balancing loss
    moe_z_loss: float = 0.0  # coefficient of the ST-MoE router z-loss
    moe_bias_update_rate: float = 0.0  # > 0: auxiliary-loss-free balancing by bias updates
    # muP (jaxlm/mup.py): init scales, 1/head_dim attention, logits x mup_output_multiplier /
    # (embed_dim / mup_base_width) and per-matrix Adam learning rates relative to the base width.
    parameterization: Parameterization = "standard"
    mup_base_width: int = 256
    mup_output_multiplier: float = 1.0

    @property
    def remat_save_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.remat_save.split(",") if n.strip())

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.embed_dim // self.num_heads

    def __post_init__(self):
        positive = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                    "max_seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}"
            )
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ConfigError(
                f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads="
                f"{self.num_heads}; set model.head_dim explicitly"
            )
        unknown = [n for n in self.remat_save_names if n not in REMAT_SAVE_NAMES]
        if unknown:
            raise ConfigError(f"model.remat_save={self.remat_save!r}: unknown {', '.join(unknown)}; "
                              f"use a comma-separated subset of {', '.join(REMAT_SAVE_NAMES)}")
        if self.scan_unroll < 1:
            raise ConfigError(f"model.scan_unroll must be >= 1, got {self.scan_unroll}")
        if self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk must be >= 0 (0 = whole sequence), got {self.loss_chunk}")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")
        if self.num_experts:
            self._check_moe()
        if self.parameterization == "mup":
            self._check_mup()

    def _check_mup(self):
        if self.mup_base_width <= 0 or self.mup_output_multiplier <= 0:
            raise ConfigError(f"model.mup_base_width={self.mup_base_width} and model.mup_output_multiplier="
                              f"{self.mup_output_multiplier} must be positive")
        if self.tie_embeddings:
            raise ConfigError("model.parameterization=mup needs model.tie_embeddings=false: muP scales the "
                              "embedding and the output layer differently")

    def _check_moe(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"model.top_k={self.top_k} must be in [1, model.num_experts="
                              f"{self.num_experts}]")
        if self.moe_every < 1 or self.first_dense_layers < 0:
            raise ConfigError("model.moe_every must be >= 1 and model.first_dense_layers >= 0")
        routed_layers = self.num_layers - self.first_dense_layers
        if routed_layers < self.moe_every or routed_layers % self.moe_every:
            raise ConfigError(
                f"model.num_layers - model.first_dense_layers = {routed_layers} must be a positive "
                f"multiple of model.moe_every={self.moe_every} (groups of moe_every layers, the "
                f"last of each MoE)")
        if self.expert_mlp_dim is not None and self.expert_mlp_dim <= 0:
            raise ConfigError(f"model.expert_mlp_dim must be positive, got {self.expert_mlp_dim}")
        if self.capacity_factor <= 0 or self.num_shared_experts < 0:
            raise ConfigError("model.capacity_factor must be > 0 and model.num_shared_experts >= 0")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the four mesh axes; their product must equal the number of devices."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: batch, schedule, optimizer, data layout, evaluation and checkpoints.

    `batch_size` is global (sequences per optimizer step, over all devices and microbatches);
    `grad_accum` splits it into that many sequential microbatches. The learning rate warms up
    linearly over `warmup_steps`, then follows a cosine down to `lr * min_lr_ratio` at `steps`.
    `layout`: "windows" = random windows of seq_len + 1 tokens attending across documents;
    "documents" = the same windows with segment ids and positions restarting per document.
    `zero1` shards the Adam moments over the `data` axis (ZeRO-1). docs/design.md says why.
    """

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 512
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    z_loss: float = 0.0
    zero1: bool = False
    seed: int = 0
    layout: DataLayout = "windows"
    eval_fraction: float = 0.02
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 500
    keep_last: int = 3
    keep_every: Optional[int] = None
    skip_nonfinite: int = 0
    default_corpus_bytes: int = 2_000_000

    def __post_init__(self):
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "checkpoint_every",
                    "keep_last")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        non_negative = ("lr", "warmup_steps", "weight_decay", "clip_norm", "z_loss", "eps",
                        "eval_batches", "skip_nonfinite")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.grad_accum={self.grad_accum} must divide "
                              f"train.batch_size={self.batch_size}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.eval_fraction < 1:
            raise ConfigError("train.min_lr_ratio must be in [0, 1] and train.eval_fraction in [0, 1)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"train.beta1, train.beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.keep_every is not None and self.keep_every <= 0:
            raise ConfigError(f"train.keep_every must be positive or none, got {self.keep_every}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Later issues add `decode`, ... sections."""

    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()


# ---------------------------------------------------------------------------------------------
# Presets


def _configs_package() -> types.ModuleType:
    """`jaxlm.configs`: the installed package (the install maps the top-level configs/ folder to
    it), or, run from a source checkout that is not installed (`PYTHONPATH=.`), that folder."""
    try:
        return importlib.import_module("jaxlm.configs")
    except ImportError:
        folder = pathlib.Path(__file__).resolve().parent.parent / "configs"
        if not (folder / "__init__.py").is_file():
            raise ConfigError("the presets (jaxlm.configs) are not importable and no configs/ "
                              f"folder is next to {pathlib.Path(__file__).parent}; install jaxlm "
                              "(pip install -e . or uv sync)") from None
        spec = importlib.util.spec_from_file_location(
            "jaxlm.configs", folder / "__init__.py", submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["jaxlm.configs"] = package
        spec.loader.exec_module(package)
        return package


def list_presets() -> list[str]:
    """Names of the presets in configs/ (module names, e.g. 'tiny', '125m')."""
    configs = _configs_package()
    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if not m.name.startswith("_"))


def load_preset(name: str) -> Config:
    presets = list_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(presets)}")
    module = importlib.import_module(f"jaxlm.configs.{name}")
    return module.CONFIG


def load_config(preset: str, overrides: typing.Sequence[str] = ()) -> Config:
    """The preset with dotted `--section.key=value` overrides applied."""
    return apply_overrides(load_preset(preset), overrides)


# ---------------------------------------------------------------------------------------------
# Overrides


def apply_overrides(cfg: Any, overrides: typing.Sequence[str]) -> Any:
    """Apply `--a.b=value` (or `a.b=value`) strings to a nested frozen dataclass."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        path, raw = text.split("=", 1)
        cfg = _replace_path(cfg, path.split("."), raw, full_path=path)
    return cfg


def _replace_path(obj: Any, keys: list[str], raw: str, full_path: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    key = keys[0]
    if key not in fields:
        prefix = full_path[: len(full_path) - len(".".join(keys))]
        valid = ", ".join(prefix + name for name in fields)
        raise ConfigError(f"unknown config key {full_path!r}; valid keys here: {valid}")
    hints = typing.get_type_hints(type(obj))
    current = getattr(obj, key)
    if len(keys) > 1:
        if current is None:
            inner_type = _dataclass_in(hints[key])
            if inner_type is None:
                raise ConfigError(f"{full_path!r}: {key} has no sub-keys")
            current = inner_type()
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{full_path!r}: {key} is a value, not a section")
        return dataclasses.replace(obj, **{key: _replace_path(current, keys[1:], raw, full_path)})
    value = parse_value(raw, hints[key], full_path)
    try:
        return dataclasses.replace(obj, **{key: value})
    except ConfigError as error:
        raise ConfigError(f"{full_path}={raw}: {error}") from None


def _dataclass_in(annotation: Any) -> Optional[type]:
    for arg in typing.get_args(annotation) or (annotation,):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def parse_value(raw: str, annotation: Any, where: str) -> Any:
    """Parse `raw` as the annotated type (bool, int, float, str, Literal, Optional)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null"):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(raw, arg, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        if raw not in args:
            raise ConfigError(f"{where}={raw!r} is not one of {', '.join(map(str, args))}")
        return raw
    if annotation is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where}={raw!r} is not a bool (use true or false)")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            raise ConfigError(f"{where}={raw!r} is not a valid {annotation.__name__}") from None
    if annotation is str:
        return raw
    if dataclasses.is_dataclass(annotation):
        raise ConfigError(f"{where} is a section; set its keys, e.g. --{where}.<key>=value")
    raise ConfigError(f"{where}: cannot parse values of type {annotation}")


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict (written next to every checkpoint)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Inverse of `to_dict` for nested config dataclasses; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)} for {cls.__name__}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        inner = _dataclass_in(hints[key])
        kwargs[key] = from_dict(inner, value) if inner is not None and isinstance(value, dict) else value
    return cls(**kwargs)
