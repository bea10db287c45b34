"""Device mesh over ("data", "fsdp", "tensor") and the one table from logical to mesh axes.

The model names logical axes only (batch, seq, embed, heads, kv_heads, head_dim, mlp,
vocab, layers). `RULES` maps them: parameters are sharded FSDP-style over "fsdp" on their
embed axis and tensor-parallel over "tensor" on heads/mlp/vocab; the batch over
("data", "fsdp"). Use `activate(mesh)` around tracing so that the model's logical
constraints resolve.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Fill one -1 in (data, fsdp, tensor) with what the other axes leave of n_devices."""
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if n_devices % known:
            raise ValueError(f"mesh shape {tuple(shape)} does not divide {n_devices} devices")
        shape[shape.index(-1)] = n_devices // known
    if int(np.prod(shape)) != n_devices:
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {n_devices}")
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
    """A mesh over (data, fsdp, tensor); default: FSDP over every device."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(shape, len(devices))
    # Auto axes: the model's logical constraints (with_sharding_constraint) need them.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=RULES):
    """Make `mesh` and the logical rules current (for tracing the model under jit)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


class ShardingWarning(UserWarning):
    """A parameter axis is left unsplit (replicated) because its mesh axes do not divide it."""


def logical_to_shardings(boxed_tree, mesh: Mesh, rules=RULES):
    """NamedShardings for a tree of flax LogicallyPartitioned boxes (e.g. from eval_shape).

    An axis whose size the mesh axes do not divide (2 kv heads over a tensor axis of 4)
    stays unsplit on them, i.e. replicated, and one ShardingWarning names every such
    array, its shape, the mesh axes and their size.
    """
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    shapes = jax.tree.map(lambda x: np.shape(x.value if is_box(x) else x), boxed_tree, is_leaf=is_box)
    unsplit: list[str] = []

    def fit(path, sh, shape):
        fitted = _fit(sh, shape, mesh)
        if fitted is not sh:
            unsplit.append(_describe_unsplit(jax.tree_util.keystr(path, simple=True, separator="/"),
                                             shape, sh.spec, mesh))
        return fitted
    fitted = jax.tree_util.tree_map_with_path(fit, shardings, shapes, is_leaf=lambda x: isinstance(x, NamedSharding))
    if unsplit:
        # Warn, not raise: replicating what does not divide is correct, and for kv heads
        # (GQA with fewer kv heads than the tensor axis) it is what users expect, as
        # vLLM and MaxText replicate kv heads over tensor ranks. What users do not expect is
        # to learn it from an out-of-memory error, so it is never silent: the warning
        # gives the memory multiplier (the axis size) to choose a mesh by.
        warnings.warn(f"{len(unsplit)} array(s) not split as the sharding rules ask, because the "
                      "mesh axes do not divide them; they are replicated over those axes:\n  "
                      + "\n  ".join(unsplit), ShardingWarning, stacklevel=2)
    return fitted


def _describe_unsplit(name: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> str:
    parts = []
    for dim, (axes, ok) in enumerate(zip(spec, divides(shape, spec, mesh))):
        if not ok:
            names = axes if isinstance(axes, tuple) else (axes,)
            size = int(np.prod([mesh.shape[a] for a in names]))
            parts.append(f"dim {dim} ({shape[dim]}) over mesh axis {'x'.join(names)} of size {size}")
    return f"{name} {tuple(shape)}: " + ", ".join(parts) + " -> replicated"


def divides(shape: Sequence[int], spec: PartitionSpec, mesh) -> list[bool]:
    """Per dimension: whether the mesh axes `spec` puts on it split it evenly."""
    def size(axes):
        if axes is None:
            return 1
        return int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
    return [shape[i] % size(axes) == 0 for i, axes in enumerate(spec)]


def _fit(sharding: NamedSharding, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    spec = [a if ok else None for a, ok in zip(sharding.spec, divides(shape, sharding.spec, mesh))]
    return NamedSharding(mesh, PartitionSpec(*spec)) if spec != list(sharding.spec) else sharding


def logical_sharding(mesh: Mesh, names: Sequence[str | None], rules=RULES) -> NamedSharding:
    """The NamedSharding of one array with the given logical axis names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(names), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
