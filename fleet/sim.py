"""The fleet simulator: a discrete-event simulation of the router over replicas in several regions, no autoscaling.

What it runs is the router's own decision code: `fleet.policy` picks the replica (`Policy.pick` with the simulated
time) from `ReplicaView`s that the simulation keeps as the router does (a load report every `load_poll_s`, plus the
router's own in-flight and just-sent counts), and `fleet.admission` queues what finds no room (priority bands,
fairness between keys, a bound and a time limit) and says why a request is refused. Nothing of either is copied here.

Around it:
- replicas (`fleet.sim_replica.SimReplica`): slots, a KV page pool with a prefix cache, chunked prefill and decode
  dispatches, timed from a measured engine profile (`fleet.sim_profile`); the replicas file is the router's own format
  (`fleet.config`), so a fleet's config can be simulated as it is;
- regions: a client talks to a gateway in its own region (the gateways share one router state); a request to a
  replica in region B from a client in region A pays the round trip between A and B once before its first token
  (the request goes out, the first token comes back) and half of it for the end of the stream;
- clients (`fleet.sim_workload`): a day of diurnal load with bursts, W4-style multi-turn chats, paid and free keys.

A conversation whose turn is refused ends there (the user gives up); no request is ever silently dropped: each one is
recorded as completed, or refused with the admission reason.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from fleet import admission as adm
from fleet import policy as pol
from fleet.config import ReplicaSpec
from fleet.sim_profile import StepProfile
from fleet.sim_replica import SimReplica, SimRequest
from fleet.sim_workload import Turn, Workload, WorkloadConfig

DEFAULT_RTT_MS = {
    ("us-east", "eu-west"): 80.0,
    ("us-east", "ap-south"): 200.0,
    ("eu-west", "ap-south"): 130.0,
}
LOCAL_RTT_MS = 2.0
"""Round trip between a client and a replica in the same region."""
UNKNOWN_RTT_MS = 150.0
"""Round trip between two regions the table does not name."""


def default_fleet() -> list[ReplicaSpec]:
    """Six replicas scattered unevenly: three in us-east, two in eu-west, one in ap-south (prices per chip-hour of a
    2-core CPU VM in each region; the relative figures are what matter)."""
    layout = (("us-east", 3, 0.10), ("eu-west", 2, 0.12), ("ap-south", 1, 0.09))
    return [
        ReplicaSpec(f"{region}-{i}", f"sim://{region}-{i}", region, "cpu-2c", price, 1, 1.0)
        for region, count, price in layout
        for i in range(count)
    ]


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """One simulation run: the fleet, the router's settings, the clients and the objectives."""

    policy: str = pol.DEFAULT_POLICY
    routing: pol.RoutingConfig = dataclasses.field(default_factory=pol.RoutingConfig)
    admission: adm.AdmissionConfig = dataclasses.field(default_factory=adm.AdmissionConfig)
    workload: WorkloadConfig = dataclasses.field(default_factory=WorkloadConfig)
    replicas: tuple[ReplicaSpec, ...] = ()
    """Empty: `default_fleet()`."""
    rtt_ms: dict[tuple[str, str], float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RTT_MS))
    """Round trip between two regions (either order), ms."""
    local_rtt_ms: float = LOCAL_RTT_MS
    load_poll_s: float = 0.5
    """Seconds between two load reports of a replica to the router (fleet.router.RouterConfig.poll_period)."""
    observe_completions: bool = True
    """Tell the policy, when a turn ends, that its replica now caches the prompt and reply (`Policy.observe`)."""
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.25
    buckets: int = 48
    """Time-series buckets over the run (plots)."""

    def rtt_s(self, a: str, b: str) -> float:
        if a == b:
            return self.local_rtt_ms / 1e3
        ms = self.rtt_ms.get((a, b), self.rtt_ms.get((b, a), UNKNOWN_RTT_MS))
        return ms / 1e3


