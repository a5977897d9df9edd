"""The one table that maps logical axis names onto mesh axes, and helpers that turn it into shardings.

Every parameter and cache array declares logical axes where it is defined (`engine.model.PARAM_AXES`,
`engine.model.CACHE_AXES`); nothing else in the code base names mesh axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def logical_to_spec(logical: Sequence[str | None], rules: Mapping[str, MeshAxes], mesh: Mesh) -> PartitionSpec:
    """Maps one array's logical axes to a PartitionSpec, refusing two dims on one mesh axis."""
    used: dict[str, str] = {}
    out: list[MeshAxes] = []
    for name in logical:
        axes = rules.get(name) if name is not None else None
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
        for a in names:
            if a in used:
                raise ValueError(f"logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r}")
            used[a] = name
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def tree_shardings(logical_specs, rules: Mapping[str, MeshAxes], mesh: Mesh):
    """A NamedSharding per leaf of a tree of logical PartitionSpecs."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh)),
        logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def single_device_mesh() -> Mesh:
    """A 1x1 (data, tensor) mesh on the first device: the default when no mesh is given."""
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
