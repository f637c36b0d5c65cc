"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 and Qwen3 causal language models.

    cfg, params = load_pretrained("some/hf_folder", dtype=None, mesh=None)
    save_pretrained(cfg, params, "out_folder", architecture=None)

A Hugging Face folder holds config.json and one `model.safetensors`, or several shards named in
`model.safetensors.index.json`. The four architectures share Llama's tensor names; they differ
only in options that map to `ModelConfig` fields: Qwen2 adds q/k/v biases (`qkv_bias`), Qwen3 an
RMSNorm of q and k over head_dim (`qk_norm`), Mistral a sliding window (`sliding_window`).

Layouts. HF `Linear` weights are [out, in]; jaxlm weights are [in, out] with heads split out, and
per-layer tensors are stacked on a leading `layers` dim (see `model.param_specs`). So q_proj
[N*H, D] becomes q [L, D, N, H], o_proj [D, N*H] becomes o [L, N, H, D], lm_head [V, D] becomes
[D, V]. RoPE needs no permutation: jaxlm uses HF's rotate-half layout (layers.py).

config.json maps to and from `ModelConfig` in jaxlm/hf_config.py. Safetensors files are read and
written by jaxlm/safetensors_io.py, through memory maps (bf16 included, no torch): loading makes
one host copy per stacked leaf, then puts it straight on its devices.

Checks: an unsupported architecture or option, a missing tensor or a shape mismatch is a
`CheckpointError` naming it. Unexpected extra tensors are errors too: an extra tensor almost
always means a feature jaxlm would silently drop (an o_proj bias, say), giving wrong logits.
Only rotary `inv_freq` buffers and a duplicate `lm_head.weight` of tied embeddings are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlm import model
from jaxlm import moe as moe_lib
from jaxlm.config import ModelConfig
from jaxlm.hf_config import check_representable, config_from_hf, config_to_hf, infer_architecture
from jaxlm.safetensors_io import INDEX_FILE, CheckpointError, SafetensorsFolder, write_safetensors

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's default shard size, "5GB"

@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `path`; rename it to `path` only on success.

    A failure part-way leaves no half-written `path`. An existing `path` is an error unless
    `overwrite`, in which case it is replaced after the new folder is complete.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose a new folder or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: not tempfile.mkdtemp, whose folder is private (0700) whatever the umask.
    temporary = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:12]}"
    temporary.mkdir()
    try:
        yield temporary
        if path.exists():
            shutil.rmtree(path)
        temporary.rename(path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)


