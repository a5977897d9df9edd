"""Builds the ("data", "tensor") device mesh from a spec string, over every device of every process.

Spec: `"data:2,tensor:4"` (axes left out have size 1) or `"auto"`. The product of the sizes must equal the number of
devices of the whole job (all processes), so a typo fails at start-up instead of leaving devices idle.

Device order: devices are sorted by (process, id) and laid out with "tensor" as the minor axis, so a tensor group
stays inside one process (one host) whenever the tensor size divides the local device count: the all-reduces of
tensor parallelism then run over the fast intra-host links, and only slot-parallel ("data") work spans hosts. On TPU
the physical topology is asked for via `mesh_utils.create_device_mesh` first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

log = logging.getLogger(__name__)

MESH_AXES = ("data", "tensor")


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`"data:2,tensor:4"` -> {"data": 2, "tensor": 4}; ValueError naming the bad part."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen: set[str] = set()
    for part in spec.split(","):
        name, sep, value = part.strip().partition(":")
        if not sep or name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: {part!r} is not one of {', '.join(a + ':N' for a in MESH_AXES)}")
        if name in seen:
            raise ValueError(f"mesh spec {spec!r} names axis {name!r} twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
        if size < 1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be >= 1, got {size}")
        seen.add(name)
        sizes[name] = size
    return sizes


def auto_mesh_shape(num_devices: int, local_devices: int, kv_heads: int | None = None) -> dict[str, int]:
    """Tensor-parallel first: the largest tensor size that divides the local device count (and `kv_heads`, when
    given, so the KV cache splits by whole heads); the remaining devices go to slot parallelism ("data")."""
    tensor = 1
    for t in range(1, local_devices + 1):
        if local_devices % t == 0 and num_devices % t == 0 and (kv_heads is None or kv_heads % t == 0):
            tensor = t
    return {"data": num_devices // tensor, "tensor": tensor}


def make_mesh(spec: str = "auto", devices: Sequence[jax.Device] | None = None, *, kv_heads: int | None = None) -> Mesh:
    """A ("data", "tensor") mesh over `devices` (default: all devices of all processes).

    `spec` is "auto" (see `auto_mesh_shape`; `kv_heads` refines it) or "data:D,tensor:T" with D * T equal to the
    device count; ValueError says how many devices the spec needs and how many there are.
    """
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    n = len(devices)
    n_proc = len({d.process_index for d in devices})
    local = n // n_proc
    sizes = auto_mesh_shape(n, local, kv_heads) if spec.strip() == "auto" else parse_mesh_spec(spec)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if int(np.prod(shape)) != n:
        raise ValueError(
            f"mesh {format_mesh(sizes)} needs {int(np.prod(shape))} devices but the job has {n} "
            f"({n_proc} process(es) x {local} local device(s) of {devices[0].platform}); "
            "make the product of the axis sizes equal the device count, or pass --mesh=auto"
        )
    grid = None
    if devices[0].platform == "tpu":
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError) as exc:
            log.warning("no topology-aware layout for mesh %s (%s); using device order", format_mesh(sizes), exc)
    if grid is None:
        grid = np.array(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def format_mesh(sizes: dict[str, int] | Mesh) -> str:
    """{"data": 2, "tensor": 4} (or a Mesh) -> "data:2,tensor:4", the same form `make_mesh` reads."""
    shape = dict(sizes.shape) if isinstance(sizes, Mesh) else sizes
    return ",".join(f"{name}:{size}" for name, size in shape.items())
