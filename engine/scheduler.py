"""Continuous batching: a bounded priority queue of requests admitted into free slots as others finish.

The scheduler talks to the engine only through `engine.api.EngineLike`: it calls `open_prompt` / `prefill_batch` /
`insert` / `generate` / `release` (all in `Executor`) and reads the page counts it plans admission and preemption
with. `engine.engine.Engine` implements it on a model; `engine.mock_engine.MockEngine` without one, with tokens one
can compute by hand, which is what tests/test_scheduler_mock.py runs it against. To the outside the scheduler talks
only through `submit`, `cancel`, `step` and each request's output sink, so the offline batch job and the gRPC
service drive it the same way. It knows nothing of the network.

One `step()`:
1. decides (`plan`): which finished or cancelled slots to release, which waiting requests to admit into free slots -
   at most `prefills_per_step` of them, and only while the KV memory can reserve the pages each can ever need
   (prompt + max_tokens; the head of the queue waits rather than being overtaken);
2. executes the plan (`Executor.run`): release, then prefill - first the chunks of long prompts still being read,
   then the admitted prompts, packed a few per call - within the step's prefill token budget; a prompt whose
   tokens are all computed is inserted into its slot and its first token streamed at once;
3. runs one `generate` dispatch (`decode_steps` tokens for every active slot, fewer when no running request can use
   them all) and streams what it produced.

Policy and its trade-off: prefill is interleaved with decode dispatches, at most `prefill_token_budget` prompt tokens
between two of them while some slot decodes (a long prompt is read in chunks over several steps); raising it
admits a burst sooner (lower TTFT) at the cost of a longer pause for the requests already decoding (higher
inter-token latency); lowering it protects the running streams. With no slot decoding there is nothing to protect
and every admitted prompt is read at once. A dispatch cut short (its requests end sooner) carries a budget cut in
proportion, so the prompt tokens read per streamed token stay bounded. Neither starves: every step that has a
waiting request that fits and a free slot admits at least one, and every step with an active slot decodes.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

from engine.api import EngineLike, Prefix, StepOutput, TokenLogprobs
from engine.sampling import SamplingParams
from engine.text import IncrementalDetokenizer, StopStringMatcher
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; retry later."""


@dataclasses.dataclass
class RequestOutput:
    """A piece of one request's stream: new tokens and text; the last piece has `finished` set."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose K/V came from cached pages (either tier) instead of being computed."""
    host_cached_tokens: int = 0
    """Of cached_tokens, those restored from the host-memory tier."""
    queue_time: float | None = None
    """Seconds from arrival to the start of prefill."""
    ttft: float | None = None
    """Seconds from arrival to the first token."""
    device_seconds: float = 0.0
    """The request's share of the engine calls it took part in: each prefill call split by the prompt tokens each
    request computed in it, each decode dispatch by the tokens each slot produced (what a ledger bills; the shares of
    all requests add up to the engine's busy time)."""


Sink = Callable[[RequestOutput], None]


@dataclasses.dataclass
class Request:
    """One generation request, as the scheduler tracks it."""

    request_id: str
    prompt_tokens: list[int]
    params: SamplingParams
    sink: Sink
    priority: int = 0
    """Lower runs first (as in vLLM); ties keep arrival order."""
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    seed: int = 0
    slot: int | None = None
    cached_tokens: int = 0
    host_cached_tokens: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    stops: StopStringMatcher | None = None
    admitted_at: float | None = None
    first_token_at: float | None = None
    device_seconds: float = 0.0
    cancelled: bool = False
    finished: bool = False
    preempted: bool = False  # released to free memory; waits to resume (prompt + generated so far)
    preemptions: int = 0


@dataclasses.dataclass(frozen=True)
class Admission:
    """One admission decision: everything every process needs to run the same prefill + insert."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    params: SamplingParams
    seed: int
    slot: int
    generated: int = 0  # a resumed request: its last `generated` prompt tokens are its own earlier output


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The host decisions of one step (replayed as is by follower processes in multi-host serving)."""

    release: tuple[int, ...]
    admit: tuple[Admission, ...]
    decode: bool
    decode_steps: int | None = None  # tokens per slot in this dispatch (None: the engine's decode_steps)
    prefill_budget: int | None = None  # most prompt tokens computed in this step (None: every admitted prompt whole)


