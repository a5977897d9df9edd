"""One simulated meshserve replica: the engine scheduler's loop at dispatch granularity, timed by a step profile.

It mirrors engine/scheduler.py's policy (not its code: the engine's is written against a device) step by step:
1. admission: waiting requests, highest priority then oldest, take free slots while the KV pool can reserve every
   page each can ever need (prompt + max_tokens, less the cached pages its prompt starts with; the head of the queue
   waits for memory and nothing overtakes it), at most `prefills_per_step` per step;
2. prefill: the admitted prompts' uncached tokens, at most `prefill_token_budget` tokens per step while some slot
   decodes (a long prompt is read in chunks over several steps), all at once otherwise; prompts are packed into calls
   of at most `max_prefill_len` tokens, each call timed by the profile at its tokens and mean cached context; a
   prompt whose tokens are all computed streams its first token when the prefill ends;
3. one decode dispatch: `free_slot_decode_steps` steps while a slot is free, else `decode_steps`, for every decoding
   slot, timed by the profile at the active slot count and mean context; its tokens arrive when it ends.
Each step also pays the scheduler's own measured host time.

The KV memory is a pool of pages with a prefix cache keyed by the prompt's block hashes (`fleet.policy.block_hashes`,
blocks of one page): a prompt shares the cached pages of its longest cached opening (the last prompt token is always
computed), its computed prompt pages are indexed when its prefill completes, and a finished request's pages - prompt
and reply - stay cached until memory is needed, least recently used first (an opening is touched after its
continuations, so a prefix is never evicted before the pages that hang from it). The engine also reuses a partly
matching page (copy-on-write); the simulator counts only whole pages, so its hit rate is a lower bound.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence

from fleet.sim_profile import StepProfile


@dataclasses.dataclass
class SimRequest:
    """One request as the replica serves it, and what happened to it."""

    id: int
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    """Tokens the reply will have (<= max_tokens)."""
    block_hashes: tuple[int, ...] = ()
    """The prompt's full-block hash chain."""
    sequence_hashes: tuple[int, ...] = ()
    """The hash chain of prompt + reply (cached when the request ends)."""
    priority: int = 0
    """Higher first."""
    arrived: float = 0.0
    """When it reached the replica."""
    cached_tokens: int = 0
    first_token: float | None = None
    done: float | None = None
    generated: int = 0
    # the replica's bookkeeping
    computed: int = 0
    owned: int = 0
    held: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ReplicaStats:
    steps: int = 0
    busy_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    evictions: int = 0
    completed: int = 0