@dataclasses.dataclass
class Record:
    """What one request experienced, seen from its client."""

    sent: float
    region: str
    key: str
    priority: int
    conversation: int
    turn: int
    prompt_tokens: int
    status: str = "ok"
    """ok, or refused:<reason> (fleet.admission ABSENT / DRAINING / FULL), or refused:too_long."""
    replica: str | None = None
    cached_tokens: int = 0
    output_tokens: int = 0
    queued_s: float = 0.0
    """Seconds in the gateway queue."""
    ttft: float | None = None
    e2e: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.e2e is None or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class EventLoop:
    """Time-ordered callbacks; ties run in the order they were scheduled."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[float], None]]] = []
        self._order = itertools.count()

    def at(self, t: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._order), fn))

    def run(self, until: float = math.inf) -> None:
        while self._heap and self._heap[0][0] <= until:
            t, _, fn = heapq.heappop(self._heap)
            self.now = t
            fn(t)


@dataclasses.dataclass
class _Pending:
    """A request between the client and a replica."""

    turn: Turn
    record: Record
    route: pol.RouteRequest
    sequence_hashes: tuple[int, ...]
    view: pol.ReplicaView | None = None


class FleetSim:
    """One run: the clients, the router (policy + admission) and the replicas, until every request has ended."""

    def __init__(self, config: SimConfig, profile: StepProfile) -> None:
        # blocks are the replica's KV pages, as the router takes them from each replica's model info
        config = dataclasses.replace(config, routing=dataclasses.replace(config.routing, block_size=profile.page_size))
        self.config = config
        self.profile = profile
        self.loop = EventLoop()
        self.policy = pol.make_policy(config.policy, config.routing)
        self.queue = adm.AdmissionQueue(config.admission)
        self.specs = list(config.replicas or default_fleet())
        self.views = [
            pol.ReplicaView(
                s.name,
                s.region,
                s.pool,
                s.weight,
                num_slots=profile.num_slots,
                kv_pages_total=profile.kv_pages,
                price_per_chip_hour=s.price_per_chip_hour,
                chips=s.chips,
            )
            for s in self.specs
        ]
        self.by_name = {v.name: v for v in self.views}
        self.replicas = {
            s.name: SimReplica(s.name, profile, self.loop.at, on_first_token=self._first_token, on_done=self._done)
            for s in self.specs
        }
        self.workload = Workload(config.workload)
        self.records: list[Record] = []
        self.conversations = 0
        self.ended_by_refusal = 0
        self._requests: dict[int, _Pending] = {}
        self._ids = itertools.count()
        self._expiry_at: float | None = None

    # ----- clients ----------------------------------------------------------------------------------------------------

    def run(self, *, starts: bool = True) -> dict[str, Any]:
        """Runs the day (with `starts` False, only what was scheduled by hand: `start_conversation`); returns the
        summary (`fleet.sim_report.summarize`)."""
        from fleet.sim_report import summarize

        duration = self.config.workload.duration_s
        for t, region in self.workload.starts() if starts else ():
            self.loop.at(t, lambda now, region=region: self.start_conversation(now, region))
        self.loop.at(0.0, self._poll)
        self.loop.run()
        return summarize(self, duration)

    def start_conversation(self, now: float, region: str) -> None:
        """A new conversation in `region` sends its first turn now."""
        self.conversations += 1
        self._send(now, self.workload.conversation(region))

    def _send(self, now: float, conv: Any) -> None:
        if now > self.config.workload.duration_s:
            return  # the day is over: no new turns
        turn = self.workload.next_turn(conv)
        if turn is None:
            return
        block = self.config.routing.block_size
        route = pol.RouteRequest(
            key=conv.key,
            region=conv.region,
            priority=conv.priority,
            prompt_tokens=turn.prompt_tokens,
            block_hashes=pol.block_hashes(turn.prompt, block),
        )
        sequence = pol.block_hashes(turn.prompt + turn.reply, block)
        record = Record(now, conv.region, conv.key, conv.priority, conv.id, turn.index, turn.prompt_tokens)
        self.records.append(record)
        pending = _Pending(turn, record, route, sequence)
        if turn.prompt_tokens + turn.max_tokens > self.profile.max_seq_len:
            self._refuse(pending, "too_long", now)
            return
        self._route(pending, now)

    # ----- the router -------------------------------------------------------------------------------------------------

    def _route(self, pending: _Pending, now: float) -> None:
        view = self.policy.pick(pending.route, self.views, now)
        if view is not None:
            self._dispatch(pending, view, now)
            return
        waiter, shed = adm.enqueue(self.queue, pending, key=pending.route.key, priority=pending.route.priority, now=now)
        for dropped in shed:
            self._refuse(dropped.item, self._reason(waited=now - dropped.enqueued_at), now)
        if waiter is None:
            self._refuse(pending, self._reason(waited=0.0), now)
            return
        self._arm_expiry()

    def _reason(self, *, waited: float) -> str:
        return adm.refusal(self.views, self.config.admission, queued=len(self.queue), waited=waited).reason

    def _arm_expiry(self) -> None:
        deadline = self.queue.next_deadline()
        if deadline is None or (self._expiry_at is not None and self._expiry_at <= deadline):
            return
        self._expiry_at = deadline
        self.loop.at(deadline, self._expire)

    def _expire(self, now: float) -> None:
        self._expiry_at = None
        for waiter in self.queue.expire(now):
            self._refuse(waiter.item, self._reason(waited=now - waiter.enqueued_at), now)
        self._arm_expiry()

    def _drain_queue(self, now: float) -> None:
        """Admits queued requests while some replica has room (after a request ended or a load report)."""
        for waiter, view in adm.drain(self.queue, lambda pending: self.policy.pick(pending.route, self.views, now)):
            waiter.item.record.queued_s = now - waiter.enqueued_at
            self._dispatch(waiter.item, view, now)

    def _refuse(self, pending: _Pending, reason: str, now: float) -> None:
        pending.record.status = f"refused:{reason}"
        pending.record.queued_s = now - pending.record.sent
        self.ended_by_refusal += 1

    def _dispatch(self, pending: _Pending, view: pol.ReplicaView, now: float) -> None:
        pending.view = view
        pending.record.replica = view.name
        rid = next(self._ids)
        self._requests[rid] = pending
        turn = pending.turn
        request = SimRequest(
            rid,
            turn.prompt_tokens,
            turn.max_tokens,
            len(turn.reply),
            pending.route.block_hashes,
            pending.sequence_hashes,
            pending.route.priority,
        )
        rtt = self.config.rtt_s(pending.record.region, view.region)
        replica = self.replicas[view.name]
        self.loop.at(now + rtt / 2, lambda t: replica.submit(request, t))

    def _first_token(self, request: SimRequest, t: float) -> None:
        pending = self._requests[request.id]
        rtt = self.config.rtt_s(pending.record.region, pending.view.region)
        pending.record.ttft = t + rtt / 2 - pending.record.sent

    def _done(self, request: SimRequest, t: float) -> None:
        pending = self._requests.pop(request.id)
        rtt = self.config.rtt_s(pending.record.region, pending.view.region)
        rec = pending.record
        rec.e2e = t + rtt / 2 - rec.sent
        rec.output_tokens = request.generated
        rec.cached_tokens = request.cached_tokens
        self.loop.at(t + rtt / 2, lambda now: self._stream_ended(pending, now))

    def _stream_ended(self, pending: _Pending, now: float) -> None:
        """The client (and its gateway) saw the last token: the router's count drops, the conversation goes on."""
        self.policy.release(pending.view)
        if self.config.observe_completions:
            self.policy.observe(pending.view, pending.sequence_hashes, now)
        Workload.completed(pending.turn)
        conv = pending.turn.conversation
        self.loop.at(now + self.workload.think_time(conv), lambda t: self._send(t, conv))
        self._drain_queue(now)

    def _poll(self, now: float) -> None:
        """Every replica's load report reaches the router (the router's just-sent counts start over)."""
        for view in self.views:
            r = self.replicas[view.name]
            view.active_slots = len(r.running)
            view.waiting = len(r.waiting)
            view.kv_pages_used = r.pages_used
            view.kv_pages_cached = r.pages_cached
            view.sent_since_load = 0
        self._drain_queue(now)
        busy = self._requests or len(self.queue) or now < self.config.workload.duration_s
        if busy:
            self.loop.at(now + self.config.load_poll_s, self._poll)


