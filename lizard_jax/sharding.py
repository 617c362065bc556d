"""Logical axis names -> mesh axes: one rules table for parameters and activations.

Parameters carry logical names (embed, heads, kv_heads, head_dim, mlp, vocab, norm, ...) from their init
(`nn.with_logical_partitioning`). The mesh has axes ("data", "fsdp", "tensor") (plus "context" for
context parallelism). A dimension that a mesh axis does not divide is replicated over that axis instead of
failing (e.g. SmolLM2's 3 KV heads on a tensor axis of 4), so any model runs on any mesh.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("feature", None),
    ("lora", None),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over all devices (of all processes) with axes data/fsdp/tensor; one axis may be -1 (the rest).

    `make_mesh({"data": 2, "tensor": 4})`; missing axes have size 1; by default everything goes to fsdp. A mesh
    without -1 that needs fewer devices than there are takes the first ones (e.g. `{"data": 1}`: one device).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"fsdp": -1})
    unknown = set(shape) - set(MESH_AXES) - {"context"}
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; allowed: {MESH_AXES + ('context',)}")
    names = [a for a in (*MESH_AXES, "context") if a in shape or a in MESH_AXES]
    sizes = [shape.get(a, 1) for a in names]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if -1 not in shape.values() and int(np.prod(sizes)) < len(devices):
        devices = devices[: int(np.prod(sizes))]
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def spec_for(shape: Sequence[int], logical: Sequence[str | None], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for an array of `shape` whose dims have `logical` names; skips axes that do not divide
    the dim or are already used by an earlier dim."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, logical):
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        keep = []
        size = 1
        for a in axes:
            if a not in mesh.shape or a in used:
                continue
            if dim % (size * mesh.shape[a]) == 0:
                keep.append(a)
                size *= mesh.shape[a]
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def param_shardings(abstract_boxed, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding per parameter from an abstract (boxed, logically partitioned) parameter tree."""

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return NamedSharding(mesh, spec_for(x.value.shape, x.names, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def activation_sharding(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int], rules=DEFAULT_RULES):
    return NamedSharding(mesh, spec_for(shape, logical, mesh, rules))
