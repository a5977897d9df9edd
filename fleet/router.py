"""The fleet router: one `gateway.backend.Replica` over N meshserve replicas (gRPC), in the gateway process.

What it does for each request (`Router.generate`):
- **Route.** The prompt's token ids become block hashes; the policy (`fleet.policy`, default cache-aware) picks a
  replica with room, client's region first. The ids are computed in this process with the gateway's tokenizer once a
  replica's Tokenize agreed with it on probe texts (`gateway.backend.LocalTokens`), else asked of a replica's
  Tokenize; either way when the flow counts the prompt for admission (`count_tokens`), and kept in a small cache for
  the Generate that follows.
- **Admit.** When no replica has room, the request waits in the gateway queue (`fleet.admission`: priority bands,
  fairness between keys, a bound and a time limit); past that it is refused with 429 / RESOURCE_EXHAUSTED,
  Retry-After and a reason: replicas absent, draining or full.
- **Fail over.** A replica failure before the first token (UNAVAILABLE, DEADLINE_EXCEEDED, a connection error) retries
  the request on another replica. A replica whose own queue is full (RESOURCE_EXHAUSTED) has not failed: it gets no
  new work until its load report shows room, and the request goes to another replica with room or waits in the gateway
  queue (under its time limit) for one, this replica included. A stream cut mid-generation is resumed on another
  replica: the prompt's ids + the ids already streamed, `resumed_tokens` = their count, the same sampling (the router
  sets a seed when the request has none, so a resumed sampled stream continues as it would have). The consumer sees
  one stream: one first message, no token twice. Messages that carry tokens but no text yet (the replica holds back an
  incomplete character) are held until their text comes, so a cut always falls where the text streamed so far is
  exactly the text of the tokens streamed so far. A request with stop strings resumes too: the replica matches them
  over the resumed tokens' text as well, so the text the cut stream held back (it might have begun a stop string)
  comes out there, or the stop string it began ends the request. Where a resume is impossible - no replica left, too
  many attempts, a request with stop strings cut after its last token (the text the lost finish message carried cannot
  be asked for again) - the consumer gets a 503 (UNAVAILABLE) saying how many tokens were completed.

What it watches, per replica, every `RouterConfig.poll_period` seconds (0.5 by default): grpc.health.v1 Check and,
while SERVING, GetLoad (slots, waiting, KV pages, draining). A replica is ejected (no new work) on NOT_SERVING (its
streams go on), or after `EjectionConfig.failures_to_eject` consecutive failures (probes unanswered within
`probe_timeout`; requests failing with UNAVAILABLE, DEADLINE_EXCEEDED or a connection error), and readmitted after its
cooldown by consecutive SERVING probes (`fleet.policy.Ejector`). Ejected for failures, a replica may be frozen (a
stopped process keeps its connections open, so its streams would hang): its streams are cut and resumed or retried
elsewhere as for a dead one. A stream whose replica, once it has sent a message, sends nothing for
`RouterConfig.stall_timeout` seconds is cut the same way, and the stall counts as a failure. A client's bad request
(INVALID_ARGUMENT, any 4xx) never counts against a replica, nor does an engine failure on one request (INTERNAL:
passed to the client, not retried). A replica reporting `draining` gets no new work, and so does one that refuses or
ends a request saying it drains (UNAVAILABLE with `meshserve-draining` metadata, before its next load report): that
request goes elsewhere and the replica is not counted as failing. The replicas file is re-read
when it changes (`fleet.config.ConfigWatcher`): new replicas join, removed ones finish their streams and leave.

Who sent a request (the key, for fairness) and from where (the region) are read from the context variables
`gateway.backend.route_key` and `client_region`, which the front door sets; the router's own `RouterConfig.region`
is the default.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import importlib.resources
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleet import admission, policy
from fleet.admission import AdmissionConfig, AdmissionQueue, Refusal
from fleet.config import ConfigWatcher, ReplicaSpec
from fleet.metrics import FleetMetrics
from fleet.policy import EjectionConfig, Ejector, ReplicaView, RouteRequest, RoutingConfig
from gateway.backend import GrpcReplica, LocalTokens, TokenVocab, client_region, route_key, tokenize_request_of
from gateway.gate import GateError
from protos.meshserve.v1 import meshserve_pb2 as pb

log = logging.getLogger(__name__)

_TOKENIZE_CACHE = 512  # prompts whose ids are kept between the flow's count and the Generate that follows
_RATE_WINDOW = 10.0  # seconds over which requests/s is measured


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How the router routes, admits and watches."""

    policy: str = policy.DEFAULT_POLICY
    """Routing policy (`fleet.policy.POLICIES`)."""
    routing: RoutingConfig = dataclasses.field(default_factory=RoutingConfig)
    """Load bound, affinity slack, region preference."""
    admission: AdmissionConfig = dataclasses.field(default_factory=AdmissionConfig)
    """The gateway queue and refusals."""
    ejection: EjectionConfig = dataclasses.field(default_factory=EjectionConfig)
    """Ejection hysteresis."""
    poll_period: float = 0.5
    """Seconds between two health + load probes of a replica."""
    probe_timeout: float = 2.0
    """Deadline of one probe RPC, seconds; no answer counts as a failure."""
    reload_period: float = 1.0
    """Seconds between two checks of the replicas file's modification time."""
    region: str = ""
    """The gateway's own region: the clients' region unless `client_region` says otherwise."""
    max_resumes: int = 4
    """Most mid-stream resumes of one request (each on another replica)."""
    stall_timeout: float | None = 30.0
    """Seconds a stream under way (its current replica has sent it a message) may wait for the next message before
    the replica is deemed stalled: the stream is cut and resumed elsewhere, and the stall counts as a replica failure.
    None: no limit. No limit applies before an attempt's first message (the request may be waiting in the replica's
    own queue); a replica that stops answering altogether is ejected by its probes, which cuts every stream on it."""
    name: str = "fleet"
    """The router's name (`Replica.name`)."""


