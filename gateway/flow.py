"""The request flow both front doors share, between the caller's principal and the replica's token stream:

  prepare (the gate's policy) -> check against the replica's limits -> count prompt tokens (in this process when the
  replica offers `count_tokens`, else its Tokenize) -> check the context -> admit (the gate's limits) -> `Run` on the
  replica -> finish(ticket, outcome), exactly once.

A `Run` owns an admitted request from admission to settlement. Its producer task reads the n choices' streams into a
queue the front door reads at its own pace, and settles the ticket when the last stream ends - normally, by an error,
or because the front door cancelled it (the client went away: every gRPC call is cancelled, so the engine frees the
slots). The producer is never cancelled itself, so `finish` runs whatever happens to the task that serves the client.
Gate methods are synchronous (they may hit a database) and run in worker threads, unless the gate answers from memory
(`gate_call`: its `*_nowait` methods run on the loop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from gateway.backend import Generation, Replica, client_region, route_key
from gateway.gate import REGION_RE, Gate, GateError, Outcome, PreparedRequest, Principal, Ticket
from protos.meshserve.v1 import meshserve_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""max_tokens when the request sets none, as the replica defaults it: min(this, context left)."""
MAX_N = 16
"""Most choices (n) per request."""
SEED_RANGE = 2**32
REGION_HEADER = "x-meshserve-region"
"""The HTTP header (and gRPC metadata key) in which a caller names its region: the fleet's replicas there serve it
first (a key's policy may pin another, see gateway/policy.py)."""

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_ERROR: "error",
}

_SAMPLING_FIELDS = frozenset(pb.SamplingOptions.DESCRIPTOR.fields_by_name)


def not_found_model(model: str) -> GateError:
    return GateError(
        404, f"The model `{model}` does not exist.", kind="invalid_request_error", param="model", code="model_not_found"
    )


async def gate_call(gate: Gate, method: str, *args: Any) -> Any:
    """`gate.<method>(*args)` without blocking the event loop: the gate's `<method>_nowait` on the loop when it has
    one and it can answer from memory (see gateway/gate.py), else the blocking method in a worker thread."""
    nowait = getattr(gate, f"{method}_nowait", None)
    if nowait is not None:
        result = nowait(*args)
        if result is not None:
            return result
    return await asyncio.to_thread(getattr(gate, method), *args)


# ----- checks before admission ----------------------------------------------------------------------------------


def region_of(value: str | None) -> str:
    """The region a caller's `x-meshserve-region` value names ("" when it sends none, or an empty one); GateError(400)
    naming the header for anything but a short token (REGION_RE)."""
    value = (value or "").strip()
    if value and not REGION_RE.fullmatch(value):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise GateError(
            400,
            f"{REGION_HEADER} must name a region: 1 to 64 of A-Z a-z 0-9 . _ -, got {shown!r}",
            param=REGION_HEADER,
        )
    return value


def check_sampling(prepared: PreparedRequest, info: pb.ModelInfo) -> None:
    """Raises GateError(400) naming the field and the limit when the sampling options cannot run on this replica."""
    s, limits = prepared.sampling, info.limits
    unknown = sorted(set(s) - _SAMPLING_FIELDS)
    if unknown:
        raise GateError(400, f"{unknown[0]} is not a sampling option of this server", param=unknown[0])

    def bad(field: str, message: str) -> GateError:
        return GateError(400, f"{field} {message}", param=field)

    if s.get("temperature") is not None and s["temperature"] < 0:
        raise bad("temperature", f"must be >= 0, got {s['temperature']}")
    if s.get("top_p") is not None and not 0 < s["top_p"] <= 1:
        raise bad("top_p", f"must be in (0, 1], got {s['top_p']}")
    if s.get("min_p") is not None and not 0 <= s["min_p"] <= 1:
        raise bad("min_p", f"must be in [0, 1], got {s['min_p']}")
    if s.get("top_k") is not None and not 0 <= s["top_k"] <= info.vocab_size:
        raise bad("top_k", f"must be in [0, {info.vocab_size}] (0 disables), got {s['top_k']}")
    if s.get("seed") is not None and not 0 <= s["seed"] < SEED_RANGE:
        raise bad("seed", f"must be in [0, 2**32), got {s['seed']}")
    if s.get("max_tokens") is not None and s["max_tokens"] < 1:
        raise bad("max_tokens", f"must be >= 1, got {s['max_tokens']}")
    stop = s.get("stop") or []
    if len(stop) > limits.max_stop_strings:
        raise bad("stop", f"has {len(stop)} strings; the limit is {limits.max_stop_strings}")
    for text in stop:
        if not 1 <= len(text) <= limits.max_stop_string_chars:
            raise bad("stop", f"strings must have 1 to {limits.max_stop_string_chars} characters, got {len(text)}")
    stop_ids = s.get("stop_token_ids") or []
    if len(stop_ids) > limits.max_stop_token_ids:
        raise bad("stop_token_ids", f"has {len(stop_ids)} ids; the limit is {limits.max_stop_token_ids}")
    if any(not 0 <= t < info.vocab_size for t in stop_ids):
        raise bad("stop_token_ids", f"ids must be in [0, {info.vocab_size})")
    if s.get("logprobs") is not None and not 0 <= s["logprobs"] <= limits.max_logprobs:
        raise bad("logprobs", f"must be in [0, {limits.max_logprobs}], got {s['logprobs']}")
    if prepared.messages is not None and len(prepared.messages) > limits.max_messages:
        raise bad("messages", f"has {len(prepared.messages)} messages; the limit is {limits.max_messages}")
    if not 1 <= prepared.n <= MAX_N:
        raise bad("n", f"must be in [1, {MAX_N}], got {prepared.n}")