# ---------------------------------------------------------------------------------------------
# Tensor names and layouts


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """Where one jaxlm leaf lives in an HF checkpoint: name ('{layer}' if per layer) and layout.

    `transpose`: an HF Linear weight, stored [out, in]; jaxlm keeps [in, out] split into dims.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    transpose: bool = False

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_name

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf_name

    def to_jaxlm(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (array.T if self.transpose else array).reshape(shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        if self.transpose:
            return array.reshape(self.hf_shape[::-1]).T
        return array.reshape(self.hf_shape)


def tensor_rules(cfg: ModelConfig) -> dict[str, TensorRule]:
    """HF name and layout of every possible jaxlm leaf, keyed by its dotted path in params."""
    D, N, K, H, F, V = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                        cfg.mlp_dim, cfg.vocab_size)
    layer = "model.layers.{layer}."
    return {
        "embed": TensorRule("model.embed_tokens.weight", (V, D)),
        "blocks.attn_norm": TensorRule(layer + "input_layernorm.weight", (D,)),
        "blocks.attn.q": TensorRule(layer + "self_attn.q_proj.weight", (N * H, D), True),
        "blocks.attn.k": TensorRule(layer + "self_attn.k_proj.weight", (K * H, D), True),
        "blocks.attn.v": TensorRule(layer + "self_attn.v_proj.weight", (K * H, D), True),
        "blocks.attn.o": TensorRule(layer + "self_attn.o_proj.weight", (D, N * H), True),
        "blocks.attn.q_bias": TensorRule(layer + "self_attn.q_proj.bias", (N * H,)),
        "blocks.attn.k_bias": TensorRule(layer + "self_attn.k_proj.bias", (K * H,)),
        "blocks.attn.v_bias": TensorRule(layer + "self_attn.v_proj.bias", (K * H,)),
        "blocks.attn.q_norm": TensorRule(layer + "self_attn.q_norm.weight", (H,)),
        "blocks.attn.k_norm": TensorRule(layer + "self_attn.k_norm.weight", (H,)),
        "blocks.mlp_norm": TensorRule(layer + "post_attention_layernorm.weight", (D,)),
        "blocks.mlp.gate": TensorRule(layer + "mlp.gate_proj.weight", (F, D), True),
        "blocks.mlp.up": TensorRule(layer + "mlp.up_proj.weight", (F, D), True),
        "blocks.mlp.down": TensorRule(layer + "mlp.down_proj.weight", (D, F), True),
        "final_norm": TensorRule("model.norm.weight", (D,)),
        "lm_head": TensorRule("lm_head.weight", (V, D), True),
        **(_moe_tensor_rules(cfg) if cfg.num_experts else {}),
    }


def _moe_tensor_rules(cfg: ModelConfig) -> dict[str, TensorRule]:
    """"moe_blocks.*": attention as in "blocks", the router and per-expert SwiGLU weights.

    The router bias has no HF tensor (ROUTER_BIAS: zeros on load, must be zeros on save).
    """
    D, E, F = cfg.embed_dim, cfg.num_experts, cfg.expert_mlp_dim or cfg.mlp_dim
    layer = "model.layers.{layer}."
    if infer_architecture(cfg) == "MixtralForCausalLM":
        moe, names = layer + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        moe, names = layer + "mlp.", ("gate_proj", "up_proj", "down_proj")
    dense = {path: rule for path, rule in tensor_rules(dataclasses.replace(cfg, num_experts=0)).items()
             if path.startswith("blocks.") and ".mlp." not in path}
    rules = {"moe_" + path: rule for path, rule in dense.items()}
    rules.update({
        "moe_blocks.moe.router": TensorRule(moe + "gate.weight", (E, D), True),
        "moe_blocks.moe.gate": TensorRule(moe + "experts.{expert}." + names[0] + ".weight", (F, D), True),
        "moe_blocks.moe.up": TensorRule(moe + "experts.{expert}." + names[1] + ".weight", (F, D), True),
        "moe_blocks.moe.down": TensorRule(moe + "experts.{expert}." + names[2] + ".weight", (D, F), True),
    })
    return rules


ROUTER_BIAS = "moe_blocks.moe.router_bias"


def _layers_of(path: str, cfg: ModelConfig) -> list[int]:
    """Global layer numbers of a stacked leaf, in stack order."""
    if not cfg.num_experts:
        return list(range(cfg.num_layers))
    dense, routed = moe_lib.layer_indices(cfg)
    return routed if path.startswith("moe_blocks.") else dense


def _hf_names(rule: TensorRule, layers: list[int], num_experts: int = 0) -> list[str]:
    """HF names of a leaf, layer-major then expert."""
    if rule.per_expert:
        return [rule.hf_name.format(layer=i, expert=e) for i in layers for e in range(num_experts)]
    if rule.per_layer:
        return [rule.hf_name.format(layer=i) for i in layers]
    return [rule.hf_name]


def _flat_specs(cfg: ModelConfig):
    """([(dotted path, ParamSpec)], treedef) of model.param_specs, in tree order."""
    leaves, treedef = jax.tree.flatten_with_path(model.param_specs(cfg),
                                                 is_leaf=lambda x: isinstance(x, model.ParamSpec))
    named = [(".".join(str(key.key) for key in path), spec) for path, spec in leaves]
    return named, treedef


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    """Tensors a checkpoint may carry that jaxlm recomputes or shares."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


def _check_tensors(folder: SafetensorsFolder, cfg: ModelConfig) -> None:
    """Every expected tensor present with the expected shape, and nothing else."""
    rules, (named_specs, _) = tensor_rules(cfg), _flat_specs(cfg)
    expected, present = set(), folder.names()
    searched = ", ".join(file.name for file in folder.files)
    for path, _ in named_specs:
        if path == ROUTER_BIAS:
            continue
        rule = rules[path]
        for name in _hf_names(rule, _layers_of(path, cfg), cfg.num_experts):
            expected.add(name)
            if name not in present:
                raise CheckpointError(f"tensor {name!r} (jaxlm {path}) is missing; searched "
                                      f"{searched}")
            if folder.shape(name) != rule.hf_shape:
                raise CheckpointError(f"tensor {name!r} has shape {folder.shape(name)} but the "
                                      f"config expects {rule.hf_shape}")
    unexpected = sorted(n for n in present - expected if not _ignorable(n, cfg))
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensors that jaxlm would ignore, "
                              f"e.g. {', '.join(unexpected[:5])}; the model would be wrong "
                              "without them")


# ---------------------------------------------------------------------------------------------
# Load and save


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def _param_dtype(hf: dict, folder: SafetensorsFolder, dtype) -> str:
    if dtype is not None:
        return _dtype_name(dtype)
    stored = hf.get("torch_dtype") or hf.get("dtype")
    if stored in ("float32", "bfloat16", "float16", "float64"):
        return stored
    return _dtype_name(folder.dtype("model.embed_tokens.weight"))


def _read_leaf(folder: SafetensorsFolder, path: str, rule: Optional[TensorRule],
               spec: model.ParamSpec, cfg: ModelConfig) -> np.ndarray:
    """One jaxlm leaf on the host, stacked over layers (and experts), cast to cfg.param_dtype."""
    dtype = jnp.dtype(cfg.param_dtype)
    if path == ROUTER_BIAS:
        return np.zeros(spec.shape, dtype)
    if not rule.per_layer:
        return rule.to_jaxlm(folder.read(rule.hf_name), spec.shape).astype(dtype)
    stacked = np.empty(spec.shape, dtype)
    names = _hf_names(rule, _layers_of(path, cfg), cfg.num_experts)
    inner = spec.shape[2:] if rule.per_expert else spec.shape[1:]
    flat = stacked.reshape(len(names), *inner)
    for index, name in enumerate(names):
        flat[index] = rule.to_jaxlm(folder.read(name), inner)
    return stacked


