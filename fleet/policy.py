"""Where a request goes: the routing policies and the replica ejection rule, as pure code.

Nothing here does I/O, awaits, or reads a clock: time is an argument. The gateway's router (`fleet.router`) and the
fleet simulator (`fleet.sim`) run these same objects, so a policy measured in simulation is the policy that routes.

The model of a replica is a `ReplicaView`: what its last `GetLoad` said, plus what the router itself knows better and
sooner - the requests it sent there that have not finished (`in_flight`), and those sent or ended since the last
load report (`sent_since_load`, `finished_since_load`). `Policy.pick` counts the pick in before it returns, so two
picks in the same instant see each other and do not collide on the replica that looked least loaded.

Policies (`POLICIES`, default `DEFAULT_POLICY`):
- `round_robin`: smooth weighted round-robin over the replicas with room.
- `least_load`: the replica with the lowest load (`load_of`: the larger of its request fraction - running, waiting,
  just sent - and its KV page fraction, over its weight).
- `cache_aware`: the replica holding most of the prompt's leading blocks (judged from a bounded per-replica LRU of
  the block hashes routed to it, and of the conversations it served), but only among replicas whose load is within
  `RoutingConfig.load_slack` of the least loaded one, and only where the blocks held are a large enough part of the
  prompt (`RoutingConfig.min_cached_share`, `min_cached_blocks`); without such a hit, least-load. One hot system
  prompt therefore fills its replica only up to the slack, then spreads (and the next replica becomes a holder of
  that prompt too); a short one shared by every user, a small part of each prompt, does not count at all.
Every policy prefers the client's region (`RouteRequest.region`) while a replica there has room and spills to any
region with room before giving up (`pick` returns None: the caller queues or refuses, see `fleet.admission`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence

DEFAULT_BLOCK_TOKENS = 64
"""Tokens per prompt block for cache affinity; the engine's KV page size by default (`--page_size`)."""


@dataclasses.dataclass
class ReplicaView:
    """One replica as a policy sees it. The router (or the simulator) updates it in place; `Policy.pick` and
    `Policy.release` keep `in_flight` and `sent_since_load`."""

    name: str
    """Unique name (ledger, metrics, logs)."""
    region: str = ""
    """Region it runs in; clients in the same region prefer it."""
    pool: str = ""
    """Accelerator pool (e.g. "v5e-8", "h100"); informational."""
    weight: float = 1.0
    """Relative share of traffic: load is divided by it, round-robin visits it this often."""
    healthy: bool = True
    """Admitted by health and passive checks (see `Ejector`)."""
    draining: bool = False
    """Reported by the replica (`Load.draining`): it takes no new requests."""
    num_slots: int = 1
    """Requests it decodes together."""
    active_slots: int = 0
    """Slots decoding a request at the last load report."""
    waiting: int = 0
    """Requests in its own waiting queue at the last load report."""
    full: bool = False
    """Its own waiting queue is full: its last load report said so, or it has refused a request as full
    (RESOURCE_EXHAUSTED) since. No room until a load report says otherwise, whatever this router's counts say."""
    kv_pages_used: int = 0
    """KV pages running requests held at the last load report."""
    kv_pages_total: int = 0
    """KV pages in its pool (0: unknown)."""
    kv_pages_cached: int = 0
    """KV pages only its prefix cache holds (reusable by a matching prompt)."""
    in_flight: int = 0
    """Requests this router sent there that have not finished."""
    price_per_chip_hour: float = 0.0
    """What one of its chips costs per hour."""
    chips: int = 1
    """Chips it runs on (cost per hour = chips x price_per_chip_hour)."""
    sent_since_load: int = 0
    """Requests sent there since its last load report (that report did not count them yet)."""
    finished_since_load: int = 0
    """Requests of this router's that ended there since its last load report (that report still counted them)."""


