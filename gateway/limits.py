"""Per-key and per-user limits, enforced in the shared store so that N gateway processes together never pass one,
while the request path does no SQL: each process spends *leases*, slices of a limit taken from the store in batches.

The store. Each (subject, limit, window) has a counter row whose `used` is what all processes together have taken
out of that window: units leased to a process count as used whether or not the process has spent them yet. Taking a
lease is one transaction that, for every limit short of room in a fixed order, locks the counter row (`SELECT ... FOR
UPDATE` on PostgreSQL; SQLite takes its write lock at BEGIN IMMEDIATE), reads `used`, and does

    UPDATE limit_counters SET used = used + :grant WHERE <row> AND used + :grant <= :cap

rolling the whole transaction back when any limit has no room for what the request needs. No interleaving lets two
processes take the same headroom, and the fixed order (subject, limit, window) rules out deadlocks between
admissions, returns and settlements.

Why leases. A transaction per admission and another per settlement cost ~5 ms of gateway CPU per request on SQLite
(measured: 6.1 ms per request in all, 135 requests/s; the budget at 1,000 requests/s on two cores is under 1 ms for
everything, HTTP included) and serialize every gateway on one row lock. A process instead takes a grant larger than
the request, spends it locally (a dict lookup under a lock, on the event loop: `admit_nowait`), and goes back to the
store only when its slice runs out: with a grant of g units, a limit costs one transaction per g units spent.

How big a grant is, and the bounds it gives:
  grant = max(need, min(room / 8, limit / 32))     (streams: at most max(need, 32))
where `need` is what the request lacks locally and `room` is the window's headroom in the store at that moment.
  - Never over. Every unit a process spends was first counted in the store under the cap, so the processes together
    admit at most what one exact counter would (the sliding window below allows, as before, at most one request's
    reservation more across a minute boundary).
  - Under by a bounded amount. A request is refused only when this process's slice plus the store's room cannot
    cover it; what sits idle in each of the other P - 1 processes' slices at that moment is less than limit / 32
    (less still near the limit, where room / 8 shrinks with the room), plus what their requests reserved and did
    not use, which settles back into their slices. A slice goes back to the store when its process is refused on
    that limit, after IDLE_RETURN_SECONDS without a spend, when its window ends, and when the gateway stops.
    tests/test_gateway_store.py asserts it for two processes: admitted >= limit - one reservation - limit / 32.
    When the limit is smaller than 32 requests' worth, grants are exactly what a request needs and admission is as
    exact as one counter: two gateways under 64 concurrent streams stay within one reservation of a tokens/minute
    limit (tests/test_gateway_e2e.py), and a refused request saw less than one reservation of room.
  - A crashed gateway leaks its unspent slices: per-minute ones until their window has slid out (two minutes at
    most), day and month ones (at most limit / 32 each) until the budget renews.

Windows:
  requests_per_minute, tokens_per_minute  sliding window estimated from two fixed minutes (the previous minute's
      count weighted by how much of it still overlaps the last 60 s), so a burst across a minute boundary cannot
      pass twice the limit, as plain fixed windows would; a slice is spendable only in its own minute;
  tokens_per_day, tokens_per_month        calendar windows in UTC (a budget that renews at midnight / on the 1st);
  concurrent_streams                      a count plus one StreamLease row per slot a process holds (in use or
      not). A process renews its rows' expiry while it lives; a row left by a crashed gateway expires after
      `lease_seconds` and is given back at another process's next grant for the subject. A stream not finished
      within `lease_seconds` is assumed lost and its slot is reused.
Tokens are reserved at admission as prompt + n x max_tokens and settled to the real count at finish: what a request
did not use goes back into its process's slice (or, when the slice's window has ended, to the store).
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from gateway.gate import GateError
from gateway.store import MISSING, Store, TtlCache
from gateway.store.models import Counter, LimitsRow, PolicyAudit, StreamLease

log = logging.getLogger(__name__)

LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "concurrent_streams", "tokens_per_day", "tokens_per_month")
_LABELS = {
    "requests_per_minute": "requests per minute",
    "tokens_per_minute": "tokens per minute",
    "concurrent_streams": "concurrent streams",
    "tokens_per_day": "tokens per day",
    "tokens_per_month": "tokens per month",
}
_MINUTE = 60
_PER_MINUTE = ("requests_per_minute", "tokens_per_minute")
_CONCURRENCY_RETRY = 1.0  # streams end when they end: suggest trying again soon
_RETRYABLE_SQLSTATES = ("40001", "40P01")  # serialization failure, deadlock detected (PostgreSQL)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Configured limits of one key or user; None is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Check:
    subject: str  # "key:<id>" / "user:<id>"
    name: str
    window: int  # window start, epoch seconds (0: concurrent_streams)
    amount: int
    limit: int
    window_end: float | None  # calendar windows: when the budget renews

    @property
    def order(self) -> tuple[str, str, int]:
        return self.subject, self.name, self.window


@dataclasses.dataclass
class Reservation:
    """What one admission holds: token counters to settle and stream leases to give back."""

    request_id: str
    reserved_tokens: int
    tokens: list[tuple[str, str, int]]  # (subject, limit name, window) of each token counter incremented
    streams: list[str]  # subjects whose concurrent_streams count this request holds
    settled: bool = False


class _Refused(Exception):
    def __init__(self, check: _Check, used: int, previous: int, now: float):
        super().__init__(check.name)
        self.check, self.used, self.previous, self.now = check, used, previous, now


def minute_start(now: float) -> int:
    return int(now // _MINUTE) * _MINUTE


def day_window(now: float) -> tuple[int, int]:
    start = int(now // 86400) * 86400
    return start, start + 86400


def month_window(now: float) -> tuple[int, int]:
    d = datetime.datetime.fromtimestamp(now, datetime.UTC)
    start = calendar.timegm((d.year, d.month, 1, 0, 0, 0))
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return start, calendar.timegm((year, month, 1, 0, 0, 0))


def _sliding_weight(now: float, window: int) -> float:
    """How much of the previous minute still lies inside the last 60 seconds."""
    return max(0.0, 1.0 - (now - window) / _MINUTE)


def retry_after(check: _Check, used: int, previous: int, now: float) -> float | None:
    """Seconds until `check` could pass if nothing else arrived; None if it never can (larger than the limit)."""
    if check.amount > check.limit:
        return None
    if check.name == "concurrent_streams":
        return _CONCURRENCY_RETRY
    if check.window_end is not None:
        wait = check.window_end - now
    elif used + check.amount <= check.limit:
        # this minute has room; the previous minute's weighted share must decay: previous * (1 - f) <= room
        room = check.limit - used - check.amount
        wait = check.window + _MINUTE * (1.0 - room / previous) - now if previous else 0.0
    else:
        # wait for the next minute, where this minute's count becomes the decaying share
        wait = check.window + _MINUTE * (2.0 - (check.limit - check.amount) / used) - now
    return max(0.01, math.ceil(wait * 100) / 100)


@dataclasses.dataclass
class _Lease:
    """What this process holds of one counter row: `free` units taken from the store and not spent yet; for
    concurrent_streams, the StreamLease rows it holds, free (`slots`) or in use (`busy`: request id -> (row id,
    when the stream is assumed lost, clock time))."""

    window_end: float | None  # epoch seconds when the slice can no longer be spent (None: never, for streams)
    free: int = 0
    used_at: float = 0.0  # time.monotonic() of the last spend or grant
    slots: list[str] = dataclasses.field(default_factory=list)
    busy: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def available(self) -> int:
        return len(self.slots) if self.window_end is None else self.free


@dataclasses.dataclass
class _Return:
    """Units going back from this process to one counter row (and the stream rows to delete with them)."""

    key: tuple[str, str, int]
    units: int = 0
    slots: list[str] = dataclasses.field(default_factory=list)


ROOM_FRACTION = 1 / 8
"""A grant takes at most this share of the room left in the window..."""
LIMIT_FRACTION = 1 / 32
"""...and at most this share of the limit (see the module docstring for the bounds these give)."""
MAX_STREAM_GRANT = 32
"""Most stream slots one grant takes (each is a StreamLease row)."""
IDLE_RETURN_SECONDS = 1.0
"""A slice not spent from for this long goes back to the store."""
MAINTAIN_SECONDS = 0.25
"""How often the background thread returns idle and ended slices, applies settlements of ended windows and renews
this process's stream rows."""