def load_pretrained(path: str | os.PathLike, *, dtype=None,
                    mesh: Optional[Mesh] = None) -> tuple[ModelConfig, dict]:
    """(cfg, params) of an HF Llama/Mistral/Qwen2/Qwen3 folder.

    dtype: cast params to it and compute in it; None keeps the checkpoint's torch_dtype for
    params and computes in float32. mesh: place params with `model.param_shardings` (one leaf
    at a time, so the host holds at most one leaf beyond the memory-mapped files).
    """
    folder_path = Path(path)
    if not (folder_path / "config.json").exists():
        raise CheckpointError(f"{folder_path} has no config.json; is it a Hugging Face model folder?")
    hf = json.loads((folder_path / "config.json").read_text())
    cfg = config_from_hf(hf)
    folder = SafetensorsFolder.open(folder_path)
    cfg = dataclasses.replace(cfg, param_dtype=_param_dtype(hf, folder, dtype),
                              compute_dtype="float32" if dtype is None else _dtype_name(dtype))
    _check_tensors(folder, cfg)
    rules, (named_specs, treedef) = tensor_rules(cfg), _flat_specs(cfg)
    shardings = (jax.tree.leaves(model.param_shardings(cfg, mesh)) if mesh is not None
                 else [None] * len(named_specs))
    leaves = [jax.device_put(_read_leaf(folder, path, rules.get(path), spec, cfg), leaf_sharding)
              for (path, spec), leaf_sharding in zip(named_specs, shardings)]
    return cfg, jax.tree.unflatten(treedef, leaves)


def hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """The HF-named host tensors of `params`, in checkpoint order (embedding, layers, head)."""
    rules, (named_specs, treedef) = tensor_rules(cfg), _flat_specs(cfg)
    leaves = jax.tree.leaves(params)
    if len(leaves) != len(named_specs) or jax.tree.structure(params) != treedef:
        raise CheckpointError(f"params do not have the structure of model.param_specs(cfg); "
                              f"expected leaves {[path for path, _ in named_specs]}")
    per_layer: dict[int, dict[str, np.ndarray]] = {i: {} for i in range(cfg.num_layers)}
    tensors: dict[str, np.ndarray] = {}
    for (path, spec), leaf in zip(named_specs, leaves):
        if tuple(leaf.shape) != spec.shape:
            raise CheckpointError(f"param {path} has shape {tuple(leaf.shape)}, expected "
                                  f"{spec.shape}")
        host = np.asarray(leaf)
        if path == ROUTER_BIAS:
            if np.any(host != 0):
                raise CheckpointError("the router bias (auxiliary-loss-free balancing) is not zero; "
                                      "Hugging Face Mixtral/Qwen3-MoE have no router bias")
            continue
        rule = rules[path]
        if not rule.per_layer:
            tensors[rule.hf_name] = rule.to_hf(host)
            continue
        layers = _layers_of(path, cfg)
        names = _hf_names(rule, layers, cfg.num_experts)
        experts = max(cfg.num_experts, 1) if rule.per_expert else 1
        flat = host.reshape(len(names), *host.shape[2 if rule.per_expert else 1:])
        for index, name in enumerate(names):
            per_layer[layers[index // experts]][name] = rule.to_hf(flat[index])
    head = {name: tensors.pop(name) for name in ("model.norm.weight", "lm_head.weight")
            if name in tensors}
    for layer_tensors in per_layer.values():
        tensors.update(layer_tensors)
    return {**tensors, **head}


def _plan_shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of tensor names, in order, into shards of at most max_shard_bytes each
    (a single larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += array.nbytes
    return shards


def _write_tensors(folder: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", tensors)
        return
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file_name, {name: tensors[name] for name in names})
        weight_map.update({name: file_name for name in names})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_pretrained(cfg: ModelConfig, params: dict, path: str | os.PathLike, *,
                    architecture: Optional[str] = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    overwrite: bool = False) -> None:
    """Write `params` as an HF folder that transformers loads as `architecture`.

    architecture: default from cfg (`infer_architecture`). Tensors keep their dtype, which is
    recorded as torch_dtype. Tied embeddings write no lm_head.weight (transformers ties it).
    The folder appears only once complete (written to a temporary folder, then renamed).
    """
    architecture = architecture or infer_architecture(cfg)
    check_representable(cfg, architecture)
    tensors = hf_tensors(cfg, params)
    torch_dtype = _dtype_name(tensors["model.embed_tokens.weight"].dtype)
    hf = config_to_hf(cfg, architecture, torch_dtype)
    with atomic_directory(path, overwrite) as folder:
        (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        _write_tensors(folder, tensors, max_shard_bytes)