@dataclasses.dataclass(frozen=True)
class RouteRequest:
    """What a policy knows of a request."""

    key: str = ""
    """The API key (or user) it came from: fairness between keys (`fleet.admission`)."""
    region: str = ""
    """The client's region ("" : no preference)."""
    priority: int = 0
    """The gate's priority class, higher first (paid 2, standard 1, free 0, quarantine -1)."""
    prompt_tokens: int = 0
    """Tokens in its prompt."""
    block_hashes: tuple[int, ...] = ()
    """`block_hashes(prompt ids)`: a hash chain over the prompt's full blocks."""


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """How the policies judge load and affinity."""

    block_size: int = DEFAULT_BLOCK_TOKENS
    """Tokens per block of `block_hashes`; match the engine's KV page size so a block is a page."""
    load_slack: float = 0.25
    """cache_aware: a replica with cached blocks is preferred while its load is at most this above the least
    loaded replica's (load is a fraction of capacity: 0.25 is a quarter of the slots)."""
    queue_per_slot: float = 0.5
    """A replica takes up to num_slots x (1 + this) requests (a short queue keeps it busy between dispatches);
    beyond that it is full and requests wait in the gateway's queue, where priority and fairness apply."""
    prefer_region: bool = True
    """Prefer the client's region while a replica there has room."""
    cache_blocks: int = 16384
    """Bound of each replica's LRU of block hashes (also bounded by its KV pages when they are known)."""
    min_cached_share: float = 0.5
    """cache_aware: the leading blocks a replica holds count as affinity only when they are at least this fraction of
    the prompt's full blocks; fewer count as none (least-load decides). A short system prompt every user shares saves
    little prefill on a long prompt and would otherwise draw requests away from less loaded replicas."""
    min_cached_blocks: int = 1
    """cache_aware: and only when they are at least this many blocks."""


def block_hashes(token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_TOKENS) -> tuple[int, ...]:
    """A hash chain over the full `block_size`-token blocks of `token_ids`: hash i covers tokens [0, (i+1) x
    block_size), so two prompts share hash i exactly when they share those tokens (as the engine's prefix cache
    shares pages). Stable across processes (blake2b, not Python's salted hash)."""
    out = []
    previous = b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        digest = hashlib.blake2b(
            previous + array("q", token_ids[start : start + block_size]).tobytes(), digest_size=8
        ).digest()
        out.append(int.from_bytes(digest, "little"))
        previous = digest
    return tuple(out)


def requests_on(view: ReplicaView) -> int:
    """Requests the replica holds as far as the router can tell: its last report, plus what was sent since, less what
    ended since; never fewer than this router's own unfinished requests there."""
    reported = view.active_slots + view.waiting + view.sent_since_load - view.finished_since_load
    return max(reported, view.in_flight)


def load_of(view: ReplicaView) -> float:
    """The replica's load as a fraction of its capacity, over its weight: the larger of requests / slots and KV pages
    used / pages (whichever runs out first is what limits it)."""
    requests = requests_on(view) / max(view.num_slots, 1)
    kv = view.kv_pages_used / view.kv_pages_total if view.kv_pages_total > 0 else 0.0
    return max(requests, kv) / max(view.weight, 1e-9)


def bound_of(view: ReplicaView, config: RoutingConfig) -> int:
    """Most requests the router lets the replica hold (its slots and a short queue)."""
    return max(1, math.ceil(view.num_slots * (1 + config.queue_per_slot)))


def available(view: ReplicaView) -> bool:
    """Healthy, not draining, and serving some slots."""
    return view.healthy and not view.draining and view.num_slots > 0


def has_room(view: ReplicaView, config: RoutingConfig) -> bool:
    """Available, below its bound, and its own queue not full."""
    return available(view) and not view.full and requests_on(view) < bound_of(view, config)


