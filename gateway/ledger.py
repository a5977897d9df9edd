"""The usage and cost ledger: one row per request, written off the streaming path, plus the queries behind
`scripts/admin.py usage` and `feedback export`.

`Ledger.record` only appends to a bounded in-memory queue; a background thread writes the queue in batches (every
`flush_interval` seconds, or as soon as `batch_rows` rows wait). `close()` writes everything still queued. A process
that never calls close() is covered too: an atexit hook closes every open ledger, and when SIGTERM still has its
default action, the first Ledger installs a handler that turns SIGTERM into SystemExit so that the atexit hook runs
(a process that handles SIGTERM itself must call close() in its shutdown path). Rows the database refuses through
the whole of close() are written to a JSONL file under the cache directory instead of being dropped silently.

Costs: device cost = device_seconds x chips x price per chip-hour / 3600 for the replica that served the request,
or, for a request that several replicas served (a fleet's failover path "a>b", or choices routed apart), that sum over
its replicas, each share at its own replica's price (`Entry.device_seconds_by_replica`, kept in the row with each
share's cost). Token cost = (uncached prompt x prompt price + cached x cached price + completion x completion
price) / 1e6.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import datetime
import json
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from engine import paths
from gateway.store import Store
from gateway.store.models import Feedback, LedgerRow

log = logging.getLogger(__name__)

DEFAULT = "*"
"""The entry of Prices.replicas / Prices.models used for names not listed."""


@dataclasses.dataclass(frozen=True)
class ReplicaPrice:
    per_chip_hour: float = 0.0
    """Price of one chip for one hour."""
    chips: int = 1
    """Chips the replica runs on: one device-second of a request occupies all of them."""


@dataclasses.dataclass(frozen=True)
class TokenPrice:
    prompt_per_million: float = 0.0
    completion_per_million: float = 0.0
    cached_per_million: float | None = None
    """Price of prompt tokens read from the prefix cache; None: the prompt price."""


@dataclasses.dataclass(frozen=True)
class Prices:
    """Prices by replica name and by model name ("*": everything not listed)."""

    replicas: dict[str, ReplicaPrice] = dataclasses.field(default_factory=dict)
    models: dict[str, TokenPrice] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prices:
        """From {"replicas": {name: {"per_chip_hour": 3.0, "chips": 8}}, "models": {name: {"prompt_per_million":
        0.1, "completion_per_million": 0.4, "cached_per_million": 0.05}}}."""
        unknown = set(data) - {"replicas", "models"}
        if unknown:
            raise ValueError(f"unknown price sections {sorted(unknown)}")
        return cls(
            {name: ReplicaPrice(**p) for name, p in data.get("replicas", {}).items()},
            {name: TokenPrice(**p) for name, p in data.get("models", {}).items()},
        )

    @classmethod
    def from_json(cls, path: str) -> Prices:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def device_cost(self, replica: str, device_seconds: float, by_replica: Mapping[str, float] | None = None) -> float:
        """`by_replica`: each replica's device-seconds, for a request several replicas served (a router's
        `device_seconds_by_replica`): the sum of `device_costs`. Without it, `replica` may still name a failover path
        ("a>b", see fleet.router): priced at its last replica, which served the rest of the request."""
        if by_replica:
            return sum(self.device_costs(by_replica).values())
        return self._replica_cost(replica.rsplit(">", 1)[-1], device_seconds)

    def device_costs(self, by_replica: Mapping[str, float]) -> dict[str, float]:
        """Each replica's device-seconds priced at that replica's chips and price per chip-hour."""
        return {name: self._replica_cost(name, seconds) for name, seconds in by_replica.items()}

    def _replica_cost(self, replica: str, device_seconds: float) -> float:
        price = self.replicas.get(replica) or self.replicas.get(DEFAULT) or ReplicaPrice()
        return device_seconds * price.chips * price.per_chip_hour / 3600.0

    def token_cost(self, model: str, prompt: int, cached: int, completion: int) -> float:
        price = self.models.get(model) or self.models.get(DEFAULT) or TokenPrice()
        cached_price = price.prompt_per_million if price.cached_per_million is None else price.cached_per_million
        uncached = max(prompt - cached, 0)
        return (
            uncached * price.prompt_per_million + cached * cached_price + completion * price.completion_per_million
        ) / 1e6


@dataclasses.dataclass
class Entry:
    """One ledger row (the LedgerRow table's columns); `day` and the costs are filled in by Ledger.record."""

    request_id: str
    created: float
    key_id: str
    user_id: str
    model: str
    replica: str
    client_address: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float = 0.0
    ttft_seconds: float = 0.0
    total_seconds: float = 0.0
    finish_reason: str = ""
    error: str | None = None
    device_seconds: float = 0.0
    cost_device: float | None = None
    cost_tokens: float | None = None
    quarantined: bool = False
    device_seconds_by_replica: dict[str, float] | None = None
    """Each replica's share of `device_seconds` when several replicas served the request; None: all of it on
    `replica` (the common case, kept as NULL rather than repeating the row's own columns)."""
    cost_device_by_replica: dict[str, float] | None = None
    """Each share's cost at its replica's price (filled in with `cost_device`, their sum), so a row keeps what it
    was charged when prices change."""
    prompt_text: str | None = dataclasses.field(default=None, repr=False)
    completion_text: str | None = dataclasses.field(default=None, repr=False)
    day: str = ""


_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(Entry))


