"""Per-key and per-user limits, enforced in the shared store so that N gateway processes together never pass one.

Each (subject, limit, window) has a counter row. Admission runs one transaction that, for every limit in a fixed
order, does a conditional increment

    UPDATE limit_counters SET used = used + :n WHERE <row> AND used + :n <= :cap

and rolls the whole transaction back when any of them matches no row. Concurrent admissions queue on the row lock
(PostgreSQL re-checks the WHERE against the committed value; SQLite takes its write lock at BEGIN IMMEDIATE), so no
interleaving lets two of them spend the same headroom. The fixed order (subject, limit, window) also fixes the order
rows are locked in, which rules out deadlocks between admissions and settlements.

Windows:
  requests_per_minute, tokens_per_minute  sliding window estimated from two fixed minutes (the previous minute's
      count weighted by how much of it still overlaps the last 60 s), so a burst across a minute boundary cannot
      pass twice the limit, as plain fixed windows would;
  tokens_per_day, tokens_per_month        calendar windows in UTC (a budget that renews at midnight / on the 1st);
  concurrent_streams                      a count plus one lease row per open stream; a lease left behind by a
      crashed gateway expires after `lease_seconds` and is given back at the subject's next admission.
Tokens are reserved at admission as prompt + n x max_tokens and settled to the real count at finish.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from gateway.gate import GateError
from gateway.store import Store, TtlCache
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


class Limiter:
    """Reads limits (cached `cache_seconds`), reserves and settles them in the store."""

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
        self._last_prune = 0.0
        if store.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        self._insert_counters = insert(Counter).on_conflict_do_nothing()

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

    def _checks(self, subjects: Sequence[tuple[str, str]], tokens: int, now: float) -> list[_Check]:
        minute = minute_start(now)
        day, day_end = day_window(now)
        month, month_end = month_window(now)
        checks = []
        for kind, subject_id in subjects:
            lim, subject = self.get(kind, subject_id), f"{kind}:{subject_id}"
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
        nothing; raises GateError(429) naming the first limit that has no room."""
        now = self.clock()
        checks = self._checks(subjects, tokens, now)
        for check in checks:
            if check.amount > check.limit:
                raise self._refusal(check, 0, 0, now)
        self._ensure_rows(checks)
        try:
            self._retrying(lambda s: self._reserve(s, checks, request_id, now))
        except _Refused as refused:
            raise self._refusal(refused.check, refused.used, refused.previous, refused.now) from None
        self._maybe_prune(now)
        return Reservation(
            request_id,
            tokens,
            tokens=[(c.subject, c.name, c.window) for c in checks if c.name.startswith("tokens_")],
            streams=[c.subject for c in checks if c.name == "concurrent_streams"],
        )

    def _reserve(self, s: Session, checks: list[_Check], request_id: str, now: float) -> None:
        for check in checks:
            cap: float = check.limit
            previous = 0
            if check.name == "concurrent_streams":
                self._reap_leases(s, check.subject, now)
            elif check.window_end is None:
                previous = (
                    s.scalar(
                        sa.select(Counter.used).where(
                            Counter.subject == check.subject,
                            Counter.limit_name == check.name,
                            Counter.window_start == check.window - _MINUTE,
                        )
                    )
                    or 0
                )
                cap = check.limit - previous * _sliding_weight(now, check.window)
            row = _row(check.subject, check.name, check.window)
            passed = s.execute(
                sa.update(Counter)
                .where(row, Counter.used + check.amount <= cap)
                .values(used=Counter.used + check.amount)
                .execution_options(synchronize_session=False)
            ).rowcount
            if not passed:
                used = s.scalar(sa.select(Counter.used).where(row)) or 0
                raise _Refused(check, used, previous, now)
        for check in checks:
            if check.name == "concurrent_streams":
                s.add(StreamLease(request_id=request_id, subject=check.subject, expires=now + self.lease_seconds))

    def _reap_leases(self, s: Session, subject: str, now: float) -> None:
        expired = s.execute(
            sa.delete(StreamLease)
            .where(StreamLease.subject == subject, StreamLease.expires < now)
            .execution_options(synchronize_session=False)
        ).rowcount
        if expired:
            log.warning("gave back %d expired stream leases of %s", expired, subject)
            _add(s, subject, "concurrent_streams", 0, -expired)

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """Corrects the token counters from the reservation to `tokens` used and gives back the streams
        (idempotent: a second call does nothing)."""
        if reservation.settled:
            return
        reservation.settled = True
        delta = tokens - reservation.reserved_tokens
        ops = [(subject, name, window) for subject, name, window in reservation.tokens if delta]
        ops += [(subject, "concurrent_streams", 0) for subject in reservation.streams]

        def run(s: Session) -> None:
            for subject, name, window in sorted(ops):
                if name != "concurrent_streams":
                    _add(s, subject, name, window, delta)
                elif s.execute(
                    sa.delete(StreamLease)
                    .where(StreamLease.request_id == reservation.request_id, StreamLease.subject == subject)
                    .execution_options(synchronize_session=False)
                ).rowcount:
                    _add(s, subject, name, 0, -1)

        if ops:
            self._retrying(run)

    # --- plumbing ---

    def _retrying(self, work: Callable[[Session], Any], attempts: int = 4) -> Any:
        for attempt in range(attempts):
            try:
                with self.store.write() as s:
                    return work(s)
            except sa.exc.OperationalError as e:
                if getattr(e.orig, "sqlstate", None) not in _RETRYABLE_SQLSTATES or attempt == attempts - 1:
                    raise
                time.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    def _ensure_rows(self, checks: list[_Check]) -> None:
        """Creates missing counter rows in their own short transaction, so admissions only ever lock rows that
        exist (an INSERT racing another one for the same new row would wait on it outside the fixed order)."""
        missing = [c.order for c in checks if c.order not in self._ensured]
        if not missing:
            return
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