@dataclasses.dataclass
class StepResult:
    """What one plan's engine calls produced, by request id."""

    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # admissions the engine refused, and why
    first: dict[str, Prefix] = dataclasses.field(default_factory=dict)  # prompts completed: their first token
    prefill_failed: tuple[tuple[str, ...], str] | None = None  # the requests a failed prefill took down, and why
    decoded: StepOutput | None = None
    decode_failed: str | None = None  # the dispatch failed: the engine was reset, every request in it is lost
    prefill_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # each request's share of prefill
    decode_seconds: float = 0.0  # the decode dispatch's wall time
    busy_seconds: float = 0.0  # wall time of this step's engine calls (prefill and decode)


class Executor:
    """Runs plans' engine calls, in order; the one place that does, for the leader's scheduler and for multi-host
    followers (which replay the leader's plans), so both sides make the same calls and keep the same pages.

    Holds the prompts still being read in chunks (admitted, slot taken, not yet inserted)."""

    def __init__(self, engine: EngineLike) -> None:
        self.engine = engine
        self.reading: list[tuple[Admission, Prefix]] = []

    def run(self, plan: StepPlan) -> StepResult:
        """Every engine call of the plan: releases and prefill (`prefill`), then the decode dispatch (`decode`)."""
        result = self.prefill(plan)
        self.decode(plan, result)
        return result

    def prefill(self, plan: StepPlan) -> StepResult:
        """The plan's releases, admissions and prefill calls (the leader streams first tokens before decoding)."""
        engine, result = self.engine, StepResult()
        released = set(plan.release)
        for _, prefix in [r for r in self.reading if r[0].slot in released]:
            engine.discard(prefix)
        self.reading = [r for r in self.reading if r[0].slot not in released]
        for slot in plan.release:
            engine.release(slot)
        for adm in plan.admit:
            try:
                prefix = engine.open_prompt(adm.prompt_tokens, adm.params, adm.seed, adm.generated)
                self.reading.append((adm, prefix))
            except ValueError as exc:  # CapacityError included
                result.refused[adm.request_id] = str(exc)
        if self.reading:
            before = [p.computed - p.cached for _, p in self.reading]
            start = time.perf_counter()
            try:
                engine.prefill_batch([p for _, p in self.reading], plan.prefill_budget)
                seconds = time.perf_counter() - start
                self._share_prefill(result, before, seconds)
                result.busy_seconds += seconds
            except Exception as exc:  # an engine failure fails these requests only (their pages were given back)
                log.exception("prefill failed for %s", ", ".join(a.request_id for a, _ in self.reading))
                result.prefill_failed = (tuple(a.request_id for a, _ in self.reading), str(exc))
                self.reading = []
            for adm, prefix in [r for r in self.reading if r[1].done]:
                if not prefix.finished:
                    engine.insert(prefix, adm.slot)
                result.first[adm.request_id] = prefix
            self.reading = [r for r in self.reading if not r[1].done]
        return result

    def _share_prefill(self, result: StepResult, before: list[int], seconds: float) -> None:
        """Splits a prefill's wall time over its requests by the prompt tokens each computed in it."""
        done = [p.computed - p.cached - b for (_, p), b in zip(self.reading, before, strict=True)]
        total = sum(done)
        for (adm, _), n in zip(self.reading, done, strict=True):
            share = n / total if total else 1 / len(done)
            result.prefill_seconds[adm.request_id] = seconds * share

    def decode(self, plan: StepPlan, result: StepResult) -> None:
        """The plan's decode dispatch, if any slot decodes; its output (or failure) goes into `result`."""
        engine = self.engine
        if plan.decode and any(engine.slot_active(s) for s in range(engine.config.num_slots)):
            start = time.perf_counter()
            try:
                result.decoded = engine.generate(plan.decode_steps)
                result.decode_seconds = time.perf_counter() - start
                result.busy_seconds += result.decode_seconds
            except Exception as exc:
                log.exception("decode dispatch failed; resetting the engine (every request in it fails)")
                result.decode_failed = str(exc)
                self.reading = []
                engine.reset()


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics and load reports."""

    slots_total: int
    slots_used: int
    waiting: int
    kv_tokens_used: int
    kv_tokens_capacity: int
    steps: int
    last_dispatch_seconds: float
    last_dispatch_tokens: int
    last_window: int
    prefix_cache_queried_tokens: int = 0
    """Prompt tokens prefilled since start-up (cumulative)."""
    prefix_cache_hit_tokens: int = 0
    """Of those, tokens whose K/V came from cached pages instead of being computed (cumulative)."""
    kv_pages_total: int = 0
    """Pages a sequence can use (the sink excluded)."""
    kv_pages_used: int = 0
    """Pages running requests hold."""
    kv_pages_cached: int = 0
    """Pages only the prefix index holds (evictable)."""
    kv_pages_free: int = 0
    kv_pages_reserved: int = 0
    """Pages admitted requests may still take."""
    kv_evictions: int = 0
    """Cached pages reclaimed for new sequences (cumulative)."""
    prefilling: int = 0
    """Admitted prompts still being read in chunks."""
    preemptions: int = 0
    """Running requests preempted to free KV memory (cumulative; admission 'grow')."""
    busy_seconds: float = 0.0
    """Wall time of the engine's prefill and decode calls since start-up (cumulative): what the requests' device
    seconds add up to."""
    prefix_cache_host_hit_tokens: int = 0
    """Of prefix_cache_hit_tokens, those restored from the host tier (cumulative)."""
    kv_host_pages: int = 0
    """Pages the host tier holds."""
    kv_host_bytes: int = 0
    kv_host_capacity_bytes: int = 0
    kv_host_spilled_pages: int = 0
    """Pages copied from the device to the host tier (cumulative)."""
    kv_host_restored_pages: int = 0
    """Pages copied back to the device on a hit (cumulative)."""


class Scheduler:
    """Owns the slot table and the queue (the engine owns the device state); `step()` must be called from one thread
    only."""

    def __init__(
        self,
        engine: EngineLike,
        tokenizer: Tokenizer,
        *,
        max_waiting: int | None = None,
        prefills_per_step: int = 64,
        free_slot_decode_steps: int | None = None,
        prefill_token_budget: int | None = None,
        plan_hook: Callable[[StepPlan], StepPlan] | None = None,
    ) -> None:
        """`plan_hook` sees every plan before it runs (multi-host: the leader broadcasts it to the followers).

        `free_slot_decode_steps`: dispatch length while some slot is free, so that a request arriving during a
        dispatch waits at most that many decode steps for its prefill (a server's TTFT); None keeps every dispatch
        at the engine's `decode_steps` (an offline job, whose requests are all queued from the start).

        `prefill_token_budget`: most prompt tokens read between two decode dispatches while some slot decodes (a
        server's inter-token latency); None reads every admitted prompt at once (an offline job: throughput first)."""
        if prefills_per_step < 1:
            raise ValueError(f"prefills_per_step must be >= 1, got {prefills_per_step}")
        if free_slot_decode_steps is not None and not 1 <= free_slot_decode_steps <= engine.config.decode_steps:
            raise ValueError(
                f"free_slot_decode_steps must be in [1, {engine.config.decode_steps}] (decode_steps), "
                f"got {free_slot_decode_steps}"
            )
        if prefill_token_budget is not None and prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget must be >= 1, got {prefill_token_budget}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_waiting = max_waiting
        self.prefills_per_step = prefills_per_step
        self.free_slot_decode_steps = free_slot_decode_steps
        self.prefill_token_budget = prefill_token_budget
        self.plan_hook = plan_hook
        engine.reset()
        self.executor = Executor(engine)
        self._lock = threading.Lock()
        self._waiting: list[tuple[int, int, Request]] = []
        self._counter = itertools.count()
        self._by_id: dict[str, Request] = {}
        self._slots: list[Request | None] = [None] * engine.config.num_slots
        self._pending_release: set[int] = set()
        self._rng = random.Random()
        self._steps = 0
        self._preemptions = 0
        self._busy_seconds = 0.0
        self._last_dispatch = (0.0, 0, 0)

    # ----- called from any thread -------------------------------------------------------------------------------

    def validate(self, prompt_tokens: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError (CapacityError included) with a message naming the field and the limit."""
        self.engine.check_prompt(prompt_tokens, params)

    def submit(self, request: Request) -> None:
        """Queues a validated request; raises QueueFullError at the bound, ValueError for bad input.

        A request may arrive with `generated` already holding tokens: what an earlier attempt of it produced before
        its stream was cut (failover to this replica). It continues from there exactly as a preempted request resumes
        (the sampler's random stream goes on after them); they count toward max_tokens and are not streamed again.
        Their text is taken as streamed exactly as this scheduler would have streamed it: stop strings are matched
        over it too, so the text a stream held back because it might begin a stop string comes out here (or the
        stop string it began ends the request); if it already holds a whole stop string, the request ends at once
        with finish reason "stop" and nothing more."""
        self.validate(request.prompt_tokens, request.params)
        if request.generated:
            if len(request.generated) >= request.params.max_tokens:
                raise ValueError(
                    f"resumed_tokens is {len(request.generated)}; it must be below max_tokens "
                    f"({request.params.max_tokens}): nothing would be left to generate"
                )
            self.engine.check_prompt(
                [*request.prompt_tokens, *request.generated], dataclasses.replace(request.params, max_tokens=1)
            )
        with self._lock:
            if request.request_id in self._by_id:
                raise ValueError(f"request id {request.request_id!r} is already in flight; use a unique id")
            # a burst arriving between two steps may fill the free slots without counting against the queue bound
            free = sum(r is None for r in self._slots)
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting + free:
                raise QueueFullError(f"waiting queue is full ({self.max_waiting} requests)")
            if request.params.seed is None:
                request.seed = self._rng.getrandbits(32)
            else:
                request.seed = request.params.seed
            self._by_id[request.request_id] = request
            heapq.heappush(self._waiting, (request.priority, next(self._counter), request))

    def cancel(self, request_id: str) -> bool:
        """Marks a request cancelled; its slot is freed at the next step. False if it is unknown or done."""
        with self._lock:
            req = self._by_id.get(request_id)
            if req is None or req.finished:
                return False
            req.cancelled = True
            return True

    def has_work(self) -> bool:
        """Whether a request waits or runs, or a finished one's slot is still to be released (its pages cached)."""
        with self._lock:
            return bool(self._waiting) or any(r is not None for r in self._slots) or bool(self._pending_release)

    def stats(self) -> SchedulerStats:
        with self._lock:
            waiting = len(self._waiting)
        used = [i for i, r in enumerate(self._slots) if r is not None]
        lengths = self.engine.host_lengths
        e, pool = self.engine.config, self.engine.pool
        secs, toks, window = self._last_dispatch
        return SchedulerStats(
            slots_total=e.num_slots,
            slots_used=len(used),
            waiting=waiting,
            kv_tokens_used=int(sum(lengths[i] for i in used)),
            kv_tokens_capacity=pool.usable * e.page_size,
            steps=self._steps,
            last_dispatch_seconds=secs,
            last_dispatch_tokens=toks,
            last_window=window,
            prefix_cache_queried_tokens=self.engine.prefix_stats.prompt_tokens,
            prefix_cache_hit_tokens=self.engine.prefix_stats.hit_tokens,
            kv_pages_total=pool.usable,
            kv_pages_used=pool.used,
            kv_pages_cached=pool.cached,
            kv_pages_free=pool.free,
            kv_pages_reserved=pool.reserved,
            kv_evictions=pool.stats.evictions,
            prefilling=len(self.executor.reading),
            preemptions=self._preemptions,
            busy_seconds=self._busy_seconds,
            **self._host_stats(),
        )

    def _host_stats(self) -> dict[str, int]:
        host = self.engine.host
        if host is None:
            return {}
        return dict(
            prefix_cache_host_hit_tokens=self.engine.prefix_stats.host_hit_tokens,
            kv_host_pages=host.pages,
            kv_host_bytes=host.bytes,
            kv_host_capacity_bytes=host.capacity_pages * host.page_bytes,
            kv_host_spilled_pages=host.stats.spilled_pages,
            kv_host_restored_pages=host.stats.restored_pages,
        )

    # ----- the loop (one thread) --------------------------------------------------------------------------------

    def plan(self) -> StepPlan:
        """Decides this step's releases and admissions (host only; no engine call)."""
        release = sorted(self._pending_release)
        self._pending_release.clear()
        for slot, req in enumerate(self._slots):
            if req is not None and req.cancelled and slot not in release:
                release.append(slot)
        preempted = self._preempt(release)
        free = [s for s, r in enumerate(self._slots) if r is None or s in release]
        admit: list[Admission] = []
        # what the next dispatch's growth needs first (admission 'grow'), then a page of headroom per running slot
        # so that an admission does not preempt a running request at the very next step
        pages = self.engine.pool.available() + self._released_pages(release)
        if self.engine.config.admission == "grow":
            running = sum(r is not None and s not in release for s, r in enumerate(self._slots))
            pages = -self.engine.pages_short(releasing=release) - running
        with self._lock:
            cancelled_waiting = [r for _, _, r in self._waiting if r.cancelled]
            if cancelled_waiting:
                self._waiting = [e for e in self._waiting if not e[2].cancelled]
                heapq.heapify(self._waiting)
            while self._waiting and free and len(admit) < self.prefills_per_step and not preempted:
                req = self._waiting[0][2]
                prompt = [*req.prompt_tokens, *req.generated]
                max_tokens = req.params.max_tokens - len(req.generated)
                need = self.engine.pages_needed(len(prompt), max_tokens)
                if need > pages:
                    break  # the head waits for memory; nothing overtakes it
                heapq.heappop(self._waiting)
                pages -= need
                req.slot = free.pop(0)
                params = dataclasses.replace(req.params, max_tokens=max_tokens) if req.generated else req.params
                admit.append(Admission(req.request_id, tuple(prompt), params, req.seed, req.slot, len(req.generated)))
        for req in cancelled_waiting:
            self._finish(req, FINISH_CANCELLED)
        decoding = [
            r
            for s, r in enumerate(self._slots)
            if r is not None and not r.cancelled and s not in release and self.engine.slot_active(s)
        ]
        steps, budget = self._dispatch(decoding, free=bool(free))
        return StepPlan(
            release=tuple(release),
            admit=tuple(admit),
            decode=bool(decoding) or bool(admit) or bool(self.executor.reading),
            decode_steps=steps,
            prefill_budget=budget,
        )

    def _dispatch(self, decoding: Sequence[Request], *, free: bool) -> tuple[int | None, int | None]:
        """This step's dispatch length (None: the engine's decode_steps) and prefill token budget (None: no bound).

        - While a slot is free and no prompt is being read in chunks, dispatches are `free_slot_decode_steps` long:
          an arrival waits less for its prefill. While a long prompt is read they stay full length (an arrival is
          admitted into the same step as the next chunk anyway); short dispatches there were tried - W5 on the
          2-core CPU, ITL p50 234 -> 500 ms, the prompt's TTFT 49 -> 86 s - each chunk's fixed cost then paid once
          per decode step.
        - A dispatch runs no more steps than the running requests can still produce (the most `max_tokens` leaves
          any of them): the last tokens of a batch that ends together cost their own steps only.
        - The prefill budget shrinks with a dispatch cut short that way, so the prompt tokens read per token the
          streams receive stay bounded (the inter-token latency the budget protects: W5's streams got their last
          2 tokens after a full chunk, 531 ms per token against 65 ms)."""
        full = self.engine.config.decode_steps
        steps = self.free_slot_decode_steps if free and not self.executor.reading else None
        if not decoding:
            return steps, None
        left = max(r.params.max_tokens - len(r.generated) for r in decoding)
        planned = steps or full
        if left >= planned:
            return steps, self.prefill_token_budget
        left = max(left, 1)
        budget = self.prefill_token_budget
        if budget is not None:
            budget = max(1, -(-budget * left // planned))
        return left, budget

    def _preempt(self, release: list[int]) -> bool:
        """Admission 'grow': while the next dispatch's pages do not fit, releases the running request that yields
        first - the lowest priority (highest value), then the youngest - into `release` and marks it to resume
        (its pages stay cached; a resumed request recomputes only what was evicted from both tiers). One request
        alone always fits (start-up checks the pool holds a full-context request). Returns whether it preempted."""
        if self.engine.config.admission != "grow":
            return False
        preempted = False
        while self.engine.pages_short(releasing=release) > 0:
            running = [
                (r.priority, r.arrival, s)
                for s, r in enumerate(self._slots)
                if r is not None and s not in release and not r.finished and self.engine.slot_active(s)
            ]
            if len(running) <= 1:
                break
            _, _, slot = max(running)
            req = self._slots[slot]
            req.preempted, preempted = True, True
            req.preemptions += 1
            self._preemptions += 1
            release.append(slot)
            log.info("preempted %s (priority %d) to free KV pages", req.request_id, req.priority)
        return preempted

    def _released_pages(self, slots: Sequence[int]) -> int:
        """Pages the releases of this plan give back to what admission may reserve."""
        return sum(self.engine.pages_released_by(s) for s in slots)

    def step(self) -> StepPlan:
        """One iteration: release, admit (prefill + insert), one decode dispatch. Returns the plan it ran."""
        plan = self.plan()
        if self.plan_hook is not None:
            plan = self.plan_hook(plan)
        self.execute(plan)
        return plan

    def execute(self, plan: StepPlan) -> None:
        """Runs a plan's engine calls (through the Executor, as followers do) and streams what they produced."""
        for slot in plan.release:
            req = self._slots[slot]
            self._slots[slot] = None
            if req is not None and req.preempted and not req.finished and not req.cancelled:
                req.preempted, req.slot = False, None
                with self._lock:  # back to the queue, ahead of every request of its priority
                    heapq.heappush(self._waiting, (req.priority, -next(self._counter), req))
            elif req is not None and not req.finished:
                self._finish(req, FINISH_CANCELLED)
        for adm in plan.admit:
            with self._lock:
                req = self._by_id[adm.request_id]
            if req.admitted_at is None:  # (a resumed request keeps its first)
                req.admitted_at = time.monotonic()
            self._slots[adm.slot] = req
        result = self.executor.prefill(plan)
        for req in self._slots:
            if req is not None:
                req.device_seconds += result.prefill_seconds.get(req.request_id, 0.0)
        self._stream_prefills(plan, result)  # first tokens go out before the decode dispatch
        self.executor.decode(plan, result)
        self._busy_seconds += result.busy_seconds
        if result.decoded is not None:
            valid = result.decoded.valid.sum(axis=0)  # [B] tokens per slot
            self._last_dispatch = (result.decode_seconds, int(valid.sum()), self.engine.last_window)
            for slot, req in enumerate(self._slots):
                if req is not None and valid[slot]:
                    req.device_seconds += result.decode_seconds * float(valid[slot]) / float(valid.sum())
            self._stream_decode(result.decoded)
        if result.decode_failed is not None:
            for slot, req in enumerate(self._slots):
                self._slots[slot] = None
                if req is not None and not req.finished:
                    self._finish(req, FINISH_ERROR, error=f"engine failure during decode: {result.decode_failed}")
        self._steps += 1

    def _stream_prefills(self, plan: StepPlan, result: StepResult) -> None:
        for adm in plan.admit:
            if adm.request_id in result.refused:
                self._finish(self._slots[adm.slot], FINISH_ERROR, error=result.refused[adm.request_id])
        if result.prefill_failed is not None:
            ids, error = result.prefill_failed
            for req in self._slots:
                if req is not None and req.request_id in ids:
                    self._finish(req, FINISH_ERROR, error=f"engine failure during prefill: {error}")
        for req in self._slots:
            if req is None or req.request_id not in result.first:
                continue
            prefix = result.first[req.request_id]
            if req.detok is None:  # (a resumed request keeps its text state and its first reading's cache hits)
                req.cached_tokens = prefix.cached
                req.host_cached_tokens = prefix.host_cached
                req.detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_ids=req.prompt_tokens, skip_special_tokens=True
                )
                # tokens that came with the request were streamed by an earlier attempt: read them into the text
                # state without emitting, so the text goes on where that stream stopped (a character whose bytes
                # straddle the cut is completed here, as it would have been there)
                req.stops = StopStringMatcher(req.params.stop) if req.params.stop else None
                if req.stops is None:
                    req.detok.add(req.generated)
                elif req.generated:
                    # and into the stop-string matcher, one token at a time as `_feed_stops` fed that stream, so both
                    # end in the state that stream's had: what they let through is what it emitted; what they hold
                    # back (bytes of an unfinished character, text that may begin a stop string) it never emitted:
                    # that comes out here, or a stop string straddling the cut is found
                    self._feed_stops(req, req.generated, None)
                    if req.stops.stopped:
                        # a stop string was complete before the cut: that stream ended there; emit nothing again
                        self._finish(req, FINISH_STOP)
                        continue
            first = [prefix.logprobs] if prefix.logprobs else None
            self._emit(req, [prefix.token], first, device_done=prefix.finished)

    def _stream_decode(self, out: StepOutput) -> None:
        for slot, req in enumerate(self._slots):
            if req is None or req.finished or req.detok is None:
                continue
            mask = out.valid[:, slot]
            tokens = [int(t) for t in out.tokens[mask, slot]]
            if not tokens:
                continue
            lps = None
            if req.params.logprobs is not None:
                n = req.params.logprobs
                rows = [i for i in range(len(mask)) if mask[i]]
                lps = [
                    TokenLogprobs(
                        float(out.logprob[i, slot]),
                        tuple(
                            (int(a), float(b))
                            for a, b in zip(out.top_ids[i, slot, :n], out.top_logprobs[i, slot, :n], strict=True)
                        ),
                    )
                    for i in rows
                ]
            self._emit(req, tokens, lps, device_done=not bool(out.active[slot]))

    def _emit(self, req: Request, tokens: list[int], lps: list[TokenLogprobs] | None, *, device_done: bool) -> None:
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
        if req.cancelled:
            return  # released and reported as cancelled at the next step
        if req.stops is None:
            text, hit = req.detok.add(tokens), False
        else:
            text, hit, tokens, lps = self._feed_stops(req, tokens, lps)
        req.generated.extend(tokens)
        if hit:
            self._finish(req, FINISH_STOP, tokens=tokens, text=text, lps=lps)
            return
        if device_done:
            last = req.generated[-1]
            stop_ids = req.params.stop_ids(self.engine.model_config.eos_token_ids)
            tail = req.detok.flush()
            if req.stops is not None:
                held, hit = req.stops.feed(tail)
                tail = held if hit else held + req.stops.flush()
            reason = FINISH_STOP if last in stop_ids or hit else FINISH_LENGTH
            self._finish(req, reason, tokens=tokens, text=text + tail, lps=lps)
            return
        req.sink(
            RequestOutput(
                req.request_id, tokens, text, lps, prompt_tokens=len(req.prompt_tokens), cached_tokens=req.cached_tokens
            )
        )

    @staticmethod
    def _feed_stops(
        req: Request, tokens: list[int], lps: list[TokenLogprobs] | None
    ) -> tuple[str, bool, list[int], list[TokenLogprobs] | None]:
        """Feeds a dispatch's tokens to the stop-string matcher one at a time, so that a stop string ends the
        request at the token that completed it: the ids, logprobs and completion count after it (decoded in the same
        dispatch because the batch ran on) are dropped, whatever the load. Returns (text, hit, tokens, logprobs)."""
        text = []
        for i, token in enumerate(tokens):
            piece, hit = req.stops.feed(req.detok.add([token]))
            text.append(piece)
            if hit:
                return "".join(text), True, tokens[: i + 1], None if lps is None else lps[: i + 1]
        return "".join(text), False, tokens, lps

    def _finish(
        self,
        req: Request,
        reason: str,
        *,
        tokens: list[int] | None = None,
        text: str = "",
        lps: list[TokenLogprobs] | None = None,
        error: str | None = None,
    ) -> None:
        if req.finished:
            return
        req.finished = True
        if req.slot is not None and self._slots[req.slot] is req:
            # the slot is free for the next admission; the engine releases it (caching its pages, stopping the
            # device if it still decodes: a stop string seen on the host) in the next plan, so that every engine
            # call is in a plan
            self._pending_release.add(req.slot)
            self._slots[req.slot] = None
        with self._lock:
            self._by_id.pop(req.request_id, None)
        arrival = req.arrival
        req.sink(
            RequestOutput(
                req.request_id,
                tokens or [],
                text,
                lps,
                finished=True,
                finish_reason=reason,
                error=error,
                prompt_tokens=len(req.prompt_tokens),
                completion_tokens=len(req.generated),
                cached_tokens=req.cached_tokens,
                host_cached_tokens=req.host_cached_tokens,
                queue_time=None if req.admitted_at is None else req.admitted_at - arrival,
                ttft=None if req.first_token_at is None else req.first_token_at - arrival,
                device_seconds=req.device_seconds,
            )
        )

    def fail_all(self, error: str) -> None:
        """Ends every waiting and running request with finish reason "error" (the loop hit an unexpected failure);
        the slots are released by the next plan."""
        with self._lock:
            waiting = [r for _, _, r in self._waiting]
            self._waiting.clear()
        for req in waiting + [r for r in self._slots if r is not None]:
            self._finish(req, FINISH_ERROR, error=error)

    def run_until_idle(self, max_steps: int | None = None) -> None:
        """Steps until every submitted request has finished (offline jobs)."""
        n = 0
        while self.has_work():
            self.step()
            n += 1
            if max_steps is not None and n >= max_steps:
                raise RuntimeError(f"scheduler did not go idle within {max_steps} steps")