# ----- failures -----------------------------------------------------------------------------------------------------

CLIENT = "client"
"""The request's own fault (4xx): passed to the client, never counted against the replica."""
REPLICA = "replica"
"""The replica failed (unreachable, draining, timed out, cut the stream): retried or resumed elsewhere, counted."""
BUSY = "busy"
"""The replica's own queue is full: retried elsewhere, not counted (it is healthy, just full)."""
DRAINING = "draining"
"""The replica is draining for shutdown (it said so, before the next load report could): no new work there, the
request is retried (or its stream resumed) elsewhere, not counted - counting it would eject the replica and cut the
streams it is finishing."""
FINAL = "final"
"""The engine failed on this request (INTERNAL): passed to the client, not retried, not counted."""


def classify(error: GateError) -> str:
    """What a replica call's GateError (`gateway.backend.rpc_error`) means for routing: CLIENT, REPLICA, BUSY,
    DRAINING or FINAL."""
    if error.status < 499 or error.status == 413:
        return CLIENT
    if error.code == "overloaded":
        return BUSY
    if error.code == "draining":
        return DRAINING
    if error.status == 500:
        return FINAL
    # 499 (CANCELLED we did not ask for: the server went away), 502 (an unknown code), 503 (UNAVAILABLE: dead,
    # draining, warming), 504 (DEADLINE_EXCEEDED)
    return REPLICA


# ----- members ------------------------------------------------------------------------------------------------------


