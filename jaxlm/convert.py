"""Convert between Hugging Face model folders and jaxlm checkpoints, from the command line.

    python -m jaxlm.convert hf-to-jaxlm HF_DIR OUT_DIR [--dtype bfloat16]
    python -m jaxlm.convert jaxlm-to-hf CKPT_DIR OUT_DIR [--architecture MistralForCausalLM]
                                        [--max-shard-size 5GB]

A jaxlm checkpoint is, for now, a folder with
    config.json     `jaxlm.config.to_dict` of a `Config` (the resolved config, as everywhere)
    params/         the param pytree, written by orbax-checkpoint's StandardCheckpointer
    hf_source.json  optional: {"architecture": ...} of the HF folder it came from, so that a
                    Mistral without a sliding window goes back as Mistral rather than Llama
`save_checkpoint` / `load_checkpoint` are the only code that knows this layout, so that
jaxlm/checkpoint.py can absorb them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from jaxlm import hf, hf_config, model, sharding
from jaxlm.config import Config, from_dict, to_dict

SOURCE_FILE = "hf_source.json"
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def save_checkpoint(path: str | os.PathLike, cfg: Config, params: dict,
                    hf_architecture: Optional[str] = None) -> None:
    """Write config.json and params/ (orbax) into a new folder, atomically."""
    with hf.atomic_directory(path) as folder:
        (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        if hf_architecture is not None:
            (folder / SOURCE_FILE).write_text(json.dumps({"architecture": hf_architecture}) + "\n")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(folder / "params", params)
            checkpointer.wait_until_finished()


def load_checkpoint(path: str | os.PathLike, mesh: Optional[Mesh] = None) -> tuple[Config, dict]:
    """(Config, params) of a folder written by `save_checkpoint`, placed on `mesh` if given."""
    folder = Path(path).absolute()
    cfg = from_dict(Config, json.loads((folder / "config.json").read_text()))
    specs = model.param_specs(cfg.model)
    if mesh is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), specs,
                                 is_leaf=lambda x: isinstance(x, model.ParamSpec))
    else:
        shardings = model.param_shardings(cfg.model, mesh)
    target = jax.tree.map(
        lambda spec, sharding: jax.ShapeDtypeStruct(spec.shape, cfg.model.param_dtype,
                                                    sharding=sharding),
        specs, shardings, is_leaf=lambda x: isinstance(x, model.ParamSpec))
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(folder / "params", target)
    return cfg, params


def source_architecture(path: str | os.PathLike) -> Optional[str]:
    """The HF architecture recorded by hf-to-jaxlm, or None."""
    source = Path(path) / SOURCE_FILE
    return json.loads(source.read_text())["architecture"] if source.exists() else None


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes (KB/MB/GB decimal as in HF, KiB/MiB/GiB binary, or plain bytes)."""
    stripped = text.strip().upper()
    for unit, scale in sorted(SIZE_UNITS.items(), key=lambda item: -len(item[0])):
        if stripped.endswith(unit):
            return int(float(stripped[: -len(unit)]) * scale)
    if stripped.isdigit():
        return int(stripped)
    raise argparse.ArgumentTypeError(f"size {text!r} is not bytes or a number with "
                                     "KB, MB, GB, KiB, MiB or GiB")


def host_mesh() -> Mesh:
    """A one-CPU-device mesh: conversion never needs accelerator memory."""
    try:
        devices = jax.devices("cpu")[:1]
    except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend
        devices = jax.devices()[:1]
    return sharding.make_mesh("", devices=devices)


def hf_to_jaxlm(hf_dir: str, out_dir: str, dtype: Optional[str] = None) -> None:
    cfg, params = hf.load_pretrained(hf_dir, dtype=dtype, mesh=host_mesh())
    architecture = hf_config.architecture_of(json.loads((Path(hf_dir) / "config.json").read_text()))
    save_checkpoint(out_dir, Config(model=cfg), params, hf_architecture=architecture)


def jaxlm_to_hf(checkpoint_dir: str, out_dir: str, architecture: Optional[str] = None,
                max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES) -> None:
    cfg, params = load_checkpoint(checkpoint_dir, mesh=host_mesh())
    architecture = architecture or source_architecture(checkpoint_dir)
    hf.save_pretrained(cfg.model, params, out_dir, architecture=architecture,
                       max_shard_bytes=max_shard_bytes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_jaxlm = commands.add_parser("hf-to-jaxlm", help="HF folder -> jaxlm checkpoint")
    to_jaxlm.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json and *.safetensors")
    to_jaxlm.add_argument("out_dir", metavar="OUT_DIR", help="new jaxlm checkpoint folder")
    to_jaxlm.add_argument("--dtype", default=None,
                          help="param dtype (default: the checkpoint's torch_dtype)")
    to_hf = commands.add_parser("jaxlm-to-hf", help="jaxlm checkpoint -> HF folder")
    to_hf.add_argument("checkpoint_dir", metavar="CKPT_DIR", help="jaxlm checkpoint folder")
    to_hf.add_argument("out_dir", metavar="OUT_DIR", help="new HF model folder")
    to_hf.add_argument("--architecture", choices=hf_config.SUPPORTED_ARCHITECTURES, default=None,
                       help="default: the one recorded at conversion, else inferred from the config")
    to_hf.add_argument("--max-shard-size", type=parse_size, default=hf.DEFAULT_MAX_SHARD_BYTES,
                       help="split model.safetensors into shards of at most this size (default 5GB)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-jaxlm":
            hf_to_jaxlm(args.hf_dir, args.out_dir, args.dtype)
        else:
            jaxlm_to_hf(args.checkpoint_dir, args.out_dir, args.architecture, args.max_shard_size)
    except (hf.CheckpointError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
