"""Admission with no autoscaling: what happens to a request when no replica has room, as pure code.

No more chips exist, so a full fleet must queue briefly and then refuse clearly. `AdmissionQueue` is the gateway's
bounded queue with a time limit: priority bands (higher first: paid before free; a full queue makes room for a higher
band by shedding the newest request of the lowest band), and within a band round-robin between keys, so a key
sending ten times what the others send gets one turn in k while all of them wait. `refusal` says why a request is
refused - replicas absent, draining, or full - which the router answers as 429 / RESOURCE_EXHAUSTED with
Retry-After. Nothing here does I/O or reads a clock (time is an argument): the router and the fleet simulator run
this same code.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fleet.policy import ReplicaView, available

ABSENT = "absent"
"""No replica can serve: none is configured, or every one is ejected (dead, unreachable, unhealthy)."""
DRAINING = "draining"
"""No replica takes new work and at least one is draining (a rolling restart, a shutdown)."""
FULL = "full"
"""Replicas are serving but every one is at its bound, and the gateway queue is full or the wait ran out."""


@dataclasses.dataclass(frozen=True)
class AdmissionConfig:
    """The gateway queue's bounds and the retry hints of refusals."""

    max_queued: int = 256
    """Most requests waiting in the gateway for a replica with room."""
    max_wait: float = 10.0
    """Seconds a request may wait in the gateway queue before it is refused (FULL)."""
    retry_after_full: float = 1.0
    """Retry-After of a FULL refusal, seconds (scaled up by how many wait, see `refusal`)."""
    retry_after_draining: float = 2.0
    """Retry-After of a DRAINING refusal, seconds."""
    retry_after_absent: float = 5.0
    """Retry-After of an ABSENT refusal, seconds."""


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a request is refused and when to retry."""

    reason: str
    """ABSENT, DRAINING or FULL."""
    message: str
    """One line for the client, naming the reason."""
    retry_after: float
    """Seconds."""


def refusal(
    replicas: Sequence[ReplicaView], config: AdmissionConfig | None = None, *, queued: int = 0, waited: float = 0.0
) -> Refusal:
    """The refusal for a request that found no room: ABSENT when no replica is available and none drains, DRAINING
    when none is available and some drain, FULL otherwise. `queued`: requests waiting in the gateway queue (scales
    FULL's retry hint); `waited`: seconds this request waited (0: the queue was full on arrival)."""
    config = config or AdmissionConfig()
    if not any(available(r) for r in replicas):
        draining = [r.name for r in replicas if r.draining and r.num_slots > 0]
        if draining:
            return Refusal(
                DRAINING,
                f"every replica that could serve is draining ({', '.join(sorted(draining))}); retry shortly",
                config.retry_after_draining,
            )
        if not replicas:
            message = "no replica is configured"
        else:
            message = f"no replica is serving ({len(replicas)} configured, all ejected or unreachable)"
        return Refusal(ABSENT, message + "; retry later", config.retry_after_absent)
    serving = [r for r in replicas if available(r)]
    slots = sum(r.num_slots for r in serving)
    if waited > 0:
        why = f"waited {waited:.1f} s in the gateway queue"
    else:
        why = f"the gateway queue is full ({queued} waiting)"
    # roughly when a queued request gets a slot: each slot frees one request about every retry_after_full seconds
    retry = config.retry_after_full * max(1.0, queued / max(slots, 1))
    return Refusal(FULL, f"every replica is at its bound ({len(serving)} serving, {slots} slots); {why}", retry)


@dataclasses.dataclass(eq=False)
class Waiter:
    """One queued request."""

    item: Any
    """The caller's handle for the request."""
    key: str
    priority: int
    enqueued_at: float
    deadline: float
    """When it is refused if still queued (`AdmissionQueue.expire`)."""


class AdmissionQueue:
    """The gateway queue: priority bands, round-robin between keys within a band, a bound and a time limit.

    `push` queues a request (or refuses it: None); `peek` / `pop` give the next to admit (highest band; within it,
    the key whose turn it is, its oldest request); `expire` removes and returns requests past their deadline;
    `remove` takes one out (its client went away). A request shed to make room for a higher band is reported by
    `take_shed`.
    """

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        # band -> key -> that key's waiters, oldest first; the band's key order is the round-robin turn
        self._bands: dict[int, dict[str, deque[Waiter]]] = {}
        self._turns: dict[int, deque[str]] = {}
        self._all: OrderedDict[int, Waiter] = OrderedDict()  # arrival order = deadline order (one max_wait)
        self._shed: list[Waiter] = []

    def __len__(self) -> int:
        return len(self._all)

    def push(self, item: Any, *, key: str, priority: int, now: float) -> Waiter | None:
        """Queues `item`; None when the queue is full of requests of its band or higher (refuse it)."""
        if len(self._all) >= self.config.max_queued:
            lowest = min(self._bands, default=None)
            if lowest is None or lowest >= priority:
                return None
            self._shed.append(self._shed_one(lowest))
        waiter = Waiter(item, key, priority, now, now + self.config.max_wait)
        band = self._bands.setdefault(priority, {})
        if key not in band:
            band[key] = deque()
            self._turns.setdefault(priority, deque()).append(key)
        band[key].append(waiter)
        self._all[id(waiter)] = waiter
        return waiter

    def _shed_one(self, priority: int) -> Waiter:
        # the newest request of the band's busiest key: the one that waited least, from whoever holds the most
        band = self._bands[priority]
        key = max(band, key=lambda k: (len(band[k]), band[k][-1].enqueued_at))
        waiter = band[key][-1]
        self.remove(waiter)
        return waiter

    def take_shed(self) -> list[Waiter]:
        """Requests shed from the queue to make room for a higher band since the last call (refuse them: FULL)."""
        shed, self._shed = self._shed, []
        return shed

    def peek(self) -> Waiter | None:
        """The next request to admit, left in the queue."""
        if not self._bands:
            return None
        priority = max(self._bands)
        return self._bands[priority][self._turns[priority][0]][0]

    def pop(self) -> Waiter | None:
        """Removes and returns the next request to admit; its key's turn passes to the next key of the band."""
        waiter = self.peek()
        if waiter is None:
            return None
        turns = self._turns[waiter.priority]
        turns.rotate(-1)  # the key just served goes to the back of its band's turn
        self.remove(waiter)
        return waiter

    def remove(self, waiter: Waiter) -> bool:
        """Takes `waiter` out of the queue; False when it was no longer queued."""
        if self._all.pop(id(waiter), None) is None:
            return False
        band = self._bands[waiter.priority]
        queue = band[waiter.key]
        queue.remove(waiter)
        if not queue:
            del band[waiter.key]
            self._turns[waiter.priority].remove(waiter.key)
            if not band:
                del self._bands[waiter.priority]
                del self._turns[waiter.priority]
        return True

    def expire(self, now: float) -> list[Waiter]:
        """Removes and returns the requests whose deadline has passed (refuse them: FULL)."""
        expired = []
        while self._all:
            waiter = next(iter(self._all.values()))
            if waiter.deadline > now:
                break
            self.remove(waiter)
            expired.append(waiter)
        return expired

    def next_deadline(self) -> float | None:
        """The earliest deadline among queued requests."""
        return next(iter(self._all.values())).deadline if self._all else None

    def queued_by_priority(self) -> dict[int, int]:
        """Queued requests per priority band."""
        return {p: sum(len(q) for q in band.values()) for p, band in self._bands.items()}


def enqueue(queue: AdmissionQueue, item: Any, *, key: str, priority: int, now: float) -> tuple[Waiter | None, list]:
    """Queues `item` for a replica: (its waiter, or None when it is refused; the waiters shed to make room for it,
    which the caller refuses). The router and the simulator both admit through this and `drain`."""
    waiter = queue.push(item, key=key, priority=priority, now=now)
    return waiter, queue.take_shed()


def drain(
    queue: AdmissionQueue, pick: Callable[[Any], Any | None], gone: Callable[[Any], bool] = lambda item: False
) -> Iterator[tuple[Waiter, Any]]:
    """Hands queued requests to replicas in the queue's order (priority bands, keys in turn): yields (waiter, what
    `pick(item)` chose) for each, popped, while the next one in turn finds room; stops at the first that finds none,
    so nothing overtakes it. Waiters whose item is `gone` (the caller went away) are dropped on the way. Lazy: the
    caller dispatches each before the next pick sees the replicas."""
    while (waiter := queue.peek()) is not None:
        if gone(waiter.item):
            queue.remove(waiter)
            continue
        chosen = pick(waiter.item)
        if chosen is None:
            return
        queue.pop()
        yield waiter, chosen