class _Member:
    """One replica of the fleet: its client, its view, its ejection state and its counters."""

    def __init__(self, spec: ReplicaSpec, config: RouterConfig, vocab: TokenVocab | None) -> None:
        self.spec = spec
        self.replica = GrpcReplica(spec.address, name=spec.name, vocab=vocab)
        self.view = ReplicaView(
            name=spec.name,
            region=spec.region,
            pool=spec.pool,
            weight=spec.weight,
            healthy=False,  # until its first SERVING probe
            num_slots=0,
            price_per_chip_hour=spec.price_per_chip_hour,
            chips=spec.chips,
        )
        self.ejector = Ejector(config.ejection)
        self.probed = False  # a first SERVING probe admits at once (no cooldown to sit out)
        self.info: pb.ModelInfo | None = None
        self.mismatch: str | None = None  # why it serves another model than the fleet (never routed to)
        self.retired = False  # left the config: finishes its streams, takes no new work
        self.page_size = 0
        self.task: asyncio.Task | None = None
        self._health_channel: grpc.aio.Channel | None = None
        self._health: health_pb2_grpc.HealthStub | None = None
        self.routed_at: collections.deque[float] = collections.deque()
        self.routed = 0
        self.failures = 0
        self.prompt_tokens = 0  # of the streams it finished: their hit rate is cached / prompt
        self.cached_tokens = 0
        self.last_error = ""
        self.streams: set[RoutedGeneration] = set()  # attempts running there: cut when it stops answering
        self.device_seconds = 0.0  # of the attempts it finished, and the tokens they generated there: the rate
        self.generated_tokens = 0  # at which a cut attempt's device time is estimated (see RoutedGeneration)

    def device_rate(self) -> float:
        """Device-seconds per generated token over the attempts it finished (prefill shares included); 0 before
        any."""
        return self.device_seconds / self.generated_tokens if self.generated_tokens else 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    def health(self) -> health_pb2_grpc.HealthStub:
        if self._health is None:
            self._health_channel = grpc.aio.insecure_channel(self.spec.address)
            self._health = health_pb2_grpc.HealthStub(self._health_channel)
        return self._health

    def sync(self) -> None:
        self.view.healthy = self.probed and self.ejector.admits() and self.mismatch is None and not self.retired

    def update_spec(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        v = self.view
        v.region, v.pool, v.weight = spec.region, spec.pool, spec.weight
        v.price_per_chip_hour, v.chips = spec.price_per_chip_hour, spec.chips

    def rate(self, now: float) -> float:
        while self.routed_at and self.routed_at[0] < now - _RATE_WINDOW:
            self.routed_at.popleft()
        return len(self.routed_at) / _RATE_WINDOW

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.replica.close()
        if self._health_channel is not None:
            await self._health_channel.close()


# ----- the router ---------------------------------------------------------------------------------------------------


class Router:
    """A `gateway.backend.Replica` over the replicas of a config (a list of specs, or a replicas file that is
    re-read on change). Its tasks start on first use (or `start()`) in the event loop that serves it."""

    def __init__(
        self,
        replicas: Sequence[ReplicaSpec] | str,
        config: RouterConfig | None = None,
        *,
        vocab: TokenVocab | None = None,
        metrics: FleetMetrics | None = None,
    ) -> None:
        """`replicas`: the specs, or the path of a replicas file (ConfigError when it is invalid)."""
        self.config = config = config or RouterConfig()
        self.name = config.name
        self.vocab = vocab
        self._watcher: ConfigWatcher | None = None
        if isinstance(replicas, str):
            self._watcher = ConfigWatcher(replicas)
            replicas = self._watcher.specs
        self.policy = policy.make_policy(config.policy, config.routing)
        self.queue = AdmissionQueue(config.admission)
        self.metrics = metrics or FleetMetrics()
        self._members: dict[str, _Member] = {s.name: _Member(s, config, vocab) for s in replicas}
        self._retiring: list[_Member] = []
        self._info: pb.ModelInfo | None = None
        self._tokens: collections.OrderedDict[bytes, list[int]] = collections.OrderedDict()
        self._local = LocalTokens(self)
        self._tasks: list[asyncio.Task] = []
        self._started: asyncio.Future | None = None
        self._queue_wake: asyncio.Event | None = None
        self._shed: collections.Counter[str] = collections.Counter()
        self._shed_regions: collections.Counter[str] = collections.Counter()  # by the refused client's region
        self._shed_at: collections.deque[float] = collections.deque()
        self._failovers: collections.Counter[str] = collections.Counter()
        self._closed = False

    # ----- lifecycle -----

    async def start(self) -> None:
        """Starts watching every replica and probes each once (bounded by `probe_timeout`); idempotent."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            self._queue_wake = asyncio.Event()
            members = list(self._members.values())
            await asyncio.gather(*(self._probe(m) for m in members), return_exceptions=True)
            for m in members:
                m.task = asyncio.create_task(self._watch(m, first_delay=True), name=f"fleet-watch-{m.name}")
            self._tasks.append(asyncio.create_task(self._expire_loop(), name="fleet-queue"))
            if self._watcher is not None:
                self._tasks.append(asyncio.create_task(self._reload_loop(), name="fleet-reload"))
            # the tokenizer's probes now, off any request's path (a request that comes first waits for them)
            self._tasks.append(asyncio.create_task(self._local.check(), name="fleet-tokenizer-check"))
            self._started.set_result(None)
        await asyncio.shield(self._started)

    async def close(self) -> None:
        """Stops watching, refuses what waits in the queue, closes every channel."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        while (waiter := self.queue.pop()) is not None:
            future = waiter.item[0]
            if not future.done():
                future.set_exception(GateError(503, "the gateway is shutting down", kind="server_error"))
        for m in [*self._members.values(), *self._retiring]:
            await m.close()

    # ----- watching -----

    async def _watch(self, member: _Member, first_delay: bool = False) -> None:
        if first_delay:
            await asyncio.sleep(self.config.poll_period)
        while True:
            try:
                await self._probe(member)
            except Exception:  # a bug in a probe must not stop the watching
                log.exception("fleet: probing %s failed", member.name)
            if member.retired and member.view.in_flight == 0:
                await self._drop(member)
                return
            await asyncio.sleep(self.config.poll_period)

    async def _probe(self, m: _Member) -> None:
        timeout = self.config.probe_timeout
        reason = ""
        try:
            reply = await m.health().Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            status = policy.SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else policy.NOT_SERVING
            if status == policy.NOT_SERVING:
                reason = "health: NOT_SERVING"
        except grpc.aio.AioRpcError as e:
            status, reason = policy.UNREACHABLE, f"health: {e.code().name}"
        if status != policy.UNREACHABLE:
            # also while NOT_SERVING: a draining replica says so in its load, and is then not a failure
            try:
                load = await asyncio.wait_for(m.replica.load(), timeout)
                if m.info is None:
                    await self._learn(m)
            except (GateError, TimeoutError) as e:
                if status == policy.SERVING:
                    status, reason = policy.UNREACHABLE, f"load: {getattr(e, 'message', None) or type(e).__name__}"
            else:
                self._take_load(m, load)
        now = time.monotonic()
        was = m.view.healthy
        if status != policy.SERVING:
            m.last_error = reason
        if not m.probed:
            m.probed = status == policy.SERVING  # warming up is not a failure: it is not in the fleet yet
        elif m.view.draining and status == policy.NOT_SERVING:
            pass  # a drain, not a failure: no new work (see `available`), its streams finish, no ejection
        elif m.ejector.probe(status, now, reason) and m.ejector.ejected:
            self._ejected(m)
        m.sync()
        self.metrics.observe(m.view)
        if m.view.healthy and not was:
            log.info("fleet: %s (%s) is in the fleet", m.name, m.spec.address)
            self._dispatch()

    def _take_load(self, m: _Member, load: pb.Load) -> None:
        v = m.view
        v.num_slots = load.slots_total
        v.active_slots = load.slots_used
        v.waiting = load.waiting_requests
        # as the replica's scheduler judges it (a burst may fill free slots beyond max_waiting); 0: not reported
        v.full = load.max_waiting > 0 and load.waiting_requests >= load.max_waiting + load.free_slots
        v.kv_pages_total = load.kv_pages_total
        v.kv_pages_used = load.kv_pages_used
        v.kv_pages_cached = load.kv_pages_cached
        v.sent_since_load = v.finished_since_load = 0
        if v.draining != load.draining:
            log.info("fleet: %s %s", m.name, "is draining: no new work" if load.draining else "stopped draining")
        v.draining = load.draining
        m.page_size = load.kv_page_size
        self._dispatch()  # a fresh report may show room

    async def _learn(self, m: _Member) -> None:
        info = await m.replica.model_info()
        m.info = info
        if self._info is None:
            self._info = info
            return
        fleet = self._info
        if (info.model_name, info.vocab_size) != (fleet.model_name, fleet.vocab_size):
            m.mismatch = (
                f"serves {info.model_name} (vocab {info.vocab_size}), the fleet {fleet.model_name} "
                f"(vocab {fleet.vocab_size})"
            )
            log.error("fleet: %s is left out: it %s", m.name, m.mismatch)

    def _ejected(self, m: _Member) -> None:
        reason = m.ejector.reason
        log.warning("fleet: ejected %s: %s", m.name, reason)
        self.metrics.ejections.labels(m.name, m.view.region, reason.split(":")[0]).inc()
        if not reason.startswith("health: NOT_SERVING"):
            # unreachable or failing: it may come back as a fresh process with an empty cache
            self.policy.forget(m.name)
            # and its streams may never move again (a frozen process keeps its connections open): cut them, so they
            # resume (or, without a token yet, retry) elsewhere. A NOT_SERVING replica still answers; its streams go
            # on, and the stall limit guards them.
            if m.streams:
                log.warning("fleet: cutting %d stream(s) on %s to resume them elsewhere", len(m.streams), m.name)
            for stream in list(m.streams):
                stream.cut(f"{m.name} was ejected ({reason})")

    def _failure(self, m: _Member, reason: str) -> None:
        """A request failed for a reason that is the replica's."""
        m.failures += 1
        m.last_error = reason
        if m.ejector.failure(time.monotonic(), reason):
            self._ejected(m)
            m.sync()
            self.metrics.observe(m.view)

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_period)
            specs = self._watcher.poll()
            if self._watcher.error:
                log.error("fleet: replicas file not reloaded: %s", self._watcher.error)
            if specs is not None:
                self._apply(specs)

    def _apply(self, specs: list[ReplicaSpec]) -> None:
        """Takes a new replicas list: new replicas join, removed ones retire (their streams finish), changed
        regions, pools, prices and weights apply at once."""
        wanted = {s.name: s for s in specs}
        for name, m in list(self._members.items()):
            spec = wanted.get(name)
            if spec is not None and spec.address == m.spec.address:
                m.update_spec(spec)
                continue
            del self._members[name]
            m.retired = True
            m.sync()
            self._retiring.append(m)
            log.info("fleet: %s (%s) leaves the fleet once its streams finish", name, m.spec.address)
        for name, spec in wanted.items():
            if name not in self._members:
                m = self._members[name] = _Member(spec, self.config, self.vocab)
                m.task = asyncio.create_task(self._watch(m), name=f"fleet-watch-{name}")
                log.info("fleet: %s (%s) joins", name, spec.address)

    async def _drop(self, m: _Member) -> None:
        if m in self._retiring:
            self._retiring.remove(m)
        self.policy.forget(m.name)
        self.metrics.remove(m.view)
        m.task = None  # (this is that task: closing must not cancel it mid-close)
        await m.close()

    # ----- routing and the queue -----

    def _routable(self) -> list[_Member]:
        return [m for m in self._members.values() if m.mismatch is None]

    def _pick(self, route: RouteRequest, exclude: frozenset[str]) -> _Member | None:
        members = {m.name: m for m in self._routable() if m.name not in exclude}
        view = self.policy.pick(route, [m.view for m in members.values()], time.monotonic())
        if view is None:
            return None
        m = members[view.name]
        m.routed += 1
        m.routed_at.append(time.monotonic())
        self.metrics.routed.labels(m.name, m.view.region).inc()
        self.metrics.in_flight.labels(m.name, m.view.region).set(m.view.in_flight)
        return m

    def _release(self, m: _Member) -> None:
        self.policy.release(m.view)
        self.metrics.in_flight.labels(m.name, m.view.region).set(m.view.in_flight)
        self._dispatch()

    def _refuse(self, refusal: Refusal, region: str) -> GateError:
        self._shed[refusal.reason] += 1
        self._shed_regions[region] += 1
        self._shed_at.append(time.monotonic())
        self.metrics.shed.labels(refusal.reason, region).inc()
        return GateError(
            429,
            f"the fleet cannot take the request: {refusal.message}",
            kind="rate_limit_exceeded",
            code=f"replicas_{refusal.reason}",
            retry_after=refusal.retry_after,
        )

    async def _acquire(self, route: RouteRequest, exclude: frozenset[str]) -> _Member:
        """A replica with room for `route`, waiting in the gateway queue when there is none; raises the refusal."""
        m = self._pick(route, exclude)
        if m is not None:
            return m
        views = self._views(exclude)
        if not any(policy.available(v) for v in views):
            raise self._refuse(admission.refusal(views, self.config.admission), route.region)
        future: asyncio.Future[_Member] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        waiter, shed = admission.enqueue(
            self.queue, (future, route, exclude), key=route.key, priority=route.priority, now=now
        )
        for dropped in shed:
            self._fail_waiter(dropped, now)
        if waiter is None:
            refusal = admission.refusal(views, self.config.admission, queued=len(self.queue))
            raise self._refuse(refusal, route.region)
        self.metrics.queue.set(len(self.queue))
        self._queue_wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            self.queue.remove(waiter)
            self.metrics.queue.set(len(self.queue))
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(future.result())  # picked for us just as we went away
            raise

    def _views(self, exclude: frozenset[str]) -> list[ReplicaView]:
        """Every routable replica as the refusal of a request that already failed on those in `exclude` sees them:
        those count as unavailable (configured, but not serving this request), so the reason is theirs - draining,
        not serving - rather than "no replica is configured"."""
        return [dataclasses.replace(m.view, healthy=False) if m.name in exclude else m.view for m in self._routable()]

    def _fail_waiter(self, waiter: admission.Waiter, now: float) -> None:
        future, route, exclude = waiter.item
        if future.done():
            return
        views = self._views(exclude)
        refusal = admission.refusal(
            views, self.config.admission, queued=len(self.queue), waited=max(now - waiter.enqueued_at, 1e-3)
        )
        future.set_exception(self._refuse(refusal, route.region))

    def _dispatch(self) -> None:
        """Hands queued requests to replicas while the next one in turn finds room."""
        for waiter, m in admission.drain(
            self.queue, lambda item: self._pick(item[1], item[2]), gone=lambda item: item[0].done()
        ):
            waiter.item[0].set_result(m)
        self.metrics.queue.set(len(self.queue))

    async def _expire_loop(self) -> None:
        while True:
            if not len(self.queue):
                self._queue_wake.clear()
                await self._queue_wake.wait()
            await asyncio.sleep(0.05)
            now = time.monotonic()
            for waiter in self.queue.expire(now):
                self._fail_waiter(waiter, now)
            self._dispatch()

    # ----- the Replica interface -----

    def _ordered(self) -> list[_Member]:
        """Members to ask for a unary call: routable ones first, least loaded first."""
        members = list(self._members.values())
        return sorted(members, key=lambda m: (not m.view.healthy, m.mismatch is not None, policy.load_of(m.view)))

    async def _unary(self, call: str, request=None):
        """A unary call on the first member that answers; a client error is raised at once."""
        await self.start()
        last: GateError | None = None
        for m in self._ordered():
            if m.mismatch is not None:
                continue
            try:
                method = getattr(m.replica, call)
                return m, await (method(request) if request is not None else method())
            except GateError as e:
                if classify(e) in (CLIENT, FINAL):
                    raise
                last = e
        raise last or GateError(503, "no replica is configured", kind="server_error", code="unavailable")

    async def model_info(self) -> pb.ModelInfo:
        """The fleet's model: the first replica's info, with the smallest context of any replica and the slots of
        all."""
        await self.start()
        if self._info is None:
            m, _ = await self._unary("model_info")
            await self._learn(m)
        info = pb.ModelInfo()
        info.CopyFrom(self._info)
        known = [m.info for m in self._members.values() if m.info is not None and m.mismatch is None]
        if known:
            info.context_length = min(i.context_length for i in known)
            info.num_slots = sum(i.num_slots for i in known)
        info.max_waiting = self.config.admission.max_queued
        return info

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        _, response = await self._unary("tokenize", request)
        self._keep(request.SerializeToString(deterministic=True), list(response.token_ids))
        return response

    @property
    def counts_locally(self) -> bool:
        """Whether prompts are tokenized in this process (the gateway's tokenizer matched a replica's on probes)."""
        return self._local.local

    async def count_tokens(self, request: pb.TokenizeRequest) -> int:
        """How many tokens the prompt is, for the flow's admission; its ids are kept for the Generate that follows,
        which routes by them."""
        return len(await self._prompt_tokens(request))

    async def prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        """The prompt's token ids as the replica sees them (kept from the flow's count when it made one)."""
        if request.WhichOneof("input") == "token_ids":
            return list(request.token_ids.ids)
        # no input at all goes as an empty text, which the replica's Tokenize refuses naming the field
        tokenize = tokenize_request_of(request) or pb.TokenizeRequest(text=request.text, add_special_tokens=True)
        return await self._prompt_tokens(tokenize)

    async def _prompt_tokens(self, request: pb.TokenizeRequest) -> list[int]:
        key = request.SerializeToString(deterministic=True)
        ids = self._tokens.get(key)
        if ids is None:
            ids = await self._local.ids(request)
            self._keep(key, ids)
        return ids

    def _keep(self, key: bytes, ids: list[int]) -> None:
        self._tokens[key] = ids
        self._tokens.move_to_end(key)
        while len(self._tokens) > _TOKENIZE_CACHE:
            self._tokens.popitem(last=False)

    def generate(self, request: pb.GenerateRequest) -> RoutedGeneration:
        return RoutedGeneration(self, request)

    async def load(self) -> pb.Load:
        """The fleet's load: sums over the replicas in the fleet; `draining` when none takes new work and some
        drain. GateError 503 when no replica answers."""
        await self.start()
        members = [m for m in self._members.values() if m.probed and m.mismatch is None]
        if not members:
            raise GateError(503, "no replica of the fleet has answered yet", kind="server_error", code="unavailable")
        out = pb.Load()
        up = [m for m in members if policy.available(m.view)]
        for m in up:
            v = m.view
            out.slots_total += v.num_slots
            out.slots_used += v.active_slots
            out.waiting_requests += v.waiting
            out.kv_pages_total += v.kv_pages_total
            out.kv_pages_used += v.kv_pages_used
            out.kv_pages_cached += v.kv_pages_cached
        out.free_slots = out.slots_total - out.slots_used
        out.waiting_requests += len(self.queue)
        out.max_waiting = self.config.admission.max_queued
        out.draining = not up and any(m.view.draining for m in members)
        if not up and not out.draining:
            raise GateError(503, "no replica of the fleet is serving", kind="server_error", code="unavailable")
        return out

    def token_bytes(self, ids: Sequence[int]) -> list[bytes] | None:
        if self.vocab is None:
            return None
        return [self.vocab.token_bytes(t) for t in ids]

    # ----- the fleet view -----

    def snapshot(self) -> dict[str, Any]:
        """The fleet as JSON-able data for a dashboard (`fleet/dashboard.html`, served by the gateway at /fleet.json):
        each replica with its health, load, KV use, prefix-cache hit rate, requests/s and cost; per-region and fleet
        totals; the queue and what was shed. Regions and replicas are sorted by name."""
        now = time.monotonic()
        replicas = []
        for m in [*self._members.values(), *self._retiring]:
            v = m.view
            up = policy.available(v)
            replicas.append(
                {
                    "name": m.name,
                    "address": m.spec.address,
                    "region": v.region,
                    "pool": v.pool,
                    "weight": v.weight,
                    "state": _state(m),
                    "reason": m.mismatch or m.ejector.reason or ("" if m.probed else m.last_error),
                    "slots": v.num_slots,
                    "slots_used": v.active_slots,
                    "waiting": v.waiting,
                    "in_flight": v.in_flight,
                    "load": round(policy.load_of(v), 4),
                    "kv_pages_total": v.kv_pages_total,
                    "kv_pages_used": v.kv_pages_used,
                    "kv_pages_cached": v.kv_pages_cached,
                    "kv_used": round(v.kv_pages_used / v.kv_pages_total, 4) if v.kv_pages_total else 0.0,
                    "prompt_tokens": m.prompt_tokens,
                    "cached_tokens": m.cached_tokens,
                    "hit_rate": _ratio(m.cached_tokens, m.prompt_tokens),
                    "requests_per_s": round(m.rate(now), 3),
                    "routed": m.routed,
                    "failures": m.failures,
                    "ejections": m.ejector.ejections,
                    "cost_per_hour": round(m.spec.cost_per_hour, 4) if up else 0.0,
                }
            )
        regions: dict[str, dict[str, Any]] = {}
        for r in replicas:
            g = regions.setdefault(r["region"], _totals())
            _add(g, r)
        for region, shed in self._shed_regions.items():
            regions.setdefault(region, _totals())["shed"] = shed
        while self._shed_at and self._shed_at[0] < now - _RATE_WINDOW:
            self._shed_at.popleft()
        fleet = _totals()
        for r in replicas:
            _add(fleet, r)
        fleet["shed"] = sum(self._shed.values())
        return {
            "policy": self.policy.name,
            "model": self._info.model_name if self._info is not None else None,
            "replicas": sorted(replicas, key=lambda r: (r["region"], r["name"])),
            "regions": dict(sorted(regions.items())),
            "totals": fleet,
            "queue": {"length": len(self.queue), "max": self.config.admission.max_queued},
            "shed": dict(self._shed),
            "shed_per_s": round(len(self._shed_at) / _RATE_WINDOW, 3),
            "failovers": dict(self._failovers),
            "requests_per_s": fleet["requests_per_s"],
            "cost_per_hour": fleet["cost_per_hour"],
            "config_error": self._watcher.error if self._watcher is not None else None,
        }

    def dashboard_html(self) -> str:
        """The fleet's dashboard page (`fleet/dashboard.html`): static HTML that polls `/fleet.json` every second."""
        return _DASHBOARD.read_text(encoding="utf-8")