def check_context(prepared: PreparedRequest, prompt_tokens: int, info: pb.ModelInfo) -> None:
    """Fills in the default max_tokens; raises GateError(400) when prompt + max_tokens exceeds the context."""
    context = info.context_length
    field = "messages" if prepared.messages is not None else "prompt"
    if prompt_tokens >= context:
        raise GateError(
            400,
            f"the prompt has {prompt_tokens} tokens but this model's context is {context} tokens (prompt + at least "
            "one generated token); shorten the prompt",
            param=field,
            code="context_length_exceeded",
        )
    max_tokens = prepared.sampling.get("max_tokens")
    if max_tokens is None:
        prepared.sampling["max_tokens"] = max(1, min(DEFAULT_MAX_TOKENS, context - prompt_tokens))
    elif prompt_tokens + max_tokens > context:
        raise GateError(
            400,
            f"the prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds this model's context of "
            f"{context} tokens; lower max_tokens to at most {context - prompt_tokens}",
            param="max_tokens",
            code="context_length_exceeded",
        )


# ----- proto builders ---------------------------------------------------------------------------------------------


def _chat(prepared: PreparedRequest) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m.role, content=m.content) for m in prepared.messages or ()])


def tokenize_request(prepared: PreparedRequest) -> pb.TokenizeRequest:
    """Tokenizes the prompt exactly as Generate will (the chat template; BOS for a text)."""
    if prepared.messages is not None:
        return pb.TokenizeRequest(chat=_chat(prepared))
    return pb.TokenizeRequest(text=prepared.prompt or "", add_special_tokens=True)


def generate_requests(prepared: PreparedRequest, request_id: str) -> list[pb.GenerateRequest]:
    """One GenerateRequest per choice. With n > 1 and a seed, choice i samples with seed + i (mod 2**32), so choice 0
    is what n = 1 gives; without a seed every choice draws its own."""
    requests = []
    for i in range(prepared.n):
        options = pb.SamplingOptions(**{k: v for k, v in prepared.sampling.items() if v is not None})
        if options.HasField("seed"):
            options.seed = (options.seed + i) % SEED_RANGE
        request = pb.GenerateRequest(
            request_id=request_id if prepared.n == 1 else f"{request_id}/{i}",
            sampling=options,
            # the gate's priority runs higher first; the engine's lower first
            priority=-prepared.priority,
        )
        if prepared.messages is not None:
            request.chat.CopyFrom(_chat(prepared))
        else:
            request.text = prepared.prompt or ""
        requests.append(request)
    return requests


# ----- the run ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChoiceState:
    """What one choice's stream has carried so far (for the outcome)."""

    completion_tokens: int = 0
    text: list[str] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    usage: pb.Usage | None = None
    timings: pb.Timings | None = None
    first_at: float | None = None
    replica: str | None = None  # the replica that served it, where the stream names one (a router's)
    device_seconds_by_replica: dict[str, float] | None = None  # the stream's own split, where it has one (a router's)

    def device_shares(self, default_replica: str) -> dict[str, float]:
        """This choice's device-seconds by replica: the stream's split (a router's, which also counts the attempts
        of a stream it gave up on), else all of the usage's on the replica that served it."""
        if self.device_seconds_by_replica:
            return self.device_seconds_by_replica
        if self.usage is None:
            return {}
        return {self.replica or default_replica: self.usage.device_seconds}


_END = object()