def run_policies(config: SimConfig, profile: StepProfile, policies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The same day under each routing policy (same seed: the same conversations start at the same times)."""
    return {name: FleetSim(dataclasses.replace(config, policy=name), profile).run() for name in policies}


# ----- one replica against a measured W3 run -------------------------------------------------------------------------


def replay_w3(profile: StepProfile, serve_doc: dict[str, Any], run_index: int = 0) -> dict[str, Any]:
    """Replays a measured `benchmark.py serve` W3 run (its requests' send times, prompt and output lengths) on one
    simulated replica of `profile` (loopback: no round trip) and compares output tokens/s, TTFT and TPOT.

    Throughput is output tokens over first send to last completion, as bench/serve_client.py measures it."""
    from bench import stats

    figures = serve_doc.get("figures", serve_doc)
    run = figures["runs"][run_index]
    server_slots = figures.get("server", {}).get("num_slots")
    if server_slots is not None and int(server_slots) != profile.num_slots:
        raise ValueError(f"the W3 run's server had {server_slots} slots, the profile's engine {profile.num_slots}")
    loop = EventLoop()
    done: list[SimRequest] = []
    replica = SimReplica("replica", profile, loop.at, on_done=lambda r, t: done.append(r))
    records = [r for r in run["records"] if r["status"] == "OK"]
    for i, r in enumerate(records):
        req = SimRequest(i, int(r["prompt_tokens"]), int(r["output_tokens"]), int(r["output_tokens"]))
        loop.at(float(r["sent_at"]), lambda t, req=req: replica.submit(req, t))
    loop.run()
    sent = {i: float(r["sent_at"]) for i, r in enumerate(records)}
    end = max(r.done for r in done)
    tokens = sum(r.generated for r in done)
    sim_ttft = [r.first_token - sent[r.id] for r in done]
    sim_tpot = [(r.done - r.first_token) / (r.generated - 1) for r in done if r.generated > 1]
    measured = run["summary"]
    predicted = tokens / end if end > 0 else math.nan
    return {
        "rate": run["rate"],
        "requests": len(records),
        "measured_output_tokens_per_s": measured["output_tokens_per_s"],
        "predicted_output_tokens_per_s": predicted,
        "ratio": predicted / measured["output_tokens_per_s"],
        "measured_duration_s": measured["duration_s"],
        "predicted_duration_s": end,
        "measured_ttft_p50_ms": measured["ttft_ms"]["p50"],
        "predicted_ttft_p50_ms": stats.percentile(sim_ttft, 50) * 1e3,
        "measured_tpot_p50_ms": measured["tpot_ms"]["p50"],
        "predicted_tpot_p50_ms": stats.percentile(sim_tpot, 50) * 1e3,
        "replica_busy_fraction": replica.stats.busy_s / end if end > 0 else math.nan,
    }