class SimReplica:
    """A replica's slots, waiting queue and KV pages; `submit` a request, and the replica calls `schedule(t, fn)`
    for its next step and `on_first_token` / `on_done` as requests progress."""

    def __init__(
        self,
        name: str,
        profile: StepProfile,
        schedule: Callable[[float, Callable[[float], None]], None],
        *,
        on_first_token: Callable[[SimRequest, float], None] = lambda r, t: None,
        on_done: Callable[[SimRequest, float], None] = lambda r, t: None,
        num_slots: int | None = None,
        kv_pages: int | None = None,
        prefill_token_budget: int | None = -1,
        prefills_per_step: int = 64,
    ) -> None:
        """`num_slots` / `kv_pages` default to the profile's engine; `prefill_token_budget` -1: the profile's."""
        self.name = name
        self.profile = profile
        self.schedule = schedule
        self.on_first_token = on_first_token
        self.on_done = on_done
        self.num_slots = num_slots or profile.num_slots
        self.total_pages = kv_pages or profile.kv_pages
        self.page = profile.page_size
        self.budget = profile.prefill_token_budget if prefill_token_budget == -1 else prefill_token_budget
        self.prefills_per_step = prefills_per_step
        self.waiting: list[tuple[int, int, SimRequest]] = []
        self.running: list[SimRequest] = []
        self.index: OrderedDict[int, int] = OrderedDict()
        """Cached pages: block hash -> requests holding it; least recently used first."""
        self.owned = 0
        """Pages running requests hold outside the index (reserved for positions they compute)."""
        self.stats = ReplicaStats()
        self._order = itertools.count()
        self._stepping = False

    # ----- what the router sees -------------------------------------------------------------------------------------

    @property
    def pages_used(self) -> int:
        return self.owned + sum(1 for refs in self.index.values() if refs > 0)

    @property
    def pages_cached(self) -> int:
        return sum(1 for refs in self.index.values() if refs == 0)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page)

    def fits_ever(self, request: SimRequest) -> bool:
        """Whether the request could run on an empty replica (else the engine refuses it at once)."""
        return (
            request.prompt_tokens + request.max_tokens <= self.profile.max_seq_len
            and self.pages_for(request.prompt_tokens + request.max_tokens) <= self.total_pages
        )

    # ----- requests -------------------------------------------------------------------------------------------------

    def submit(self, request: SimRequest, now: float) -> None:
        request.arrived = now
        heapq.heappush(self.waiting, (-request.priority, next(self._order), request))
        if not self._stepping:
            self._stepping = True
            self.schedule(now, self._step)

    def _leading(self, hashes: Sequence[int], limit: int) -> int:
        n = 0
        for h in hashes[:limit]:
            if h not in self.index:
                break
            n += 1
        return n

    def _evictable(self) -> int:
        return sum(1 for refs in self.index.values() if refs == 0)

    def _free(self) -> int:
        return self.total_pages - self.owned - len(self.index)

    def _make_free(self, pages: int) -> None:
        """Evicts least recently used unheld pages until `pages` are free."""
        if self._free() >= pages:
            return
        for h in [h for h, refs in self.index.items() if refs == 0]:
            del self.index[h]
            self.stats.evictions += 1
            if self._free() >= pages:
                return

    def _touch(self, hashes: Sequence[int]) -> None:
        for h in reversed(hashes):  # the opening last: most recently used, evicted after its continuations
            self.index.move_to_end(h)

    def _admit(self) -> None:
        free_slots = self.num_slots - len(self.running)
        admitted = 0
        while self.waiting and free_slots > 0 and admitted < self.prefills_per_step:
            req = self.waiting[0][2]
            hits = self._leading(req.block_hashes, (req.prompt_tokens - 1) // self.page)
            need = self.pages_for(req.prompt_tokens + req.max_tokens) - hits
            reusable = sum(1 for h in req.block_hashes[:hits] if self.index[h] == 0)
            if need > self._free() + self._evictable() - reusable:
                break  # the head waits for memory; nothing overtakes it
            heapq.heappop(self.waiting)
            for h in req.block_hashes[:hits]:
                self.index[h] += 1
            self._touch(req.block_hashes[:hits])
            req.held = list(req.block_hashes[:hits])
            self._make_free(need)
            self.owned += need
            req.owned = need
            req.cached_tokens = req.computed = hits * self.page
            self.stats.prompt_tokens += req.prompt_tokens
            self.stats.cached_tokens += req.cached_tokens
            self.running.append(req)
            free_slots -= 1
            admitted += 1

    def _index_blocks(self, req: SimRequest, hashes: Sequence[int], *, hold: bool) -> None:
        """Moves the request's pages for `hashes` (beyond those it holds) from its own into the index."""
        for h in hashes[len(req.held) :]:
            if h in self.index:
                if hold:
                    self.index[h] += 1
            else:
                self.index[h] = 1 if hold else 0
            if req.owned > 0:
                req.owned -= 1
                self.owned -= 1
            if hold:
                req.held.append(h)
        self._touch(hashes)

    def _prefill(self, decoding: bool) -> tuple[float, list[SimRequest]]:
        """Computes prompt tokens within the budget; returns (seconds, requests whose prompt is now complete)."""
        budget = self.budget if decoding and self.budget else None
        chunks: list[tuple[SimRequest, int]] = []
        spent = 0
        for req in self.running:
            if req.computed >= req.prompt_tokens:
                continue
            n = req.prompt_tokens - req.computed
            if budget is not None:
                n = min(n, budget - spent)
            if n <= 0:
                break
            chunks.append((req, n))
            spent += n
        seconds, call, call_tokens = 0.0, [], 0
        for req, n in chunks:  # pack into calls of at most max_prefill_len tokens, long prompts in several calls
            while n > 0:
                take = min(n, self.profile.max_prefill_len - call_tokens)
                call.append((req.computed, take))
                req.computed += take
                call_tokens += take
                n -= take
                if call_tokens >= self.profile.max_prefill_len:
                    seconds += self._call(call, call_tokens)
                    call, call_tokens = [], 0
        if call:
            seconds += self._call(call, call_tokens)
        complete = [r for r, _ in chunks if r.computed >= r.prompt_tokens]
        return seconds, complete

    def _call(self, rows: list[tuple[int, int]], tokens: int) -> float:
        context = sum(start * n for start, n in rows) / tokens
        return self.profile.prefill_call_seconds(tokens, context)

    def _step(self, now: float) -> None:
        """One scheduler step starting at `now`: admit, prefill, decode; schedules the next while there is work."""
        finished: list[SimRequest] = []
        decoding_before = any(r.first_token is not None for r in self.running)
        self._admit()
        free = len(self.running) < self.num_slots
        prefill_s, complete = self._prefill(decoding_before)
        t = now + self.profile.host_seconds_per_step + prefill_s
        for req in complete:
            full = req.prompt_tokens // self.page
            self._index_blocks(req, req.block_hashes[:full], hold=True)
            req.first_token = t
            req.generated = 1
            self.on_first_token(req, t)
            if req.generated >= req.output_tokens:
                finished.append(req)
        decoding = [r for r in self.running if r.first_token is not None and r not in finished]
        decode_s = 0.0
        if decoding:
            steps = self.profile.free_slot_decode_steps if free else self.profile.decode_steps
            context = sum(r.prompt_tokens + r.generated for r in decoding) / len(decoding)
            decode_s = self.profile.decode_seconds(len(decoding), context, steps)
            t += decode_s
            for req in decoding:
                k = min(steps, req.output_tokens - req.generated)
                req.generated += k
                if req.generated >= req.output_tokens:
                    finished.append(req)
        self.stats.steps += 1
        self.stats.busy_s += t - now
        self.stats.prefill_s += prefill_s
        self.stats.decode_s += decode_s
        self.schedule(t, lambda end: self._end_step(end, finished))

    def _end_step(self, now: float, finished: list[SimRequest]) -> None:
        for req in finished:
            self.running.remove(req)
            length = req.prompt_tokens + req.generated
            full = min(length // self.page, len(req.sequence_hashes))
            self._index_blocks(req, req.sequence_hashes[:full], hold=False)
            for h in req.held:
                self.index[h] -= 1
            self.owned -= req.owned
            req.owned, req.held = 0, []
            req.done = now
            self.stats.completed += 1
            self.stats.output_tokens += req.generated
            self.on_done(req, now)
        if self.running or self.waiting:
            self._step(now)
        else:
            self._stepping = False