class Run:
    """An admitted request running on a replica; settles its ticket exactly once (see the module docstring)."""

    _active: ClassVar[set[asyncio.Task]] = set()  # every unsettled run's producer (a graceful stop waits for them)

    @classmethod
    async def wait_all(cls, timeout: float) -> bool:
        """Waits until every run of this event loop is settled; False on timeout."""
        loop = asyncio.get_running_loop()
        pending = [t for t in cls._active if t.get_loop() is loop]
        if not pending:
            return True
        _, still = await asyncio.wait(pending, timeout=timeout)
        return not still

    def __init__(
        self,
        gate: Gate,
        replica: Replica,
        ticket: Ticket,
        prompt_tokens: int,
        *,
        received_at: float,
        requests: list[pb.GenerateRequest] | None = None,
    ) -> None:
        """`received_at` (time.monotonic()) is when the front door got the request; `requests` default to
        `generate_requests(ticket.prepared, ticket.request_id)`."""
        self.gate, self.replica, self.ticket = gate, replica, ticket
        self.prompt_tokens = prompt_tokens
        self.received_at = received_at
        self.requests = requests or generate_requests(ticket.prepared, ticket.request_id)
        self.choices = [ChoiceState() for _ in self.requests]
        self.error: GateError | None = None
        self.outcome: Outcome | None = None
        self.cancelled = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._peeked: object | None = None
        self._tasks = [asyncio.create_task(self._read(i, r)) for i, r in enumerate(self.requests)]
        self.done = asyncio.get_running_loop().create_task(self._produce(), name=f"run-{ticket.request_id}")
        """Completes once the ticket is settled."""
        Run._active.add(self.done)
        self.done.add_done_callback(Run._active.discard)

    # ----- producer -----

    async def _read(self, index: int, request: pb.GenerateRequest) -> None:
        state = self.choices[index]
        stream: Generation | None = None
        try:
            stream = self.replica.generate(request)
            async for message in stream:
                if state.first_at is None:
                    state.first_at = time.monotonic()
                state.completion_tokens += len(message.token_ids)
                if self.ticket.prepared.log_content:
                    state.text.append(message.text)
                if message.finish_reason:
                    state.finish_reason = FINISH_REASONS.get(message.finish_reason, "error")
                    state.usage, state.timings = message.usage, message.timings
                self._queue.put_nowait((index, message))
        except GateError as e:
            self._fail(e)
        except Exception as e:  # a bug or a broken replica: fail this request, not the gateway
            log.exception("request %s: replica stream failed", self.ticket.request_id)
            self._fail(GateError(502, f"replica {self.replica.name} failed: {type(e).__name__}", kind="server_error"))
        finally:
            if stream is not None:
                state.replica = getattr(stream, "replica", None)
                state.device_seconds_by_replica = getattr(stream, "device_seconds_by_replica", None)
                stream.cancel()  # no-op after a normal end; otherwise the engine frees the slot

    def _fail(self, error: GateError) -> None:
        if self.error is None:
            self.error = error
            current = asyncio.current_task()
            for task in self._tasks:
                if task is not current:
                    task.cancel()

    async def _produce(self) -> None:
        try:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self.outcome = self._outcome()
            try:
                await gate_call(self.gate, "finish", self.ticket, self.outcome)
            except Exception:
                log.exception("request %s: gate.finish failed", self.ticket.request_id)
            self._queue.put_nowait(_END)

    def _outcome(self) -> Outcome:
        now = time.monotonic()
        if self.error is not None:
            reason = "error"
        elif self.cancelled:
            reason = "cancelled"
        elif any(c.finish_reason is None for c in self.choices):
            reason = "error"
        else:
            reasons = {c.finish_reason for c in self.choices}
            reason = next((r for r in ("error", "cancelled", "length") if r in reasons), "stop")
        firsts = [c.first_at for c in self.choices if c.first_at is not None]
        prepared = self.ticket.prepared
        prompt_text = completion_text = None
        if prepared.log_content:
            if prepared.messages is not None:
                prompt_text = json.dumps([dataclasses.asdict(m) for m in prepared.messages], ensure_ascii=False)
            else:
                prompt_text = prepared.prompt
            texts = ["".join(c.text) for c in self.choices]
            completion_text = texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False)
        shares = [c.device_shares(self.replica.name) for c in self.choices]
        by_replica: dict[str, float] = {}
        for share in shares:
            for name, seconds in share.items():
                by_replica[name] = by_replica.get(name, 0.0) + seconds
        return Outcome(
            replica=next((c.replica for c in self.choices if c.replica), None) or self.replica.name,
            prompt_tokens=sum(c.usage.prompt_tokens if c.usage else self.prompt_tokens for c in self.choices),
            cached_tokens=sum(c.usage.cached_tokens if c.usage else 0 for c in self.choices),
            completion_tokens=sum(c.completion_tokens for c in self.choices),
            queue_seconds=max((c.timings.queue_seconds for c in self.choices if c.timings), default=0.0),
            ttft_seconds=min(firsts) - self.received_at if firsts else 0.0,
            total_seconds=now - self.received_at,
            device_seconds=sum(sum(share.values()) for share in shares),
            finish_reason=reason,
            error=None if self.error is None else self.error.message,
            prompt_text=prompt_text,
            completion_text=completion_text,
            device_seconds_by_replica=by_replica if len(by_replica) > 1 else None,
        )

    # ----- consumer -----

    def cancel(self) -> None:
        """The client went away: ends every choice's stream on the replica (the outcome says `cancelled`). Idempotent;
        a no-op once every stream has ended."""
        if all(t.done() for t in self._tasks) or self.cancelled or self.error is not None:
            return
        self.cancelled = True
        for task in self._tasks:
            task.cancel()

    async def _get(self) -> object:
        if self._peeked is not None:
            item, self._peeked = self._peeked, None
            return item
        return await self._queue.get()

    async def wait_started(self) -> None:
        """Returns at the first message of any choice, or at the end; raises the run's GateError when it failed
        before producing anything (a refusal: the front door can still answer with the error's status)."""
        self._peeked = await self._get()
        if self._peeked is _END and self.error is not None:
            raise self.error

    async def events(self) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
        """(choice index, message) in arrival order; ends after the ticket is settled, raising the run's GateError
        when it failed."""
        while True:
            item = await self._get()
            if item is _END:
                self._peeked = _END  # stays ended
                if self.error is not None:
                    raise self.error
                return
            yield item  # type: ignore[misc]


