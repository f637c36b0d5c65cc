"""The device mesh and the one table that maps logical dimension names to mesh axes.

Words: an *axis* is a mesh axis; a *dim* is an array dimension.

The mesh always has the four axes `data`, `fsdp`, `tensor`, `expert` (size 1 when unused), so
every PartitionSpec in the project can name any of them on any mesh. Arrays are described by
*logical* dim names (`batch`, `embed`, `heads`, ...); `LOGICAL_RULES` says which mesh axes shard
each name. Parameters are declared once with their logical names (model.py) and are created
already sharded; activations are constrained only at block boundaries.

Conventions:
- `batch -> (data, fsdp, expert)`: data parallelism, FSDP and expert parallelism all split the
  batch (outside the MoE layers, `expert` is one more data-parallel axis).
- `embed -> fsdp`: FSDP (ZeRO-3) shards every weight along its embedding dim.
- `heads, kv_heads, mlp, vocab -> tensor`: Megatron-style tensor parallelism.
- A logical name of `None` means replicated. Using one mesh axis twice in a spec is an error.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")

LogicalAxes = tuple[Optional[str], ...]

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "experts": ("expert",),
    "layers": (),
    "cache_seq": (),
}


class MeshError(ValueError):
    """A mesh that does not fit the devices, or an array that does not fit the mesh."""


def parse_mesh(spec: str) -> MeshConfig:
    """`"data=8,tensor=2"` -> MeshConfig(data=8, fsdp=1, tensor=2, expert=1)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES:
            raise MeshError(f"unknown mesh axis {name!r} in {spec!r}; axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise MeshError(f"mesh axis {name!r} given twice in {spec!r}")
        if not value.isdigit() or int(value) < 1:
            raise MeshError(f"mesh axis {name}={value!r} in {spec!r} must be a positive integer")
        sizes[name] = int(value)
    return MeshConfig(**sizes)


def make_mesh(spec: str | MeshConfig = "", devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A `jax.sharding.Mesh` with axes (data, fsdp, tensor, expert) from `"fsdp=4,tensor=2"`.

    An empty spec puts every device on `data`. The product of the sizes must equal the number
    of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(spec, str):
        spec = parse_mesh(spec) if spec else MeshConfig(data=len(devices))
    sizes = tuple(getattr(spec, axis) for axis in MESH_AXES)
    if math.prod(sizes) != len(devices):
        described = ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
        raise MeshError(
            f"mesh {described} needs {math.prod(sizes)} devices but {len(devices)} are available; "
            f"make the product of the axis sizes equal {len(devices)}"
        )
    # Auto axes: shardings are hints that XLA's partitioner propagates (GSPMD), not types.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)


def batch_shards(mesh) -> int:
    """How many ways `batch` is split on `mesh` (a Mesh or AbstractMesh): the product of the
    sizes of its `LOGICAL_RULES["batch"]` axes."""
    return math.prod(mesh.shape.get(axis, 1) for axis in LOGICAL_RULES["batch"])


def logical_to_spec(axes: LogicalAxes, rules: Mapping[str, tuple[str, ...]] = LOGICAL_RULES) -> PartitionSpec:
    """Logical dim names -> PartitionSpec, checking that no mesh axis is used twice."""
    used: list[str] = []
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise MeshError(f"unknown logical dim {name!r}; known: {', '.join(rules)}")
        mesh_axes = rules[name]
        for axis in mesh_axes:
            if axis in used:
                raise MeshError(f"mesh axis {axis!r} used twice in logical spec {axes}")
            used.append(axis)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (tuple(mesh_axes) or None))
    return PartitionSpec(*spec)


def check_divisible(name: str, shape: Sequence[int], axes: LogicalAxes, mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...]] = LOGICAL_RULES) -> None:
    """Raise if a dim of `shape` is not divisible by the mesh axes that shard it."""
    for dim, (size, logical) in enumerate(zip(shape, axes)):
        if logical is None:
            continue
        mesh_axes = rules[logical]
        shards = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % shards:
            raise MeshError(
                f"parameter {name!r} dim {dim} ({logical}={size}) is not divisible by mesh axes "
                f"{'x'.join(mesh_axes)} of size {shards}; choose a mesh whose "
                f"{'x'.join(mesh_axes)} size divides {size}"
            )


def named_sharding(mesh: Mesh, axes: LogicalAxes) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes))


def constrain(x: jax.Array, axes: LogicalAxes, mesh: Optional[Mesh]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes))


def sharding_table(params, axes_tree, mesh: Mesh) -> str:
    """A printable per-parameter table: name, shape, dtype, logical dims, spec, bytes per device."""
    from flax.traverse_util import flatten_dict

    flat_params = flatten_dict(params, sep=".")
    flat_axes = flatten_dict(axes_tree, sep=".")
    rows = [("parameter", "shape", "dtype", "logical dims", "partition spec", "MiB/device")]
    total = 0
    for name, array in sorted(flat_params.items()):
        axes = flat_axes[name]
        spec = logical_to_spec(axes)
        shards = 1
        for entry in spec:
            for axis in (entry if isinstance(entry, tuple) else (entry,)):
                if axis is not None:
                    shards *= mesh.shape[axis]
        nbytes = int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize // shards
        total += nbytes
        rows.append((name, str(tuple(array.shape)), str(np.dtype(array.dtype)),
                     str(tuple(axes)), str(tuple(spec)), f"{nbytes / 2**20:.2f}"))
    rows.append(("total", "", "", "", "", f"{total / 2**20:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)
