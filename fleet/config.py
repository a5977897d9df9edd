"""The replicas config file: which meshserve replicas the gateway routes over, where they run and what they cost.

TOML (`.toml`) or JSON (anything else), one list `replicas` of tables:

    [[replicas]]
    name = "eu-west-1a"              # optional, default the address; unique
    address = "10.0.0.5:50051"       # required, host:port of the replica's gRPC (scripts/serve.py --port)
    region = "eu-west"               # optional: clients in this region prefer it
    pool = "v5e-8"                   # optional: the accelerator pool, informational
    price_per_chip_hour = 1.2        # optional, >= 0: cost reporting
    chips = 8                        # optional, >= 1
    weight = 1.0                     # optional, > 0: relative share of traffic

Errors are one line naming the file and the field (`fleet.toml: replicas[2].weight: must be > 0, got 0`).
`ConfigWatcher` re-reads the file when its modification time changes and keeps the last good list when a new one
is invalid, so a bad edit never empties the fleet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from typing import Any


class ConfigError(ValueError):
    """A replicas file that cannot be used; the message is one line naming the file and the field."""


@dataclasses.dataclass(frozen=True)
class ReplicaSpec:
    """One replica as the config file names it."""

    name: str
    """Unique name (ledger, metrics, logs); default the address."""
    address: str
    """host:port of its gRPC server."""
    region: str = ""
    """Region it runs in."""
    pool: str = ""
    """Accelerator pool (informational)."""
    price_per_chip_hour: float = 0.0
    """What one of its chips costs per hour."""
    chips: int = 1
    """Chips it runs on."""
    weight: float = 1.0
    """Relative share of traffic (> 0)."""

    @property
    def cost_per_hour(self) -> float:
        return self.price_per_chip_hour * self.chips


_FIELDS = {f.name for f in dataclasses.fields(ReplicaSpec)}


def _string(entry: dict[str, Any], field: str, where: str, default: str = "") -> str:
    value = entry.get(field, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{field}: must be a string, got {value!r}")
    return value


def _number(entry: dict[str, Any], field: str, where: str, default: float, *, minimum: float, strict: bool) -> float:
    value = entry.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}.{field}: must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ConfigError(f"{where}.{field}: must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def _spec(entry: Any, where: str) -> ReplicaSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table of fields, got {entry!r}")
    for field in entry:
        if field not in _FIELDS:
            raise ConfigError(f"{where}.{field}: unknown field (known: {', '.join(sorted(_FIELDS))})")
    if "address" not in entry:
        raise ConfigError(f"{where}.address: required (host:port of the replica's gRPC)")
    address = _string(entry, "address", where)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}.address: {address!r} is not host:port")
    name = _string(entry, "name", where, address) or address
    chips = _number(entry, "chips", where, 1, minimum=1, strict=False)
    if chips != int(chips):
        raise ConfigError(f"{where}.chips: must be a whole number, got {entry['chips']!r}")
    return ReplicaSpec(
        name=name,
        address=address,
        region=_string(entry, "region", where),
        pool=_string(entry, "pool", where),
        price_per_chip_hour=_number(entry, "price_per_chip_hour", where, 0.0, minimum=0, strict=False),
        chips=int(chips),
        weight=_number(entry, "weight", where, 1.0, minimum=0, strict=True),
    )


def parse(data: Any) -> list[ReplicaSpec]:
    """The replicas of a parsed config document (ConfigError naming the field otherwise)."""
    if not isinstance(data, dict):
        raise ConfigError("the file must hold a table with a `replicas` list")
    for key in data:
        if key != "replicas":
            raise ConfigError(f"{key}: unknown field (the file holds `replicas`)")
    entries = data.get("replicas")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("replicas: at least one replica is required (a list of tables)")
    specs, names = [], set()
    for i, entry in enumerate(entries):
        spec = _spec(entry, f"replicas[{i}]")
        if spec.name in names:
            raise ConfigError(f"replicas[{i}].name: {spec.name!r} is used twice")
        names.add(spec.name)
        specs.append(spec)
    return specs


def load(path: str) -> list[ReplicaSpec]:
    """Reads and validates the replicas file (TOML for `.toml`, else JSON); ConfigError starts with the path."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode()) if path.endswith(".toml") else json.loads(raw)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    try:
        return parse(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


class ConfigWatcher:
    """The replicas file, re-read when its modification time changes. The first read raises ConfigError; later ones
    keep the last good list and set `error`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime = self._stat()
        self.specs: list[ReplicaSpec] = load(path)
        self.error: str | None = None
        """Why the latest change was not taken (None: the file in use is the file on disk)."""

    def _stat(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def poll(self) -> list[ReplicaSpec] | None:
        """The new list when the file changed and is valid; None when unchanged or invalid (see `error`)."""
        mtime = self._stat()
        if mtime == self._mtime:
            return None
        self._mtime = mtime
        try:
            specs = load(self.path)
        except ConfigError as e:
            self.error = str(e)
            return None
        self.error = None
        if specs == self.specs:
            return None
        self.specs = specs
        return specs