async def admit(
    gate: Gate,
    replica: Replica,
    principal: Principal,
    request: PreparedRequest,
    *,
    served_model: str | None,
    received_at: float,
) -> Run:
    """prepare -> check -> count -> check the context -> admit -> start the run. Raises GateError for a refusal (the
    ticket, if one was admitted, is settled first). `served_model`: the name the request must resolve to (None: the
    front door has no model field)."""
    prepared = await gate_call(gate, "prepare", principal, request)
    if served_model is not None and prepared.model != served_model:
        raise not_found_model(prepared.model)
    info = await replica.model_info()
    check_sampling(prepared, info)
    counting = tokenize_request(prepared)
    count_tokens = getattr(replica, "count_tokens", None)  # a replica that counts without a round trip
    if count_tokens is not None:
        prompt_tokens = await count_tokens(counting)
    else:
        prompt_tokens = len((await replica.tokenize(counting)).token_ids)
    check_context(prepared, prompt_tokens, info)
    admit_nowait = getattr(gate, "admit_nowait", None)
    ticket = None if admit_nowait is None else admit_nowait(principal, prepared, prompt_tokens)
    if ticket is None:
        admitting = asyncio.ensure_future(asyncio.to_thread(gate.admit, principal, prepared, prompt_tokens))
        try:
            ticket = await asyncio.shield(admitting)
        except asyncio.CancelledError:
            # The caller went away (a gRPC deadline, a shutdown) while the gate admitted: settle what it admits.
            admitting.add_done_callback(lambda task: _settle_orphan(task, gate, replica.name, prompt_tokens))
            raise
    # routing hints for a router over several replicas (its generate() runs in the Run's tasks, which copy this
    # context); both are set on every request, so nothing carries over to the next one a task serves
    route_key.set(principal.key_id or "")
    client_region.set(prepared.region)  # after the policy, which may pin one
    try:
        return Run(gate, replica, ticket, prompt_tokens, received_at=received_at)
    except BaseException as e:
        outcome = Outcome(replica=replica.name, prompt_tokens=prompt_tokens, finish_reason="error", error=str(e))
        await gate_call(gate, "finish", ticket, outcome)
        raise


def _settle_orphan(admitting: asyncio.Future, gate: Gate, replica: str, prompt_tokens: int) -> None:
    if admitting.cancelled() or admitting.exception() is not None:
        return  # nothing was admitted
    outcome = Outcome(
        replica=replica, prompt_tokens=prompt_tokens, finish_reason="cancelled", error="cancelled during admission"
    )
    settling = asyncio.ensure_future(asyncio.to_thread(gate.finish, admitting.result(), outcome))
    Run._active.add(settling)
    settling.add_done_callback(Run._active.discard)