def utc_day(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d")


class Ledger:
    """Batched, non-blocking ledger writer (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        prices: Prices | None = None,
        *,
        batch_rows: int = 64,
        flush_interval: float = 0.1,
        max_queue: int = 100_000,
        on_write: Callable[[list[Entry]], None] | None = None,
        handle_sigterm: bool = True,
    ):
        self.store, self.prices = store, prices or Prices()
        self.batch_rows, self.flush_interval, self.max_queue = batch_rows, flush_interval, max_queue
        self.on_write = on_write
        self.written = self.batches = self.dropped = self.spilled = 0
        self._queue: collections.deque[Entry] = collections.deque()
        self._cond = threading.Condition()
        self._recorded = 0  # entries accepted by record()
        self._done = 0  # entries written, spilled or dropped
        self._flush_wanted = self._closing = False
        self._closed = False
        if store.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        # a batch retried after a commit whose answer was lost must not fail on its own rows
        self._insert = insert(LedgerRow).on_conflict_do_nothing(index_elements=["request_id"])
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        _LIVE.add(self)
        _install_exit_hooks(handle_sigterm)

    def record(self, entry: Entry) -> None:
        """Queues one row (costs and day filled in here); never blocks on the database. A full queue (the database
        has been unreachable for a long while) drops the row with an error in the log."""
        if entry.cost_device is None:
            if entry.device_seconds_by_replica:
                entry.cost_device_by_replica = self.prices.device_costs(entry.device_seconds_by_replica)
                entry.cost_device = sum(entry.cost_device_by_replica.values())
            else:
                entry.cost_device = self.prices.device_cost(entry.replica, entry.device_seconds)
        if entry.cost_tokens is None:
            entry.cost_tokens = self.prices.token_cost(
                entry.model, entry.prompt_tokens, entry.cached_tokens, entry.completion_tokens
            )
        entry.day = entry.day or utc_day(entry.created)
        with self._cond:
            if self._closed:
                raise RuntimeError("the ledger is closed")
            self._recorded += 1
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                self._done += 1
                log.error(
                    "ledger queue full (%d rows): dropped the row of request %s", self.max_queue, entry.request_id
                )
                return
            self._queue.append(entry)
            if len(self._queue) in (1, self.batch_rows):
                self._cond.notify_all()

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Waits until every row recorded before the call is written; False on timeout."""
        with self._cond:
            target = self._recorded
            self._flush_wanted = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Writes everything queued (retrying the database until `timeout`, then spilling to a file) and stops."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join()
        _LIVE.discard(self)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._queue and not (self._closing or self._flush_wanted):
                    self._cond.wait()  # idle: the first row of the next batch wakes us
                deadline = time.monotonic() + self.flush_interval
                while len(self._queue) < self.batch_rows and not (self._closing or self._flush_wanted):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 1024))]
                closing = self._closing
                if not self._queue:
                    self._flush_wanted = False
            if batch:
                if self._write(batch):
                    failures = 0
                elif closing and time.monotonic() >= self._close_deadline:
                    self._spill(batch)
                else:
                    failures += 1
                    with self._cond:
                        self._queue.extendleft(reversed(batch))
                    time.sleep(min(0.1 * 2**failures, 5.0 if not closing else 0.5))
                    continue
            if closing:
                with self._cond:
                    if not self._queue:
                        return

    def _write(self, batch: list[Entry]) -> bool:
        try:
            with self.store.write() as s:
                # a shallow copy per row: dataclasses.asdict deep-copies every field, a third of the writer's time
                s.execute(self._insert, [{name: getattr(e, name) for name in _ENTRY_FIELDS} for e in batch])
        except sa.exc.SQLAlchemyError:
            log.warning("ledger: could not write %d rows (will retry)", len(batch), exc_info=True)
            return False
        with self._cond:
            self.written += len(batch)
            self.batches += 1
            self._done += len(batch)
            self._cond.notify_all()
        if self.on_write is not None:
            try:
                self.on_write(batch)
            except Exception:
                log.exception("ledger on_write hook failed")
        return True

    def _spill(self, batch: list[Entry]) -> None:
        path = os.path.join(paths.cache_root(), f"ledger-unwritten-{os.getpid()}-{int(time.time())}.jsonl")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                for entry in batch:
                    f.write(json.dumps(dataclasses.asdict(entry)) + "\n")
            log.error("ledger: database unreachable at close; wrote %d rows to %s", len(batch), path)
            self.spilled += len(batch)
        except OSError:
            log.exception("ledger: lost %d rows (database unreachable, %s not writable)", len(batch), path)
            self.dropped += len(batch)
        with self._cond:
            self._done += len(batch)
            self._cond.notify_all()