class Limiter:
    """Reads limits (cached `cache_seconds`), admits and settles requests against slices leased from the store (see
    the module docstring). Thread-safe; a background thread (started at the first admission) gives back what is idle.
    `close()` gives back everything this process holds."""

    def __init__(
        self,
        store: Store,
        *,
        cache_seconds: float = 0.5,
        lease_seconds: float = 900.0,
        clock: Callable[[], float] = time.time,
    ):
        self.store, self.lease_seconds, self.clock = store, lease_seconds, clock
        self._cache: TtlCache[tuple[str, str], Limits] = TtlCache(cache_seconds)
        self._ensured: set[tuple[str, str, int]] = set()
        self._windows: tuple[int, tuple[int, int], tuple[int, int]] = (-1, (0, 0), (0, 0))
        self._last_prune = 0.0
        if store.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        self._insert_counters = insert(Counter).on_conflict_do_nothing()
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, str, int], _Lease] = {}
        self._pending: dict[tuple[str, str, int], int] = {}  # settlements of ended windows, for the store
        # this process's StreamLease rows are "<token>:<n>": renewed by it, never reaped by it
        self._token = uuid.uuid4().hex[:16]
        self._slot_ids = itertools.count()
        self._renewed = time.monotonic()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.transactions = 0
        """Write transactions this limiter ran (grants, returns, settlements): what the leases save."""

    # --- configuration ---

    def get(self, kind: str, subject_id: str) -> Limits:
        return self._cache.get((kind, subject_id), self._load)

    def _load(self, key: tuple[str, str]) -> Limits:
        with self.store.read() as s:
            row = s.get(LimitsRow, key)
        if row is None:
            return Limits()
        return Limits(**{name: getattr(row, name) for name in LIMIT_NAMES})

    def set(self, kind: str, subject_id: str, who: str, **changes: int | None) -> Limits:
        """Changes the named limits (None: unlimited; values < 0 are refused), writing an audit row."""
        if kind not in ("key", "user"):
            raise ValueError(f"limits belong to a key or a user, not {kind!r}")
        unknown = set(changes) - set(LIMIT_NAMES)
        if unknown:
            raise ValueError(f"unknown limits: {sorted(unknown)}")
        for name, value in changes.items():
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None (unlimited), got {value}")
        with self.store.write() as s:
            row = s.get(LimitsRow, (kind, subject_id))
            before = None if row is None else {n: getattr(row, n) for n in LIMIT_NAMES}
            if row is None:
                row = LimitsRow(subject_kind=kind, subject_id=subject_id, **dict.fromkeys(LIMIT_NAMES))
                s.add(row)
            for name, value in changes.items():
                setattr(row, name, value)
            row.updated = time.time()
            after = {n: getattr(row, n) for n in LIMIT_NAMES}
            s.add(
                PolicyAudit(
                    at=row.updated,
                    who=who,
                    what="limits",
                    subject_kind=kind,
                    subject_id=subject_id,
                    before=before,
                    after=after,
                )
            )
        self._cache.invalidate((kind, subject_id))
        return Limits(**after)

    # --- admission ---

    def _checks(
        self, subjects: Sequence[tuple[str, str]], tokens: int, now: float, *, blocking: bool = True
    ) -> list[_Check] | None:
        """The checks of one request, in lock order; None when not `blocking` and a subject's limits are not
        cached."""
        minute = minute_start(now)
        if self._windows[0] != minute:  # the calendar windows change at most once a minute: not per request
            self._windows = (minute, day_window(now), month_window(now))
        _, (day, day_end), (month, month_end) = self._windows
        checks = []
        for kind, subject_id in subjects:
            lim = self.get(kind, subject_id) if blocking else self._cache.peek((kind, subject_id))
            if lim is MISSING:
                return None
            subject = f"{kind}:{subject_id}"
            if lim.requests_per_minute is not None:
                checks.append(_Check(subject, "requests_per_minute", minute, 1, lim.requests_per_minute, None))
            if lim.tokens_per_minute is not None:
                checks.append(_Check(subject, "tokens_per_minute", minute, tokens, lim.tokens_per_minute, None))
            if lim.concurrent_streams is not None:
                checks.append(_Check(subject, "concurrent_streams", 0, 1, lim.concurrent_streams, None))
            if lim.tokens_per_day is not None:
                checks.append(_Check(subject, "tokens_per_day", day, tokens, lim.tokens_per_day, day_end))
            if lim.tokens_per_month is not None:
                checks.append(_Check(subject, "tokens_per_month", month, tokens, lim.tokens_per_month, month_end))
        return sorted(checks, key=lambda c: c.order)

    def admit(self, subjects: Sequence[tuple[str, str]], request_id: str, tokens: int) -> Reservation:
        """Reserves one request and `tokens` tokens against every limit of `subjects` ((kind, id) pairs), all or
        nothing; raises GateError(429) naming the first limit that has no room. Spends this process's slices; goes
        to the store (one transaction) only for the limits whose slice is short."""
        reservation = self._admit(subjects, request_id, tokens, blocking=True)
        assert reservation is not None
        return reservation

    def admit_nowait(self, subjects: Sequence[tuple[str, str]], request_id: str, tokens: int) -> Reservation | None:
        """`admit` from this process's memory only (for an event loop): None, with nothing reserved, when it would
        read limits from the store, wait for another thread's grant, or need a grant itself."""
        return self._admit(subjects, request_id, tokens, blocking=False)

    def _admit(
        self, subjects: Sequence[tuple[str, str]], request_id: str, tokens: int, *, blocking: bool
    ) -> Reservation | None:
        now = self.clock()
        checks = self._checks(subjects, tokens, now, blocking=blocking)
        if checks is None:
            return None
        for check in checks:
            if check.amount > check.limit:
                raise self._refusal(check, 0, 0, now)
        reservation = Reservation(
            request_id,
            tokens,
            tokens=[c.order for c in checks if c.name.startswith("tokens_")],
            streams=[c.subject for c in checks if c.name == "concurrent_streams"],
        )
        if not checks:
            return reservation
        self._start()
        if not self._lock.acquire(blocking=blocking):
            return None  # a grant is under way in another thread
        try:
            self._expire_streams(now)
            leases = [self._lease(c) for c in checks]
            short = [(c, lease) for c, lease in zip(checks, leases, strict=True) if lease.available < c.amount]
            if short:
                if not blocking:
                    return None
                self._grant(short, now)
            spent_at = time.monotonic()
            for check, lease in zip(checks, leases, strict=True):
                lease.used_at = spent_at
                if lease.window_end is None:
                    lease.busy[request_id] = (lease.slots.pop(), now + self.lease_seconds)
                else:
                    lease.free -= check.amount
        finally:
            self._lock.release()
        return reservation

    def _lease(self, check: _Check) -> _Lease:
        lease = self._leases.get(check.order)
        if lease is None:
            window_end = None
            if check.name != "concurrent_streams":
                window_end = check.window_end if check.window_end is not None else check.window + _MINUTE
            lease = self._leases[check.order] = _Lease(window_end)
        return lease

    def _grant(self, short: list[tuple[_Check, _Lease]], now: float) -> None:
        """Tops up the short slices from the store in one transaction (called with the lock held); on a refusal
        gives the refused limit's slice back (so that other processes may use it) and raises GateError(429)."""
        self._ensure_rows([c for c, _ in short])
        try:
            grants = self._retrying(lambda s: self._take(s, short, now))
        except _Refused as refused:
            lease = self._leases.get(refused.check.order)
            if lease is not None and (lease.free or lease.slots):
                back = _Return(refused.check.order, lease.free, list(lease.slots))
                try:
                    self._retrying(lambda s: self._give_back(s, [back], {}))
                    lease.free, lease.slots = 0, []
                except sa.exc.SQLAlchemyError:
                    log.warning("could not give back the %s slice of a refused request", refused.check.name)
            raise self._refusal(refused.check, refused.used, refused.previous, refused.now) from None
        granted_at = time.monotonic()
        for (_, lease), (units, slots) in zip(short, grants, strict=True):
            lease.free += units
            lease.slots += slots
            lease.used_at = granted_at

    def _take(self, s: Session, short: list[tuple[_Check, _Lease]], now: float) -> list[tuple[int, list[str]]]:
        grants = []
        for check, lease in short:
            need = check.amount - lease.available
            cap: float = check.limit
            previous = 0
            if check.name == "concurrent_streams":
                self._reap_leases(s, check.subject, now)
            elif check.window_end is None:
                previous = s.scalar(
                    sa.select(Counter.used).where(_row(check.subject, check.name, check.window - _MINUTE))
                )
                previous = previous or 0
                cap = check.limit - previous * _sliding_weight(now, check.window)
            row = _row(check.subject, check.name, check.window)
            used = s.scalar(sa.select(Counter.used).where(row).with_for_update()) or 0
            room = cap - used
            if need > room:
                raise _Refused(check, used, previous, now)
            grant = max(need, min(int(room * ROOM_FRACTION), int(check.limit * LIMIT_FRACTION)))
            if check.name == "concurrent_streams":
                grant = min(grant, max(need, MAX_STREAM_GRANT))
            passed = s.execute(
                sa.update(Counter)
                .where(row, Counter.used + grant <= cap)
                .values(used=Counter.used + grant)
                .execution_options(synchronize_session=False)
            ).rowcount
            if not passed:  # the row is locked: only a clock step between the read and here could do this
                raise _Refused(check, used, previous, now)
            slots = []
            if check.name == "concurrent_streams":
                slots = [f"{self._token}:{next(self._slot_ids)}" for _ in range(grant)]
                expires = now + self.lease_seconds
                s.add_all(StreamLease(request_id=slot, subject=check.subject, expires=expires) for slot in slots)
                grant = 0
            grants.append((grant, slots))
        return grants

    def _reap_leases(self, s: Session, subject: str, now: float) -> None:
        """Gives back the stream rows of `subject` whose holder stopped renewing them (it died); never this
        process's own."""
        expired = s.execute(
            sa.delete(StreamLease)
            .where(
                StreamLease.subject == subject,
                StreamLease.expires < now,
                StreamLease.request_id.not_like(f"{self._token}:%"),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if expired:
            log.warning("gave back %d expired stream leases of %s", expired, subject)
            _add(s, subject, "concurrent_streams", 0, -expired)

    def _expire_streams(self, now: float) -> None:
        """Frees the slots of streams not finished within lease_seconds (assumed lost); called with the lock held."""
        for (_, name, _), lease in self._leases.items():
            if name == "concurrent_streams" and lease.busy:
                for request_id, (slot, expires) in list(lease.busy.items()):
                    if expires < now:
                        del lease.busy[request_id]
                        lease.slots.append(slot)

    def settle(self, reservation: Reservation, tokens: int, *, blocking: bool = True) -> bool:
        """Corrects the token counts from the reservation to `tokens` used and frees the streams (idempotent: a
        second call does nothing). Tokens not used go back to this process's slice while its window lasts, else to
        the store (by the background thread). Never does I/O; `blocking=False` returns False, having done nothing,
        when another thread holds the lock (it may be waiting on the store for a grant)."""
        delta = tokens - reservation.reserved_tokens
        now = self.clock()
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            if reservation.settled:
                return True
            reservation.settled = True
            for key in reservation.tokens:
                if not delta:
                    break
                lease = self._leases.get(key)
                if lease is None or lease.window_end is None or now >= lease.window_end:
                    self._pending[key] = self._pending.get(key, 0) + delta
                elif delta < 0:
                    lease.free -= delta
                else:  # used more than reserved: from the slice, the rest counted in the store
                    take = min(delta, lease.free)
                    lease.free -= take
                    if delta > take:
                        self._pending[key] = self._pending.get(key, 0) + delta - take
            for subject in reservation.streams:
                lease = self._leases.get((subject, "concurrent_streams", 0))
                held = None if lease is None else lease.busy.pop(reservation.request_id, None)
                if held is not None:
                    lease.slots.append(held[0])
        finally:
            self._lock.release()
        return True

    # --- giving back ---

    def _give_back(self, s: Session, returns: list[_Return], deltas: dict[tuple[str, str, int], int]) -> None:
        """Returns units and stream rows and applies settlement deltas, in the fixed row order."""
        changes: dict[tuple[str, str, int], int] = dict(deltas)
        slots: dict[tuple[str, str, int], list[str]] = {}
        for back in returns:
            changes[back.key] = changes.get(back.key, 0) - back.units
            if back.slots:
                slots[back.key] = back.slots
        for key in sorted(changes.keys() | slots.keys()):
            subject, name, window = key
            change = changes.get(key, 0)
            if key in slots:
                change -= s.execute(
                    sa.delete(StreamLease)
                    .where(StreamLease.request_id.in_(slots[key]), StreamLease.subject == subject)
                    .execution_options(synchronize_session=False)
                ).rowcount
            if change:
                _add(s, subject, name, window, change)

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(target=self._maintain_loop, name="limiter-leases", daemon=True)
                    self._thread.start()

    def _maintain_loop(self) -> None:
        while not self._stop.wait(MAINTAIN_SECONDS):
            try:
                self.maintain()
            except Exception:
                log.warning("could not give back idle limit leases", exc_info=True)

    def maintain(self, *, everything: bool = False) -> None:
        """Gives back slices idle for IDLE_RETURN_SECONDS and those of ended windows, applies pending settlements,
        renews this process's stream rows when a third of `lease_seconds` has passed, and prunes old counters once
        a minute. `everything`: gives back all this process holds (its stream rows in use included)."""
        now, mono = self.clock(), time.monotonic()
        returns: list[_Return] = []
        with self._lock:
            self._expire_streams(now)
            for key, lease in list(self._leases.items()):
                ended = lease.window_end is not None and now >= lease.window_end
                idle = mono - lease.used_at >= IDLE_RETURN_SECONDS
                if everything:
                    busy = [slot for slot, _ in lease.busy.values()]
                    lease.busy.clear()
                    returns.append(_Return(key, lease.free, lease.slots + busy))
                    lease.free, lease.slots = 0, []
                elif (ended or idle) and (lease.free or lease.slots):
                    returns.append(_Return(key, lease.free, lease.slots))
                    lease.free, lease.slots = 0, []
                if everything or ended or (idle and not lease.busy):
                    del self._leases[key]
            deltas, self._pending = self._pending, {}
            renew = not everything and mono - self._renewed >= self.lease_seconds / 3
            if renew:
                self._renewed = mono
        if returns or deltas:
            try:
                self._retrying(lambda s: self._give_back(s, returns, deltas))
            except Exception:
                with self._lock:  # try again at the next round
                    for back in returns:
                        lease = self._leases.setdefault(back.key, _Lease(None if back.slots else now))
                        lease.free += back.units
                        lease.slots += back.slots
                    for key, delta in deltas.items():
                        self._pending[key] = self._pending.get(key, 0) + delta
                raise
        if renew:
            with self.store.write() as s:
                s.execute(
                    sa.update(StreamLease)
                    .where(StreamLease.request_id.like(f"{self._token}:%"))
                    .values(expires=now + self.lease_seconds)
                    .execution_options(synchronize_session=False)
                )
        self._maybe_prune(now)

    def close(self) -> None:
        """Stops the background thread and gives back everything this process holds (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.maintain(everything=True)
        except Exception:
            log.warning("could not give back this process's limit leases", exc_info=True)

    # --- plumbing ---

    def _retrying(self, work: Callable[[Session], Any], attempts: int = 4) -> Any:
        for attempt in range(attempts):
            try:
                self.transactions += 1
                with self.store.write() as s:
                    return work(s)
            except sa.exc.OperationalError as e:
                if getattr(e.orig, "sqlstate", None) not in _RETRYABLE_SQLSTATES or attempt == attempts - 1:
                    raise
                time.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    def _ensure_rows(self, checks: list[_Check]) -> None:
        """Creates missing counter rows in their own short transaction, so grants only ever lock rows that exist
        (an INSERT racing another one for the same new row would wait on it outside the fixed order)."""
        missing = [c.order for c in checks if c.order not in self._ensured]
        if not missing:
            return
        self.transactions += 1
        with self.store.write() as s:
            s.execute(
                self._insert_counters,
                [{"subject": sub, "limit_name": name, "window_start": win, "used": 0} for sub, name, win in missing],
            )
        if len(self._ensured) > 100_000:
            self._ensured.clear()
        self._ensured.update(missing)

    def _maybe_prune(self, now: float) -> None:
        """Deletes counters of windows that have ended (once a minute per process)."""
        if now - self._last_prune < _MINUTE:
            return
        self._last_prune = now
        stale = sa.or_(
            sa.and_(Counter.limit_name.in_(_PER_MINUTE), Counter.window_start < now - 3 * _MINUTE),
            sa.and_(Counter.limit_name == "tokens_per_day", Counter.window_start < now - 2 * 86400),
            sa.and_(Counter.limit_name == "tokens_per_month", Counter.window_start < now - 63 * 86400),
        )
        try:
            with self.store.write() as s:
                s.execute(sa.delete(Counter).where(stale).execution_options(synchronize_session=False))
        except sa.exc.SQLAlchemyError:
            log.warning("could not prune old limit counters", exc_info=True)
        with self._lock:
            self._ensured = {k for k in self._ensured if k[2] == 0 or k[2] >= now - 63 * 86400}

    def _refusal(self, check: _Check, used: int, previous: int, now: float) -> GateError:
        kind = check.subject.split(":", 1)[0]
        label = _LABELS[check.name]
        wait = retry_after(check, used, previous, now)
        if check.limit == 0:
            message = f"this {kind} may not make requests: its {label} limit is 0"
        elif wait is None:
            message = (
                f"request too large for the {label} limit of this {kind}: it needs {check.amount}, the limit is "
                f"{check.limit}; lower max_tokens or the prompt"
            )
        else:
            message = f"rate limit reached for {label} on this {kind} (limit {check.limit}); try again in {wait:.2f}s"
        return GateError(429, message, kind="rate_limit_exceeded", code=check.name, retry_after=wait)


def _row(subject: str, name: str, window: int) -> sa.ColumnElement[bool]:
    return sa.and_(Counter.subject == subject, Counter.limit_name == name, Counter.window_start == window)


def _add(s: Session, subject: str, name: str, window: int, delta: int) -> None:
    """used += delta, floored at 0 (a settlement never leaves a negative count)."""
    s.execute(
        sa.update(Counter)
        .where(_row(subject, name, window))
        .values(used=sa.case((Counter.used + delta < 0, 0), else_=Counter.used + delta))
        .execution_options(synchronize_session=False)
    )