class Policy:
    """A routing policy. `pick` chooses among replicas with room (client's region first), counts the pick into the
    chosen view and returns it, or returns None when no replica has room; `release` undoes the count when the request
    ends. Subclasses implement `_choose` (and may learn from `_routed` / `observe`)."""

    name = "policy"

    def __init__(self, config: RoutingConfig | None = None) -> None:
        self.config = config or RoutingConfig()

    def pick(self, request: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> ReplicaView | None:
        """The replica for `request`, with `in_flight` and `sent_since_load` already counted; None: none has room."""
        open_ = [r for r in replicas if has_room(r, self.config)]
        if not open_:
            return None
        if self.config.prefer_region and request.region:
            local = [r for r in open_ if r.region == request.region]
            open_ = local or open_
        chosen = self._choose(request, open_, now)
        chosen.in_flight += 1
        chosen.sent_since_load += 1
        self._routed(request, chosen, now)
        return chosen

    def release(self, replica: ReplicaView) -> None:
        """A request picked for `replica` has ended (finished, failed or moved elsewhere)."""
        replica.in_flight = max(0, replica.in_flight - 1)
        replica.finished_since_load += 1

    def observe(self, replica: ReplicaView, block_hashes: Sequence[int], now: float) -> None:
        """`replica` now holds these blocks in its prefix cache (e.g. a finished conversation turn: prompt and
        completion). Only cache-aware policies use it."""

    def forget(self, replica_name: str) -> None:
        """`replica_name` lost its cache (restarted, removed): forget what it held."""

    def cached_blocks(self, request: RouteRequest, replica: ReplicaView) -> int:
        """Leading blocks of the request the policy believes `replica` holds (0 for cache-blind policies)."""
        return 0

    def _choose(self, request: RouteRequest, candidates: list[ReplicaView], now: float) -> ReplicaView:
        raise NotImplementedError

    def _routed(self, request: RouteRequest, replica: ReplicaView, now: float) -> None:
        pass


class RoundRobin(Policy):
    """Smooth weighted round-robin (as nginx): each replica is visited in proportion to its weight, interleaved."""

    name = "round_robin"

    def __init__(self, config: RoutingConfig | None = None) -> None:
        super().__init__(config)
        self._current: dict[str, float] = {}

    def _choose(self, request: RouteRequest, candidates: list[ReplicaView], now: float) -> ReplicaView:
        total = 0.0
        for r in candidates:
            self._current[r.name] = self._current.get(r.name, 0.0) + r.weight
            total += r.weight
        chosen = max(candidates, key=lambda r: (self._current[r.name], -candidates.index(r)))
        self._current[chosen.name] -= total
        return chosen


def _least_loaded(candidates: list[ReplicaView]) -> ReplicaView:
    return min(candidates, key=lambda r: (load_of(r), r.in_flight, r.name))


class LeastLoad(Policy):
    """The replica with the lowest `load_of` (ties: fewer of this router's requests, then name)."""

    name = "least_load"

    def _choose(self, request: RouteRequest, candidates: list[ReplicaView], now: float) -> ReplicaView:
        return _least_loaded(candidates)


class _BlockLru:
    """The block hashes one replica is believed to hold, least recently used first, bounded."""

    def __init__(self) -> None:
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def leading(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def add(self, hashes: Sequence[int], bound: int) -> None:
        for h in hashes:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > bound:
            self.blocks.popitem(last=False)


class CacheAware(Policy):
    """Most cached leading blocks (a large enough share of the prompt's, see `affinity`) among the replicas within
    `load_slack` of the least load; else least-load."""

    name = "cache_aware"

    def __init__(self, config: RoutingConfig | None = None) -> None:
        super().__init__(config)
        self._lru: dict[str, _BlockLru] = {}

    def cached_blocks(self, request: RouteRequest, replica: ReplicaView) -> int:
        lru = self._lru.get(replica.name)
        return 0 if lru is None else lru.leading(request.block_hashes)

    def affinity(self, request: RouteRequest, replica: ReplicaView) -> int:
        """`cached_blocks`, or 0 when they are fewer than `min_cached_blocks` or than `min_cached_share` of the
        request's blocks: the blocks that make `replica` worth preferring over a less loaded one."""
        hits = self.cached_blocks(request, replica)
        needed = max(self.config.min_cached_blocks, self.config.min_cached_share * len(request.block_hashes))
        return hits if hits >= needed else 0

    def _choose(self, request: RouteRequest, candidates: list[ReplicaView], now: float) -> ReplicaView:
        least = _least_loaded(candidates)
        if not request.block_hashes:
            return least
        ceiling = load_of(least) + self.config.load_slack
        best, best_hits = least, self.affinity(request, least)
        for r in candidates:
            if load_of(r) > ceiling:
                continue  # bounded by load: a hot prefix may not pile onto one replica
            hits = self.affinity(request, r)
            if hits > best_hits or (hits == best_hits and hits > 0 and load_of(r) < load_of(best)):
                best, best_hits = r, hits
        return best

    def _bound(self, replica: ReplicaView) -> int:
        bound = self.config.cache_blocks
        if replica.kv_pages_total > 0:
            bound = min(bound, replica.kv_pages_total)
        return max(bound, 1)

    def _routed(self, request: RouteRequest, replica: ReplicaView, now: float) -> None:
        self.observe(replica, request.block_hashes, now)

    def observe(self, replica: ReplicaView, block_hashes: Sequence[int], now: float) -> None:
        if block_hashes:
            self._lru.setdefault(replica.name, _BlockLru()).add(block_hashes, self._bound(replica))

    def forget(self, replica_name: str) -> None:
        self._lru.pop(replica_name, None)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (CacheAware, LeastLoad, RoundRobin)}
"""Routing policies by name (`--routing_policy`)."""
DEFAULT_POLICY = CacheAware.name


def make_policy(name: str = DEFAULT_POLICY, config: RoutingConfig | None = None) -> Policy:
    """The policy called `name` (ValueError naming the choices otherwise)."""
    if name not in POLICIES:
        raise ValueError(f"routing policy {name!r} is not one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](config)


# ----- ejection -----------------------------------------------------------------------------------------------------

SERVING = "serving"
"""A health probe answered SERVING."""
NOT_SERVING = "not_serving"
"""A health probe answered NOT_SERVING (warming up, draining, stalled): authoritative, ejects at once."""
UNREACHABLE = "unreachable"
"""A health probe got no answer (connection refused, deadline): counts as a failure, like a failed request."""


@dataclasses.dataclass(frozen=True)
class EjectionConfig:
    """Hysteresis of ejection and readmission."""

    failures_to_eject: int = 2
    """Consecutive failures (failed requests: UNAVAILABLE, DEADLINE_EXCEEDED, connection errors; unanswered
    probes) that eject a replica. A client's bad request is never a failure."""
    successes_to_readmit: int = 2
    """Consecutive SERVING probes, after the cooldown, that readmit an ejected replica."""
    cooldown: float = 1.0
    """Least time an ejection lasts, seconds; doubled (up to `max_cooldown`) when a replica is ejected again within
    `stable_after` of its readmission (a flapping replica stays out longer), back to this once it has been stable."""
    max_cooldown: float = 30.0
    """Longest cooldown, seconds: an ejection always ends once the replica answers SERVING again."""
    stable_after: float = 30.0
    """Seconds after a readmission within which a new ejection counts as flapping."""


class Ejector:
    """One replica's ejection state: ejected on a NOT_SERVING probe or `failures_to_eject` consecutive failures;
    readmitted after its cooldown by `successes_to_readmit` consecutive SERVING probes."""

    def __init__(self, config: EjectionConfig | None = None) -> None:
        self.config = config or EjectionConfig()
        self.ejected = False
        self.reason = ""
        """Why it is ejected ("" when admitted)."""
        self.ejections = 0
        """Times it was ejected."""
        self._failures = 0
        self._successes = 0
        self._until = 0.0
        self._cooldown = self.config.cooldown
        self._readmitted_at = -math.inf

    def admits(self) -> bool:
        return not self.ejected

    def _eject(self, now: float, reason: str) -> bool:
        self._failures = self._successes = 0
        if self.ejected:
            self.reason = reason
            return False
        flapping = now - self._readmitted_at < self.config.stable_after
        self._cooldown = min(self._cooldown * 2, self.config.max_cooldown) if flapping else self.config.cooldown
        self.ejected, self.reason = True, reason
        self._until = now + self._cooldown
        self.ejections += 1
        return True

    def failure(self, now: float, reason: str) -> bool:
        """A request or probe failed for a reason that is the replica's; True when this ejects it."""
        self._successes = 0
        self._failures += 1
        if self.ejected:
            self._until = max(self._until, now + self._cooldown)
            return False
        if self._failures >= self.config.failures_to_eject:
            return self._eject(now, reason)
        return False

    def success(self, now: float) -> None:
        """A request was served (its stream produced tokens or finished): consecutive failures start over."""
        self._failures = 0

    def probe(self, status: str, now: float, reason: str = "") -> bool:
        """A health probe's result (`SERVING`, `NOT_SERVING` or `UNREACHABLE`); True when the admission changed."""
        if status == NOT_SERVING:
            return self._eject(now, reason or "health: NOT_SERVING")
        if status == UNREACHABLE:
            return self.failure(now, reason or "health: unreachable")
        self._failures = 0
        if not self.ejected:
            return False
        if now < self._until:
            self._successes = 0  # only probes after the cooldown count
            return False
        self._successes += 1
        if self._successes < self.config.successes_to_readmit:
            return False
        self.ejected, self.reason, self._successes = False, "", 0
        self._readmitted_at = now
        return True
