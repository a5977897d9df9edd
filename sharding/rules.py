"""The one table that maps logical axis names onto mesh axes, and helpers that turn it into shardings.

Every parameter and cache array declares logical axes where it is defined (`engine.model.PARAM_AXES`,
`engine.model.K_CACHE_AXES` / `V_CACHE_AXES`); nothing else in the code base names mesh axes.

Dims that do not divide their mesh axis are **replicated**, not padded (`resolve_rules`). Padding SmolLM2's 9 query /
3 kv heads to a multiple of the tensor axis would change array shapes (checkpoints, the cache layout, the attention
reshape into GQA groups) and spend FLOPs and bandwidth on fake heads; replicating keeps every shape and every number
as on one device and costs memory only: the replicated arrays are held whole on each device of the axis. The rule is
resolved once per logical axis for the whole model (so e.g. wq, wo, bq all stay consistent) and a warning says what
it costs. The MLP and vocab usually still divide, so most weight bytes stay sharded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    # weights: tensor-parallel over heads, MLP and vocab; the residual stream stays replicated
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    # KV cache: over kv heads (tensor) and over slots (data)
    "slots": "data",
    "cache_seq": None,
}


def validate_rules(rules: Mapping[str, MeshAxes]) -> None:
    """Refuses unknown keys' malformed values; collisions are checked per array in `logical_to_spec`."""
    for name, axes in rules.items():
        if axes is not None and not isinstance(axes, str | tuple):
            raise ValueError(f"rule for logical axis {name!r} must be a mesh axis name, a tuple of them, or None")


def _mesh_axes(axes: MeshAxes, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes of one rule that exist in `mesh` with size > 1 (size-1 axes shard nothing)."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)


def logical_to_spec(
    logical: Sequence[str | None],
    rules: Mapping[str, MeshAxes],
    mesh: Mesh,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps one array's logical axes to a PartitionSpec, refusing two dims on one mesh axis.

    With `shape`, a dim that does not divide its mesh axes is replicated (a safety net: `resolve_rules` has normally
    removed such rules already, with a warning).
    """
    used: dict[str, str] = {}
    out: list[MeshAxes] = []
    for i, name in enumerate(logical):
        axes = rules.get(name) if name is not None else None
        names = _mesh_axes(axes, mesh)
        if names and shape is not None and shape[i] % math.prod(mesh.shape[a] for a in names):
            names = ()
        for a in names:
            if a in used:
                raise ValueError(f"logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r}")
            used[a] = name
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def tree_shardings(logical_specs, rules: Mapping[str, MeshAxes], mesh: Mesh, shapes=None):
    """A NamedSharding per leaf of a tree of logical PartitionSpecs (`shapes`: a matching tree of arrays or
    ShapeDtypeStructs, for the divisibility safety net of `logical_to_spec`)."""
    if shapes is None:
        return jax.tree.map(
            lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh)),
            logical_specs,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
    return jax.tree.map(
        lambda spec, a: NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh, a.shape)),
        logical_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


@dataclasses.dataclass(frozen=True)
class ArrayLayout:
    """One named group of arrays (e.g. every layer's wq) with its logical axes: what the cost of a rule is paid on."""

    name: str
    logical: tuple[str | None, ...]
    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


_warned: set[str] = set()


def resolve_rules(
    rules: Mapping[str, MeshAxes],
    mesh: Mesh,
    sizes: Mapping[str, int],
    arrays: Sequence[ArrayLayout] = (),
    *,
    warn: bool = True,
) -> tuple[dict[str, MeshAxes], tuple[str, ...]]:
    """The rules in effect for a model on `mesh`: (effective table, one note per replicated logical axis).

    `sizes` gives each logical axis its length in this model (q_heads=9, ...). A logical axis whose length does not
    divide the product of its mesh axes is replicated (its rule becomes None); the note says what that costs per
    device, summed over `arrays`, and (with `warn`) is logged as a warning once per process.
    """
    validate_rules(rules)
    effective = dict(rules)
    notes: list[str] = []
    for name, axes in rules.items():
        names = _mesh_axes(axes, mesh)
        if not names or name not in sizes:
            continue
        ways = math.prod(mesh.shape[a] for a in names)
        if sizes[name] % ways == 0:
            continue
        effective[name] = None
        hit = [a for a in arrays if name in a.logical]
        # what the replicated arrays would take if this one axis were split (rounded up, as padding would)
        extra = sum(a.nbytes - a.nbytes // a.shape[a.logical.index(name)] * -(-sizes[name] // ways) for a in hit)
        axis_txt = "x".join(names)
        what = "/".join(a.name for a in hit) or "no arrays"
        notes.append(
            f"{name}={sizes[name]} does not divide {axis_txt}={ways}: replicating {what} over {axis_txt}, "
            f"+{extra / 2**20:.2f} MiB per device"
        )
    for note in notes if warn else ():
        if note not in _warned:
            _warned.add(note)
            log.warning("sharding: %s", note)
    return effective, tuple(notes)


def shard_bytes(arrays) -> int:
    """Bytes one device holds of a tree of sharded arrays / ShapeDtypeStructs (the largest shard, to be safe)."""
    total = 0
    for a in jax.tree.leaves(arrays):
        total += math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class ShardingReport:
    """The mesh, the rule table in effect and what each device holds: for the start-up log and GetModelInfo."""

    mesh: dict[str, int]
    """Mesh axis -> size."""
    num_processes: int
    """Processes (hosts) the mesh spans."""
    rules: dict[str, MeshAxes]
    """Logical axis -> mesh axes, as resolved for this model (replicated axes map to None)."""
    notes: tuple[str, ...]
    """One line per logical axis replicated because it does not divide its mesh axis, with its cost."""
    weight_bytes_per_device: int
    """Parameter bytes on each device."""
    kv_bytes_per_device: int
    """KV cache bytes (all slots, full context) on each device."""

    def describe(self) -> str:
        mesh = ",".join(f"{k}:{v}" for k, v in self.mesh.items())
        table = ", ".join(f"{k}->{describe_axes(v)}" for k, v in self.rules.items())
        lines = [
            f"mesh {mesh} over {self.num_processes} process(es); per device: weights "
            f"{self.weight_bytes_per_device / 2**20:.2f} MiB, KV cache {self.kv_bytes_per_device / 2**20:.2f} MiB",
            f"sharding rules: {table}",
            *(f"sharding: {n}" for n in self.notes),
        ]
        return "\n".join(lines)


def describe_axes(axes: MeshAxes) -> str:
    """A rule's mesh axes as text: "tensor", "data+tensor", or "replicated"."""
    if axes is None or axes == ():
        return "replicated"
    return axes if isinstance(axes, str) else "+".join(axes)


def single_device_mesh() -> Mesh:
    """A 1x1 (data, tensor) mesh on the first device: the default when no mesh is given."""
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