_LIVE: weakref.WeakSet[Ledger] = weakref.WeakSet()
_ATEXIT_INSTALLED = _SIGTERM_INSTALLED = False


def _close_all() -> None:
    for ledger in list(_LIVE):
        ledger.close()


def _on_sigterm(signum: int, _frame: Any) -> None:
    # Unwind the main thread (releasing whatever locks it holds) and exit through atexit, which closes the
    # ledgers; flushing here could deadlock on a lock the interrupted code holds.
    raise SystemExit(128 + signum)


def _install_exit_hooks(handle_sigterm: bool) -> None:
    global _ATEXIT_INSTALLED, _SIGTERM_INSTALLED
    if not _ATEXIT_INSTALLED:
        _ATEXIT_INSTALLED = True
        atexit.register(_close_all)
    if (
        handle_sigterm
        and not _SIGTERM_INSTALLED
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        _SIGTERM_INSTALLED = True
        signal.signal(signal.SIGTERM, _on_sigterm)


# --- queries ---

USAGE_GROUPS = {"key": LedgerRow.key_id, "user": LedgerRow.user_id, "day": LedgerRow.day, "model": LedgerRow.model}
USAGE_COLUMNS = (
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "device_seconds",
    "cost_device",
    "cost_tokens",
    "quarantined",
)


def usage(
    store: Store, by: Sequence[str] = ("user", "day"), since: str | None = None, until: str | None = None
) -> list[dict[str, Any]]:
    """Ledger sums grouped by any of key / user / day / model, ordered by the groups; `since` / `until` are UTC
    days (YYYY-MM-DD, inclusive)."""
    unknown = set(by) - set(USAGE_GROUPS)
    if unknown or not by:
        raise ValueError(f"group by one or more of {sorted(USAGE_GROUPS)}, got {list(by)}")
    groups = [USAGE_GROUPS[g].label(g) for g in by]
    query = sa.select(
        *groups,
        sa.func.count().label("requests"),
        sa.func.sum(LedgerRow.prompt_tokens).label("prompt_tokens"),
        sa.func.sum(LedgerRow.cached_tokens).label("cached_tokens"),
        sa.func.sum(LedgerRow.completion_tokens).label("completion_tokens"),
        sa.func.sum(LedgerRow.device_seconds).label("device_seconds"),
        sa.func.sum(LedgerRow.cost_device).label("cost_device"),
        sa.func.sum(LedgerRow.cost_tokens).label("cost_tokens"),
        sa.func.sum(sa.case((LedgerRow.quarantined, 1), else_=0)).label("quarantined"),
    )
    if since:
        query = query.where(LedgerRow.day >= since)
    if until:
        query = query.where(LedgerRow.day <= until)
    query = query.group_by(*[USAGE_GROUPS[g] for g in by]).order_by(*[USAGE_GROUPS[g] for g in by])
    with store.read() as s:
        rows = [dict(r._mapping) for r in s.execute(query)]
    for row in rows:
        for name in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "quarantined"):
            row[name] = int(row[name] or 0)
        for name in ("device_seconds", "cost_device", "cost_tokens"):
            row[name] = float(row[name] or 0.0)
    return rows


_EXPORTED_LEDGER_FIELDS = (
    "key_id",
    "user_id",
    "model",
    "replica",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "ttft_seconds",
    "total_seconds",
    "finish_reason",
    "cost_device",
    "cost_tokens",
    "quarantined",
    "prompt_text",
    "completion_text",
)


def feedback_rows(store: Store, since: float | None = None) -> Iterator[dict[str, Any]]:
    """Every feedback row joined to its request's ledger row (ledger fields None where the row is missing)."""
    query = (
        sa.select(Feedback, LedgerRow)
        .join(LedgerRow, LedgerRow.request_id == Feedback.request_id, isouter=True)
        .order_by(Feedback.id)
    )
    if since is not None:
        query = query.where(Feedback.created >= since)
    with store.read() as s:
        for fb, row in s.execute(query):
            out: dict[str, Any] = {
                "request_id": fb.request_id,
                "rating": fb.rating,
                "comment": fb.comment,
                "tags": list(fb.tags or []),
                "created": fb.created,
                "feedback_key_id": fb.key_id,
            }
            for name in _EXPORTED_LEDGER_FIELDS:
                out[name] = None if row is None else getattr(row, name)
            if row is not None:
                out["request_created"] = row.created
            yield out