_DASHBOARD = importlib.resources.files("fleet") / "dashboard.html"


def _ratio(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole else 0.0


def _totals() -> dict[str, Any]:
    """A region's or the fleet's sums; capacity (slots, KV pages) counts the replicas that are up."""
    keys = ("replicas", "up", "slots", "slots_used", "waiting", "in_flight", "kv_pages_total", "kv_pages_used")
    out: dict[str, Any] = dict.fromkeys(keys, 0)
    out.update(prompt_tokens=0, cached_tokens=0, hit_rate=0.0, routed=0, requests_per_s=0.0, cost_per_hour=0.0)
    out["shed"] = 0
    return out


def _add(g: dict[str, Any], r: dict[str, Any]) -> None:
    up = r["state"] == "up"
    g["replicas"] += 1
    g["up"] += up
    for key in ("slots", "slots_used", "kv_pages_total", "kv_pages_used"):
        g[key] += r[key] if up else 0
    for key in ("waiting", "in_flight", "prompt_tokens", "cached_tokens", "routed"):
        g[key] += r[key]
    g["hit_rate"] = _ratio(g["cached_tokens"], g["prompt_tokens"])
    g["requests_per_s"] = round(g["requests_per_s"] + r["requests_per_s"], 3)
    g["cost_per_hour"] = round(g["cost_per_hour"] + r["cost_per_hour"], 4)


def _state(m: _Member) -> str:
    if m.mismatch is not None:
        return "mismatch"
    if m.retired:
        return "retiring"
    if not m.probed:
        return "unknown"
    if m.ejector.ejected:
        return "ejected"
    if m.view.draining:
        return "draining"
    return "up"


# ----- one routed stream --------------------------------------------------------------------------------------------


def _merge(messages: list[pb.GenerateResponse]) -> pb.GenerateResponse:
    """Messages held back while their text was incomplete, joined with the one that completed it."""
    if len(messages) == 1:
        return messages[0]
    out = pb.GenerateResponse()
    out.request_id, out.prompt_tokens = messages[0].request_id, messages[0].prompt_tokens
    out.text = "".join(m.text for m in messages)
    for m in messages:
        out.token_ids.extend(m.token_ids)
        out.logprobs.extend(m.logprobs)
    last = messages[-1]
    out.finish_reason = last.finish_reason
    if last.HasField("usage"):
        out.usage.CopyFrom(last.usage)
    if last.HasField("timings"):
        out.timings.CopyFrom(last.timings)
    return out


class RoutedGeneration:
    """One Generate stream over the fleet (a `gateway.backend.Generation`): routed, queued, retried and resumed as
    the module docstring says. `replica` names the replica(s) that served it, in order ("a>b" after a failover)."""

    def __init__(self, router: Router, request: pb.GenerateRequest) -> None:
        self._router = router
        self._request = pb.GenerateRequest()
        self._request.CopyFrom(request)
        if not self._request.sampling.HasField("seed"):
            # a seed of the router's choosing makes a sampled stream resumable: the replica's draw would be lost
            self._request.sampling.seed = random.getrandbits(32)
        self._key, self._region = route_key.get(), client_region.get() or router.config.region
        self._member: _Member | None = None
        self._stream = None
        self._prompt: list[int] | None = None
        self._delivered: list[int] = []
        self._held: list[pb.GenerateResponse] = []
        self._first_sent = False
        self._done = False
        self._all_streamed = False
        self._cancelled = False
        self._tried: set[str] = set()
        self._attempts = 0
        self._resumes = 0
        self._served: list[str] = []
        self._attempt_messages = 0  # messages the current attempt has sent (the stall limit applies after the first)
        self._cut: str | None = None  # why the current attempt was cut by the router (its replica was ejected)
        self._deadline: asyncio.Timeout | None = None  # of the read in progress: a cut expires it at once
        self._attempt_tokens = 0  # tokens the current attempt sent (handed on or held)
        self._attempt_resumed = 0  # tokens the current attempt was sent as already generated
        self._attempt_device: float | None = None  # device-seconds a failing attempt reported (a drain's last word)
        self._cut_attempts: list[tuple[_Member, int, float | None]] = []  # (replica, tokens sent, reported seconds)
        self.replica: str | None = None
        """The replica(s) that served this stream, "a>b" after a failover (None before any)."""
        self.device_seconds_by_replica: dict[str, float] = {}
        """Once the stream has finished (or been given up with a 503): the device-seconds each replica spent on it,
        the cut attempts' included (their sum is the final message's `usage.device_seconds`; see
        `_count_device_seconds`). A ledger can price each replica's share at its own price from it."""

    def __aiter__(self) -> RoutedGeneration:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        while True:
            if self._done or self._cancelled:
                raise StopAsyncIteration
            if self._all_streamed:  # every token was streamed before the cut; only the finish message was lost
                self._done = True
                return self._synthesized_end()
            if self._stream is None:
                await self._start()
            try:
                message = await self._read()
            except StopAsyncIteration:
                # the replica closed the stream without a finish message (not a meshserve server's way)
                self._end_attempt()
                self._done = True
                if self._held:
                    return self._deliver(self._held_out())
                raise
            except GateError as e:
                await self._failed(e, counted=self._cut is None)  # an ejection that cuts was counted already
                continue
            out = self._accept(message)
            if out is not None:
                return out

    def cancel(self) -> None:
        """Ends the stream on its replica (or leaves the queue); idempotent."""
        self._cancelled = True
        self._end_attempt()

    def cut(self, why: str) -> None:
        """Ends the current attempt as its replica's failure (the router ejected the replica as unresponsive): the
        read in progress, or the next one, raises a 503 that resumes the stream elsewhere (or retries it when no token
        was streamed yet), without counting another failure against the replica. A no-op between attempts."""
        if self._stream is None or self._cut is not None:
            return
        self._cut = why
        if self._deadline is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time())

    async def _read(self) -> pb.GenerateResponse:
        """The current attempt's next message. GateError 503 when the attempt was cut (`cut`) or, once under way,
        sent nothing for `RouterConfig.stall_timeout` seconds; the replica's own errors as they come."""
        name = self._member.name if self._member is not None else "the replica"
        if self._cut is None:
            limit = self._router.config.stall_timeout if self._attempt_messages else None
            try:
                async with asyncio.timeout(limit) as self._deadline:
                    message = await self._stream.__anext__()
                self._attempt_messages += 1
                return message
            except TimeoutError:
                if self._cut is None:
                    raise GateError(
                        503,
                        f"{name} sent nothing for {limit:g} s: stalled",
                        kind="server_error",
                        code="unavailable",
                    ) from None
            finally:
                self._deadline = None
        raise GateError(503, f"the stream was cut: {self._cut}", kind="server_error", code="unavailable")

    # ----- attempts -----

    def _route(self) -> RouteRequest:
        block = self._router.config.routing.block_size
        pages = [m.page_size for m in self._router._members.values() if m.page_size]
        if pages:
            block = pages[0]  # blocks are the engine's pages, whatever the config guessed
        ids = self._prompt or []
        return RouteRequest(
            key=self._key,
            region=self._region,
            priority=-self._request.priority,  # the engine runs lower first; the policies higher first
            prompt_tokens=len(ids),
            block_hashes=policy.block_hashes(ids, block),
        )

    async def _start(self) -> None:
        router = self._router
        await router.start()
        if self._prompt is None:
            try:
                self._prompt = await router.prompt_ids(self._request)
            except GateError as e:
                if classify(e) == CLIENT:
                    raise
                self._prompt = None  # route without affinity; a resume will ask again
        max_attempts = len(router._members) + router.config.max_resumes
        if self._attempts >= max_attempts:
            raise self._give_up(f"gave up after {self._attempts} attempts")
        exclude = frozenset(self._tried)
        try:
            member = await router._acquire(self._route(), exclude)
        except GateError as e:
            if self._first_sent:
                raise self._give_up(e.message) from None
            raise
        self._attempts += 1
        self._member = member
        self._served.append(member.name)
        self.replica = ">".join(self._served)
        self._cut, self._attempt_messages = None, 0
        self._attempt_tokens, self._attempt_resumed, self._attempt_device = 0, len(self._delivered), None
        self._stream = member.replica.generate(self._attempt_request())
        member.streams.add(self)

    def _attempt_request(self) -> pb.GenerateRequest:
        if not self._delivered:
            return self._request
        r = self._request
        resumed = pb.GenerateRequest(
            request_id=r.request_id,
            token_ids=pb.TokenIds(ids=[*self._prompt, *self._delivered]),
            priority=r.priority,
            resumed_tokens=len(self._delivered),
        )
        resumed.sampling.CopyFrom(r.sampling)
        return resumed

    def _end_attempt(self) -> None:
        if self._stream is not None:
            self._stream.cancel()  # a no-op after a normal end; otherwise the replica frees the slot
            self._stream = None
        if self._member is not None:
            member, self._member = self._member, None
            member.streams.discard(self)
            self._router._release(member)

    async def _failed(self, error: GateError, counted: bool = True) -> None:
        """The current attempt failed with `error`: raised to the consumer when it is the client's or final;
        otherwise the replica's failure (counted against it unless `counted` is False) and the stream is retried or
        resumed elsewhere by the next `_start`, or given up with a 503."""
        member = self._member
        kind = classify(error)
        if member is not None:  # the work it did happened (and costs money): counted into the final usage
            self._cut_attempts.append((member, self._attempt_tokens, self._attempt_device))
            if kind == BUSY:  # no new work there until a load report shows room (set before the release dispatches)
                member.view.full = True
            elif kind == DRAINING:  # no new work there; its next load report says draining too
                member.view.draining = True
        self._end_attempt()
        if kind in (CLIENT, FINAL) or self._cancelled:
            raise error
        router = self._router
        if kind == REPLICA and counted:
            router._failure(member, error.message)
        if kind == BUSY:
            # not an attempt that failed: the request waits for room anywhere, this replica included, and the wait
            # is the gateway queue's (bounded by its time limit), not a number of attempts
            self._attempts -= 1
        else:
            self._tried.add(member.name)
        self._held.clear()  # their tokens are generated again by the next replica
        if not self._first_sent:
            router._failovers["retry"] += 1
            router.metrics.failovers.labels(member.name, member.view.region, "retry").inc()
            log.info(
                "fleet: request %s failed on %s before any token: %s",
                self._request.request_id,
                member.name,
                error.message,
            )
            return
        reason = None
        s = self._request.sampling
        all_streamed = s.HasField("max_tokens") and len(self._delivered) >= s.max_tokens
        if self._resumes >= router.config.max_resumes:
            reason = f"resumed {self._resumes} times already"
        elif all_streamed and s.stop:
            # nothing is left to generate, so no replica can be asked for the end of the text, which the lost last
            # message may have carried (text held back while it might have begun a stop string)
            reason = "every token was streamed, but the end of the text held back for the stop strings was lost"
        else:
            try:
                self._prompt = self._prompt or await router.prompt_ids(self._request)
            except GateError as e:
                reason = f"cannot tokenize the prompt again ({e.message})"
        if reason is not None:
            router._failovers["failed"] += 1
            router.metrics.failovers.labels(member.name, member.view.region, "failed").inc()
            raise self._give_up(f"{member.name} failed ({error.message}); {reason}")
        self._resumes += 1
        router._failovers["resume"] += 1
        router.metrics.failovers.labels(member.name, member.view.region, "resume").inc()
        log.info(
            "fleet: resuming request %s after %d tokens (%s failed: %s)",
            self._request.request_id,
            len(self._delivered),
            member.name,
            error.message,
        )
        self._all_streamed = all_streamed

    def _give_up(self, why: str) -> GateError:
        self._count_device_seconds(pb.Usage(), None)  # what the attempts spent, for `device_seconds_by_replica`
        return GateError(
            503,
            f"the stream was cut after {len(self._delivered)} completed tokens and could not be resumed: {why}",
            kind="server_error",
            code="unavailable",
            retry_after=1.0,
        )

    def _synthesized_end(self) -> pb.GenerateResponse:
        self._end_attempt()
        usage = pb.Usage(prompt_tokens=len(self._prompt or ()), completion_tokens=len(self._delivered))
        self._count_device_seconds(usage, None)
        return pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH, usage=usage)

    def _count_device_seconds(self, usage: pb.Usage, member: _Member | None) -> None:
        """Makes `usage.device_seconds` (the finishing attempt's, on `member`; None: no attempt finished) the whole
        request's: plus every cut attempt's. A cut attempt's is what its replica reported when it ended the request
        (a drain timeout), else an estimate, since a replica that died or froze reports nothing: the tokens it sent
        times this request's own device-seconds per token on the replica that finished it, or, when that one
        generated none, the cut replica's rate over the attempts it finished (`_Member.device_rate`)."""
        by_replica: dict[str, float] = {}
        rate = None
        if member is not None:
            by_replica[member.name] = usage.device_seconds
            generated = usage.completion_tokens - self._attempt_resumed
            if generated > 0:
                rate = usage.device_seconds / generated
        for cut, tokens, reported in self._cut_attempts:
            if reported is None:
                reported = tokens * (rate if rate is not None else cut.device_rate())
            by_replica[cut.name] = by_replica.get(cut.name, 0.0) + reported
        self.device_seconds_by_replica = by_replica
        usage.device_seconds = sum(by_replica.values())

    # ----- messages -----

    def _accept(self, message: pb.GenerateResponse) -> pb.GenerateResponse | None:
        """The message to hand on (None: held back, or dropped)."""
        self._attempt_tokens += len(message.token_ids)
        if message.finish_reason in (pb.FINISH_REASON_CANCELLED, pb.FINISH_REASON_ERROR):
            if message.HasField("usage"):
                self._attempt_device = message.usage.device_seconds
            return None  # the replica ended the request (drain timeout, engine failure); its error status follows
        if self._first_sent:
            message.ClearField("request_id")  # the consumer already has the first message
            message.ClearField("prompt_tokens")
        if message.finish_reason == pb.FINISH_REASON_UNSPECIFIED and message.token_ids and not message.text:
            self._held.append(message)  # its text is incomplete: hand it on with the message that completes it
            return None
        self._held.append(message)
        out = self._deliver(self._held_out())
        if out.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self._finished(out)
        return out

    def _held_out(self) -> pb.GenerateResponse:
        out, self._held = _merge(self._held), []
        return out

    def _deliver(self, out: pb.GenerateResponse) -> pb.GenerateResponse:
        if not self._first_sent and self._member is not None:
            self._member.ejector.success(time.monotonic())
        self._first_sent = True
        self._delivered.extend(out.token_ids)
        return out

    def _finished(self, last: pb.GenerateResponse) -> None:
        member = self._member
        self._done = True
        if member is not None:
            router = self._router
            if self._prompt is not None:
                # the replica's prefix cache now holds the whole turn: the conversation's next turn starts with it
                block = member.page_size or router.config.routing.block_size
                blocks = policy.block_hashes([*self._prompt, *self._delivered], block)
                router.policy.observe(member.view, blocks, time.monotonic())
            if last.HasField("usage"):
                generated = last.usage.completion_tokens - self._attempt_resumed
                member.device_seconds += last.usage.device_seconds
                member.generated_tokens += max(generated, 0)
                self._count_device_seconds(last.usage, member)
                labels = (member.name, member.view.region)
                router.metrics.prompt_tokens.labels(*labels).inc(last.usage.prompt_tokens)
                router.metrics.cached_tokens.labels(*labels).inc(last.usage.cached_tokens)
                member.prompt_tokens += last.usage.prompt_tokens
                member.cached_tokens += last.usage.cached_tokens
        self._end_attempt()
