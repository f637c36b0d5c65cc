"""The accounting report: every number of jaxlm.accounting for one preset, mesh and device,
as a JSON-ready dict and as text, and the `python -m jaxlm.accounting` command line.

    python -m jaxlm.accounting --config 1b --seq 2048 --batch 8 --mesh fsdp=8 --device h100

jaxlm/accounting.py holds the arithmetic (and runs `main` here when run as a module).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Optional, Sequence

import numpy as np

from jaxlm import model, sharding
from jaxlm.accounting import (DEVICES, DeviceSpec, REMAT_POLICIES, abstract_mesh,
                              activation_bytes, activation_bytes_per_device,
                              attention_flops_per_token, backward_flops_per_token,
                              check_device_count, count_active_params, count_params,
                              count_params_by_component, count_params_from_init,
                              decode_arithmetic_intensity, decode_step_bytes, decode_step_flops,
                              decode_weight_bytes, forward_flops_per_token,
                              hardware_flops_per_token, kv_cache_bytes, matmul_params,
                              ridge_point, saved_activations_per_layer, tensor_shards,
                              tokens_per_device, training_flops_per_token,
                              training_memory_per_device)
from jaxlm.config import Config, ConfigError, MeshConfig, ModelConfig, load_config


def _params_report(cfg: ModelConfig) -> dict:
    counts = count_params_by_component(cfg)
    per_layer = {name: counts[name] // cfg.num_layers for name in ("attention", "mlp")}
    per_layer["norms"] = 2 * cfg.embed_dim
    return {"by_component": counts, "per_layer": per_layer, "total": count_params(cfg),
            "active": count_active_params(cfg),
            "non_embedding": count_params(cfg, include_embedding=False),
            "matmul_params_N": matmul_params(cfg), "init_params_total": count_params_from_init(cfg)}


def _flops_report(cfg: ModelConfig, seq_len: int, tokens_per_step: int) -> dict:
    training = training_flops_per_token(cfg, seq_len)
    return {
        "matmul_6N": 6.0 * matmul_params(cfg),
        "attention_causal": attention_flops_per_token(cfg, seq_len, causal=True),
        "attention_full_mask": attention_flops_per_token(cfg, seq_len, causal=False),
        "training_model_flops": training,
        "forward": forward_flops_per_token(cfg, seq_len),
        "backward": backward_flops_per_token(cfg, seq_len),
        "hardware_by_remat": {p: hardware_flops_per_token(cfg, seq_len, p) for p in REMAT_POLICIES},
        "training_model_flops_per_step": training * tokens_per_step,
    }


def _memory_report(cfg: ModelConfig, mesh_config: MeshConfig, batch_size: int, seq_len: int) -> dict:
    tokens = tokens_per_device(mesh_config, batch_size, seq_len)
    tensor = tensor_shards(mesh_config)
    saved = {p: [{"name": e.name, "bytes_per_layer": activation_bytes([e], tokens, tensor)}
                 for e in saved_activations_per_layer(cfg, seq_len, p)] for p in REMAT_POLICIES}
    return {
        "training": training_memory_per_device(cfg, mesh_config, batch_size, seq_len),
        "activations_by_remat": {p: activation_bytes_per_device(cfg, mesh_config, batch_size, seq_len, p)
                                 for p in REMAT_POLICIES},
        "saved_per_layer": saved,
        "kv_cache": kv_cache_bytes(cfg, batch_size, seq_len, mesh_config),
    }


def _device_report(cfg: ModelConfig, mesh_config: MeshConfig, device: DeviceSpec, batch_size: int,
                   seq_len: int, assumed_mfu: float) -> dict:
    num_devices = math.prod(getattr(mesh_config, axis) for axis in sharding.MESH_AXES)
    step_flops = training_flops_per_token(cfg, seq_len) * batch_size * seq_len
    ideal = step_flops / (num_devices * device.peak_flops)
    decode_flops = decode_step_flops(cfg, batch_size, seq_len) / num_devices
    # NOTE: under data/fsdp every device still reads (gathers) all weights for its batch shard;
    # only tensor parallelism splits the weight reads.
    decode_bytes = (decode_weight_bytes(cfg, batch_size) / tensor_shards(mesh_config)
                    + kv_cache_bytes(cfg, batch_size, seq_len, mesh_config))
    return {
        "name": device.name, "peak_flops": device.peak_flops,
        "memory_bandwidth": device.memory_bandwidth, "memory_bytes": device.memory_bytes,
        "ridge_point": ridge_point(device),
        "step_seconds_at_100pct_mfu": ideal, "assumed_mfu": assumed_mfu,
        "step_seconds_at_assumed_mfu": ideal / assumed_mfu,
        "tokens_per_second_per_device_at_assumed_mfu":
            batch_size * seq_len * assumed_mfu / (ideal * num_devices),
        "decode_step_seconds_lower_bound": max(decode_flops / device.peak_flops,
                                               decode_bytes / device.memory_bandwidth),
    }


def build_report(cfg: Config, batch_size: int, seq_len: int, device: str = "h100",
                 assumed_mfu: float = 0.4) -> dict:
    """Every number the CLI prints, as a JSON-ready dict (bytes are per device)."""
    model_cfg, mesh_config = cfg.model, cfg.mesh
    model.param_shardings(model_cfg, abstract_mesh(mesh_config))  # raises MeshError if a dim does not divide
    num_devices = math.prod(getattr(mesh_config, axis) for axis in sharding.MESH_AXES)
    return {
        "model": dataclasses.asdict(model_cfg), "mesh": dataclasses.asdict(mesh_config),
        "num_devices": num_devices, "batch_size": batch_size, "seq_len": seq_len,
        "params": _params_report(model_cfg),
        "flops_per_token": _flops_report(model_cfg, seq_len, batch_size * seq_len),
        "memory_per_device": _memory_report(model_cfg, mesh_config, batch_size, seq_len),
        "decode": {"batch_size": batch_size, "context_len": seq_len,
                   "flops": decode_step_flops(model_cfg, batch_size, seq_len),
                   "bytes": decode_step_bytes(model_cfg, batch_size, seq_len),
                   "arithmetic_intensity": decode_arithmetic_intensity(model_cfg, batch_size, seq_len)},
        "device": _device_report(model_cfg, mesh_config, DEVICES[device], batch_size, seq_len, assumed_mfu),
    }


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,.0f}"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _flops(n: float) -> str:
    return f"{n / 1e12:.3f} TFLOP" if n >= 1e12 else f"{n / 1e9:.3f} GFLOP"


def _format_params(report: dict) -> list[str]:
    params = report["params"]
    lines = ["Parameters (from model.param_specs)"]
    lines += [f"  {name:<12} {_count(n):>10}" for name, n in params["by_component"].items()]
    lines.append("  per layer: " + ", ".join(f"{k} {_count(v)}" for k, v in params["per_layer"].items()))
    lines.append(f"  total {_count(params['total'])} (init_params: {_count(params['init_params_total'])}, "
                 f"{'agrees' if params['total'] == params['init_params_total'] else 'DIFFERS'}); "
                 f"without embedding {_count(params['non_embedding'])}")
    if params["active"] != params["total"]:
        lines.append(f"  active per token {_count(params['active'])} (top_k of num_experts routed experts)")
    lines.append(f"  matmul params N = layers' projections + lm head = {_count(params['matmul_params_N'])}"
                 " (embedding lookup is a gather: 0 FLOPs; MoE: active experts only)")
    return lines


def _format_flops(report: dict) -> list[str]:
    flops = report["flops_per_token"]
    lines = [f"Training FLOPs per token (seq {report['seq_len']})",
             f"  matmuls 6N                        {_flops(flops['matmul_6N'])}",
             f"  attention, causal-useful (MFU)    {_flops(flops['attention_causal'])}",
             f"  attention, full mask (XLA runs)   {_flops(flops['attention_full_mask'])}",
             f"  model FLOPs (6N + causal; MFU)    {_flops(flops['training_model_flops'])}"
             f"  = forward {_flops(flops['forward'])} + backward {_flops(flops['backward'])}"]
    lines += [f"  hardware FLOPs, remat={p:<9}   {_flops(v)}  (full-mask attention + recompute)"
              for p, v in flops["hardware_by_remat"].items()]
    per_step = _flops(flops["training_model_flops_per_step"])
    lines.append(f"  model FLOPs per step (batch {report['batch_size']}): {per_step}")
    return lines


def _format_memory(report: dict) -> list[str]:
    memory = report["memory_per_device"]
    mesh = ",".join(f"{axis}={size}" for axis, size in report["mesh"].items())
    lines = [f"Memory per device (mesh {mesh}, {report['num_devices']} devices, "
             f"remat={report['model']['remat']})"]
    lines += [f"  {name:<14} {_bytes(n):>12}" for name, n in memory["training"].items()]
    lines.append("  activations by remat policy:")
    for policy, parts in memory["activations_by_remat"].items():
        detail = ", ".join(f"{k} {_bytes(v)}" for k, v in parts.items() if k != "total" and v)
        lines.append(f"    {policy:<10} {_bytes(parts['total']):>12}  ({detail})")
    lines.append("  saved per layer:")
    for policy, entries in memory["saved_per_layer"].items():
        lines += [f"    {policy:<10} {e['name']}: {_bytes(e['bytes_per_layer'])}" for e in entries]
    lines.append(f"  decode KV cache (batch {report['batch_size']} x {report['seq_len']} positions): "
                 f"{_bytes(memory['kv_cache'])}")
    return lines


def _format_device(report: dict) -> list[str]:
    device, decode = report["device"], report["decode"]
    fits = report["memory_per_device"]["training"]["total"] <= device["memory_bytes"]
    return [
        f"Device {device['name']}: {device['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16, "
        f"{device['memory_bandwidth'] / 1e12:.2f} TB/s, {device['memory_bytes'] / 1e9:.0f} GB "
        f"(training state {'fits' if fits else 'does NOT fit'})",
        f"  step time: {device['step_seconds_at_100pct_mfu'] * 1e3:.1f} ms at 100% MFU, "
        f"{device['step_seconds_at_assumed_mfu'] * 1e3:.1f} ms at {device['assumed_mfu']:.0%} "
        f"({device['tokens_per_second_per_device_at_assumed_mfu']:,.0f} tokens/s/device)",
        f"Decode step (batch {decode['batch_size']}, context {decode['context_len']}): "
        f"{_flops(decode['flops'])}, {_bytes(decode['bytes'])} read, "
        f"{decode['arithmetic_intensity']:.1f} FLOP/byte vs ridge {device['ridge_point']:.0f} "
        f"({'memory' if decode['arithmetic_intensity'] < device['ridge_point'] else 'compute'} bound); "
        f">= {device['decode_step_seconds_lower_bound'] * 1e3:.2f} ms",
    ]


def format_report(report: dict) -> str:
    """The human-readable report of `build_report`."""
    sections = [_format_params(report), _format_flops(report), _format_memory(report), _format_device(report)]
    return "\n\n".join("\n".join(lines) for lines in sections)


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlm.accounting",
        description="Parameters, FLOPs, per-device memory and decode intensity of a preset.",
        epilog="Dotted overrides such as --model.num_layers=4 are applied to the preset.")
    parser.add_argument("--config", required=True, help="preset name in configs/ (e.g. tiny, 125m, 1b)")
    parser.add_argument("--seq", type=int, help="sequence length (default: model.max_seq_len)")
    parser.add_argument("--batch", type=int, default=8, help="global batch size in sequences")
    parser.add_argument("--mesh", default="", help="mesh sizes, e.g. fsdp=8 or data=2,tensor=4")
    parser.add_argument("--num-devices", type=int,
                        help="device count the mesh must match (default: the mesh's product)")
    parser.add_argument("--remat", choices=REMAT_POLICIES, help="remat policy (model.remat)")
    parser.add_argument("--dtype", help="parameter dtype (model.param_dtype), e.g. bfloat16")
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for time estimates")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _resolve_config(args: argparse.Namespace, overrides: list[str]) -> Config:
    extra = ([f"--model.remat={args.remat}"] * bool(args.remat)
             + [f"--model.param_dtype={args.dtype}"] * bool(args.dtype))
    cfg = load_config(args.config, overrides + extra)
    np.dtype(cfg.model.param_dtype)  # raises TypeError for an unknown dtype name
    mesh_config = sharding.parse_mesh(args.mesh) if args.mesh else MeshConfig(data=args.num_devices or 1)
    if args.num_devices is not None:
        check_device_count(mesh_config, args.num_devices)
    return dataclasses.replace(cfg, mesh=mesh_config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not (a.startswith("--") and "." in a.split("=")[0])]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        cfg = _resolve_config(args, rest)
        report = build_report(cfg, args.batch, args.seq or cfg.model.max_seq_len, args.device, args.mfu)
    except (ConfigError, sharding.MeshError, ValueError, TypeError) as error:
        parser.error(str(error))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
