"""The MeshServe gRPC server: requests in, the scheduler's token stream out, with admission, health and drain.

Threading model:
- one **engine thread** (`EngineLoop`) warms the engine up, then calls `Scheduler.step()` in a loop - the only thread
  that touches the engine or the decode state. It sleeps on an event when there is no work.
- gRPC **handler threads** (one per open RPC, from a bounded pool) validate a request, `submit` it, and then read its
  outputs from a per-request queue that the scheduler's sink fills on the engine thread. A stream's writes and the
  client's pace never block the engine.
- a **watchdog thread** flips health to NOT_SERVING when the engine loop stops making progress (a step running, or
  steps failing, for longer than `stall_timeout`) and back to SERVING when it recovers.

Admission: requests join the scheduler's bounded waiting queue and enter free slots as they free up and as the KV
memory can reserve their pages; `prefill_token_budget` bounds the prompt tokens read between two decode dispatches
while requests decode (the TTFT / inter-token-latency knob, see `engine.scheduler`: long prompts are read in
chunks); while a slot is free, dispatches are `free_slot_decode_steps` long, so an arrival waits at most that many
decode steps for its prefill. A full queue answers RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms` in
trailing metadata.

Cancellation: every RPC registers a termination callback (client cancel, deadline, disconnect) that cancels its
request; the scheduler frees the slot at its next step, i.e. within one decode dispatch.

Drain: `drain()` refuses new requests with UNAVAILABLE, reports NOT_SERVING, lets accepted requests finish for up to
`drain_timeout` seconds, then ends the rest with a CANCELLED finish message and an UNAVAILABLE status.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.engine import Engine
from engine.sampling import MAX_LOGPROBS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams
from engine.scheduler import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    QueueFullError,
    Request,
    RequestOutput,
    Scheduler,
    StepPlan,
)
from engine.tokenizer import Tokenizer
from protos.meshserve.v1 import DRAINING_KEY, TRANSPORT_BYTES_FACTOR
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc
from service.metrics import DispatchCost, ServerMetrics, measure_memory_bandwidth

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MeshServe"].full_name
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailing metadata key of the retry hint (the key gRPC's own retry policy honours)."""

_FINISH = {FINISH_STOP: pb.FINISH_REASON_STOP, FINISH_LENGTH: pb.FINISH_REASON_LENGTH}
# How often a handler waiting for tokens re-checks that its client is still there and the server still running.
_POLL_SECONDS = 0.1


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything the service decides on top of the engine; `scripts/serve.py` maps its flags onto this."""

    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 keeps the server off the network unless asked."""
    port: int = 50051
    """gRPC port; 0 picks a free one (see `MeshServeServer.port`)."""
    metrics_port: int | None = None
    """Prometheus HTTP port; 0 picks a free one, None serves no endpoint (the registry still records)."""
    max_waiting: int = 256
    """Bound of the waiting queue; beyond it Generate answers RESOURCE_EXHAUSTED."""
    prefills_per_step: int = 64
    """Most prompts admitted between two decode dispatches (each also needs a free slot and KV pages)."""
    prefill_token_budget: int | None = 256
    """Most prompt tokens read between two decode dispatches while some request decodes: a long prompt is read in
    chunks of this many, so the running streams' inter-token latency stays bounded (higher lowers the long prompt's
    TTFT, lower protects the streams); None reads every admitted prompt at once."""
    free_slot_decode_steps: int | None = 1
    """Decode steps per dispatch while a slot is free: a request arriving mid-dispatch waits at most this many steps
    for its prefill (TTFT); dispatches are `decode_steps` long while every slot is busy. None: always `decode_steps`."""
    drain_timeout: float = 30.0
    """Seconds accepted requests may take to finish after a drain starts before they are ended."""
    stall_timeout: float = 60.0
    """Seconds without engine-loop progress before health reports NOT_SERVING."""
    memory_bandwidth_gbps: float | None = None
    """Memory bandwidth for the utilization gauge, GB/s; None measures it once at start-up."""
    max_messages: int = 256
    """Most chat messages per request."""
    max_input_chars: int | None = None
    """Most characters of prompt text per request (checked before tokenizing); None: 16 x the context length."""
    max_request_bytes: int = 4 << 20
    """Largest serialized request; a larger one is INVALID_ARGUMENT naming this limit. gRPC itself accepts up to
    `TRANSPORT_BYTES_FACTOR` (protos.meshserve.v1) times as much (past that its own RESOURCE_EXHAUSTED, which no
    retry fixes)."""
    max_workers: int | None = None
    """gRPC handler threads (one per open RPC); None: slots + max_waiting + 16, so every admissible stream fits."""


class EngineLoop:
    """The engine thread (warm-up, then `Scheduler.step()` while there is work) and its watchdog."""

    def __init__(
        self,
        scheduler: Scheduler,
        warmup: Callable[[], None],
        *,
        stall_timeout: float,
        on_ready: Callable[[], None],
        on_stall: Callable[[bool], None],
        on_step: Callable[[], None],
        on_error: Callable[[], None],
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        """`on_exit` runs on the engine thread after its last step (multi-host: tells the followers to stop)."""
        self.scheduler = scheduler
        self._on_exit = on_exit
        self._warmup = warmup
        self._stall_timeout = stall_timeout
        self._on_ready = on_ready
        self._on_stall = on_stall
        self._on_step = on_step
        self._on_error = on_error
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._last_progress = time.monotonic()
        self.stalled = False
        self._thread = threading.Thread(target=self._run, name="meshserve-engine", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="meshserve-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    def submit(self, request: Request) -> None:
        """Queues a request (raises as `Scheduler.submit` does) and wakes the engine thread."""
        self.scheduler.submit(request)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Cancels a request if it is still running; its slot is freed at the next step."""
        if self.scheduler.cancel(request_id):
            self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops both threads after the current step."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._watchdog.is_alive():
            self._watchdog.join(timeout)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def _serve(self) -> None:
        try:
            self._warmup()
        except Exception:
            log.exception("engine warm-up failed; the server stays NOT_SERVING")
            return
        self._last_progress = time.monotonic()
        self.ready.set()
        self._on_ready()
        while not self._stop.is_set():
            # Clear before looking, so a submit between the look and the wait still wakes us.
            self._wake.clear()
            if not self.scheduler.has_work():
                self._last_progress = time.monotonic()
                if self.scheduler.plan_hook is not None:
                    # multi-host: an empty plan every idle period keeps the followers' broadcast waits short
                    self.scheduler.step()
                self._wake.wait(0.5)
                continue
            try:
                self.scheduler.step()
            except Exception as exc:
                # The scheduler already fails the requests an engine call touched; anything escaping it is a bug in
                # the loop itself. End what is in flight (INTERNAL) rather than leave it hanging until its deadline,
                # keep serving, and let the watchdog judge whether steps keep failing.
                log.exception("scheduler step failed")
                self.scheduler.fail_all(f"scheduler step failed: {exc}")
                self._on_error()
                self._stop.wait(0.05)
                continue
            self._last_progress = time.monotonic()
            self._on_step()

    def _watch(self) -> None:
        period = max(min(self._stall_timeout / 4, 1.0), 0.01)
        while not self._stop.wait(period):
            if not self.ready.is_set():
                continue
            stalled = not self._thread.is_alive() or time.monotonic() - self._last_progress > self._stall_timeout
            if stalled != self.stalled:
                self.stalled = stalled
                if stalled:
                    log.error("engine loop made no progress for %.1f s; reporting NOT_SERVING", self._stall_timeout)
                else:
                    log.warning("engine loop is making progress again; reporting SERVING")
                self._on_stall(stalled)


class _Stream:
    """One Generate RPC's side of the bridge: the sink the scheduler calls, and what drain needs to end it."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.outputs: queue.SimpleQueue[tuple[float, RequestOutput]] = queue.SimpleQueue()
        self.arrival = time.monotonic()
        self.ended_by_drain = False
        self.drain_deadline = float("inf")

    def sink(self, output: RequestOutput) -> None:
        # Called on the engine thread: only a timestamp and a put, never anything that could block it.
        self.outputs.put((time.monotonic(), output))


class _InvalidRequest(ValueError):
    """A request the service refuses before the scheduler sees it (INVALID_ARGUMENT)."""


class MeshServeService(pb_grpc.MeshServeServicer):
    """The MeshServe RPCs over one scheduler; the server (`MeshServeServer`) owns its lifecycle."""

    def __init__(self, loop: EngineLoop, tokenizer: Tokenizer, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.loop = loop
        self.scheduler = loop.scheduler
        self.engine: Engine = loop.scheduler.engine
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics
        e = self.engine.config
        self.max_input_chars = config.max_input_chars or 16 * e.max_seq_len
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self.draining = False
        # Mean request latency (exponential average) feeds the retry hint of a full queue.
        self._latency_ema = 1.0

    # ----- input ------------------------------------------------------------------------------------------------

    def _chat(self, chat: pb.ChatMessages) -> list[int]:
        messages = chat.messages
        if not messages:
            raise _InvalidRequest("chat.messages is empty; send at least one message")
        if len(messages) > self.config.max_messages:
            raise _InvalidRequest(
                f"chat.messages has {len(messages)} messages; the limit is {self.config.max_messages}"
            )
        total = 0
        for i, m in enumerate(messages):
            total += len(m.content)
            if total > self.max_input_chars:
                raise _InvalidRequest(
                    f"chat.messages[{i}].content brings the conversation to {total} characters; the limit is "
                    f"{self.max_input_chars} (max_input_chars)"
                )
        try:
            return self.tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in messages])
        except ValueError as e:
            raise _InvalidRequest(f"chat.{e}") from e

    def _text(self, text: str, add_special_tokens: bool) -> list[int]:
        if not text:
            raise _InvalidRequest("text is empty; send a non-empty prompt")
        if len(text) > self.max_input_chars:
            raise _InvalidRequest(
                f"text has {len(text)} characters; the limit is {self.max_input_chars} (max_input_chars)"
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _prompt(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind is None:
            raise _InvalidRequest("input is empty: set one of text, token_ids or chat")
        if kind == "text":
            return self._text(request.text, add_special_tokens=True)
        if kind == "chat":
            return self._chat(request.chat)
        ids = list(request.token_ids.ids)
        if not ids:
            raise _InvalidRequest("token_ids.ids is empty; send at least one token id")
        return ids

    @staticmethod
    def _resumed(request: pb.GenerateRequest, input_len: int) -> int:
        r = request.resumed_tokens
        if r == 0:
            return 0
        if request.WhichOneof("input") != "token_ids":
            raise _InvalidRequest("resumed_tokens needs the prompt as token_ids (the prompt + the tokens resumed)")
        if not 0 < r < input_len:
            raise _InvalidRequest(f"resumed_tokens is {r}; it must be in [0, {input_len - 1}] (len(token_ids) - 1)")
        return r

    def _params(self, options: pb.SamplingOptions, prompt_len: int) -> SamplingParams:
        defaults = SamplingParams()
        context_left = self.engine.config.max_seq_len - prompt_len
        return SamplingParams(
            temperature=options.temperature if options.HasField("temperature") else defaults.temperature,
            top_k=options.top_k if options.HasField("top_k") else defaults.top_k,
            top_p=options.top_p if options.HasField("top_p") else defaults.top_p,
            min_p=options.min_p if options.HasField("min_p") else defaults.min_p,
            seed=options.seed if options.HasField("seed") else None,
            max_tokens=(
                options.max_tokens if options.HasField("max_tokens") else max(1, min(defaults.max_tokens, context_left))
            ),
            stop=tuple(options.stop),
            stop_token_ids=tuple(options.stop_token_ids),
            ignore_eos=options.ignore_eos,
            logprobs=options.logprobs if options.HasField("logprobs") else None,
        )

    # ----- RPCs -------------------------------------------------------------------------------------------------

    def _reject(self, context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
        self.metrics.rejected.labels(code=code.name).inc()
        context.abort(code, details)

    def _check_size(self, request, context: grpc.ServicerContext) -> None:
        size = request.ByteSize()
        if size > self.config.max_request_bytes:
            self._reject(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is {size} bytes; the limit is {self.config.max_request_bytes} (max_request_bytes)",
            )

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        """Streams one completion; see the proto for the message sequence and the status codes."""
        self._check_size(request, context)
        if not self.loop.ready.is_set():
            self._reject(context, grpc.StatusCode.UNAVAILABLE, "server is warming up (compiling); retry shortly")
        try:
            prompt = self._prompt(request)
            resumed = self._resumed(request, len(prompt))
            prompt, earlier = prompt[: len(prompt) - resumed], prompt[len(prompt) - resumed :]
            params = self._params(request.sampling, len(prompt))  # (the scheduler validates both on submit)
        except ValueError as e:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        client_id = request.request_id or uuid.uuid4().hex
        # Clients may reuse ids; the scheduler's id must be unique, the client's is only echoed.
        stream = _Stream(f"{client_id}#{next(self._ids)}")
        with self._lock:
            if self.draining:
                context.set_trailing_metadata(((DRAINING_KEY, "1"),))
                self._reject(context, grpc.StatusCode.UNAVAILABLE, "server is draining for shutdown; retry elsewhere")
            scheduled = Request(
                stream.request_id, prompt, params, stream.sink, priority=request.priority, generated=earlier
            )
            stream.arrival = scheduled.arrival
            try:
                self.loop.submit(scheduled)
            except QueueFullError as e:
                context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(self._retry_hint_ms())),))
                self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry later")
            except ValueError as e:
                self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            self._streams[stream.request_id] = stream
        if not context.add_callback(lambda: self.loop.cancel(stream.request_id)):
            self.loop.cancel(stream.request_id)  # the RPC already ended before the callback could be registered
        try:
            yield from self._relay(stream, client_id, len(prompt), context)
        finally:
            with self._lock:
                self._streams.pop(stream.request_id, None)

    def _relay(
        self, stream: _Stream, client_id: str, prompt_len: int, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        first = True
        last_at: float | None = None
        while True:
            try:
                at, out = stream.outputs.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if stream.ended_by_drain and time.monotonic() > stream.drain_deadline:
                    # the engine did not confirm the cancellation in time (stuck?): end the stream anyway
                    context.abort(grpc.StatusCode.UNAVAILABLE, "server shut down before the request finished")
                if not context.is_active():
                    return
                continue
            msg = pb.GenerateResponse(text=out.text, token_ids=out.token_ids)
            if first:
                msg.request_id, msg.prompt_tokens, first = client_id, prompt_len, False
            if out.logprobs:
                for token, lp in zip(out.token_ids, out.logprobs, strict=True):
                    msg.logprobs.add(
                        token_id=token,
                        logprob=lp.logprob,
                        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
                    )
            self.metrics.tokens_streamed(len(out.token_ids), None if last_at is None else at - last_at)
            last_at = at
            if not out.finished:
                yield msg
                continue
            total = at - stream.arrival
            self._latency_ema = 0.9 * self._latency_ema + 0.1 * total
            self.metrics.request_finished(
                out.finish_reason,
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                e2e=total,
                queue_time=out.queue_time,
                ttft=out.ttft,
            )
            msg.usage.CopyFrom(
                pb.Usage(
                    prompt_tokens=out.prompt_tokens,
                    completion_tokens=out.completion_tokens,
                    cached_tokens=out.cached_tokens,
                    device_seconds=out.device_seconds,
                    host_cached_tokens=out.host_cached_tokens,
                )
            )
            msg.timings.CopyFrom(
                pb.Timings(queue_seconds=out.queue_time or 0.0, ttft_seconds=out.ttft or 0.0, total_seconds=total)
            )
            if out.finish_reason in _FINISH:
                msg.finish_reason = _FINISH[out.finish_reason]
                yield msg
                return
            if out.finish_reason == FINISH_ERROR:
                msg.finish_reason = pb.FINISH_REASON_ERROR
                yield msg
                context.abort(grpc.StatusCode.INTERNAL, out.error or "engine failure")
            if out.finish_reason == FINISH_CANCELLED and stream.ended_by_drain:
                msg.finish_reason = pb.FINISH_REASON_CANCELLED
                yield msg
                context.set_trailing_metadata(((DRAINING_KEY, "1"),))
                context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"server shut down: the request did not finish within the drain timeout of "
                    f"{self.config.drain_timeout:g} s",
                )
            return  # cancelled by the client, who is no longer listening

    def _retry_hint_ms(self) -> int:
        # Roughly when a waiting request will have taken a slot: a queue's worth of requests over the slots.
        slots = self.engine.config.num_slots
        waiting = self.scheduler.stats().waiting
        seconds = self._latency_ema * max(waiting, 1) / slots
        return int(min(max(seconds, 0.1), 30.0) * 1000)

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        """Token ids (and each token's text) of a text or a chat, as Generate would see them."""
        self._check_size(request, context)
        kind = request.WhichOneof("input")
        try:
            if kind is None:
                raise _InvalidRequest("input is empty: set one of text or chat")
            ids = self._text(request.text, request.add_special_tokens) if kind == "text" else self._chat(request.chat)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=ids, tokens=[self.tokenizer.decode([t]) for t in ids])

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        """The model, its context and the engine's static shapes."""
        e, m = self.engine.config, self.engine.model_config
        mesh = self.engine.mesh
        return pb.ModelInfo(
            model_name=m.name,
            vocab_size=m.vocab_size,
            context_length=e.max_seq_len,
            num_slots=e.num_slots,
            dtype=str(e.dtype),
            mesh=[pb.MeshAxis(name=str(n), size=int(s)) for n, s in mesh.shape.items()],
            platform=mesh.devices.flat[0].platform,
            prefill_buckets=list(e.prefill_buckets),
            decode_steps=e.decode_steps,
            eos_token_ids=list(m.eos_token_ids),
            limits=pb.Limits(
                max_stop_strings=MAX_STOP_STRINGS,
                max_stop_string_chars=MAX_STOP_STRING_CHARS,
                max_logprobs=MAX_LOGPROBS,
                max_messages=self.config.max_messages,
                max_input_chars=self.max_input_chars,
                max_prompt_tokens=e.max_seq_len - 1,
                max_stop_token_ids=MAX_STOP_TOKEN_IDS - 1,
                max_request_bytes=self.config.max_request_bytes,
            ),
            max_waiting=self.config.max_waiting,
        )

    def GetLoad(self, request: pb.GetLoadRequest, context: grpc.ServicerContext) -> pb.Load:
        """Free slots, waiting requests and KV cache use right now."""
        s = self.scheduler.stats()
        return pb.Load(
            slots_total=s.slots_total,
            slots_used=s.slots_used,
            free_slots=s.slots_total - s.slots_used,
            waiting_requests=s.waiting,
            max_waiting=self.config.max_waiting,
            kv_tokens_used=s.kv_tokens_used,
            kv_tokens_capacity=s.kv_tokens_capacity,
            draining=self.draining,
            kv_pages_total=s.kv_pages_total,
            kv_pages_used=s.kv_pages_used,
            kv_pages_cached=s.kv_pages_cached,
            kv_pages_free=s.kv_pages_free,
            kv_pages_reserved=s.kv_pages_reserved,
            kv_page_size=self.engine.config.page_size,
            prefilling_requests=s.prefilling,
            kv_host_pages=s.kv_host_pages,
            kv_host_pages_capacity=s.kv_host_capacity_bytes // self.engine.budget.kv_bytes_per_page,
        )

    # ----- drain ------------------------------------------------------------------------------------------------

    def stop_admission(self) -> None:
        """From now on Generate answers UNAVAILABLE."""
        with self._lock:
            self.draining = True

    def open_streams(self) -> list[_Stream]:
        with self._lock:
            return list(self._streams.values())

    def end_streams(self, grace: float) -> int:
        """Cancels every open stream as ended by drain; returns how many there were."""
        streams = self.open_streams()
        for s in streams:
            s.drain_deadline = time.monotonic() + grace
            s.ended_by_drain = True
            self.loop.cancel(s.request_id)
        return len(streams)


class MeshServeServer:
    """A running MeshServe replica: gRPC (service, health, reflection), the engine loop, metrics, and drain."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        config: ServerConfig | None = None,
        *,
        started_at: float | None = None,
        plan_hook: Callable[[StepPlan], StepPlan] | None = None,
        on_loop_exit: Callable[[], None] | None = None,
    ) -> None:
        """`started_at` (time.monotonic()) is when start-up began, for the start-up gauge; default now.

        Multi-host serving: `plan_hook` sees every scheduler plan (the leader broadcasts it to the followers) and
        `on_loop_exit` runs on the engine thread after its last step.
        """
        self.config = config = config or ServerConfig()
        self.engine = engine
        self._started_at = time.monotonic() if started_at is None else started_at
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(
            engine,
            tokenizer,
            max_waiting=config.max_waiting,
            prefills_per_step=config.prefills_per_step,
            free_slot_decode_steps=config.free_slot_decode_steps,
            prefill_token_budget=config.prefill_token_budget,
            plan_hook=plan_hook,
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.loop = EngineLoop(
            self.scheduler,
            engine.warmup,
            stall_timeout=config.stall_timeout,
            on_ready=self._on_ready,
            on_stall=self._on_stall,
            on_step=self._on_step,
            on_error=self.metrics.engine_errors.inc,
            on_exit=on_loop_exit,
        )
        self.service = MeshServeService(self.loop, tokenizer, config, self.metrics)
        self._cost: DispatchCost | None = None
        workers = config.max_workers or engine.config.num_slots + config.max_waiting + 16
        self._grpc = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="meshserve-rpc"),
            # Refuse (RESOURCE_EXHAUSTED) rather than queue RPCs no thread can take: a queued health check would
            # look like a dead server.
            maximum_concurrent_rpcs=workers,
            # a request over max_request_bytes must reach the servicer to be told INVALID_ARGUMENT (see
            # TRANSPORT_BYTES_FACTOR)
            options=[("grpc.max_receive_message_length", TRANSPORT_BYTES_FACTOR * config.max_request_bytes)],
        )
        pb_grpc.add_MeshServeServicer_to_server(self.service, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        self.port = 0
        self.metrics_port: int | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        """Binds the ports and starts serving health (NOT_SERVING) at once; warm-up runs on the engine thread.

        Raises RuntimeError when the gRPC port cannot be bound.
        """
        address = f"{self.config.host}:{self.config.port}"
        try:
            self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as e:
            raise RuntimeError(f"cannot bind gRPC to {address}: {e}") from e
        if self.port == 0:
            raise RuntimeError(f"cannot bind gRPC to {address} (in use?)")
        self.metrics.listen_for_compiles()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        self._grpc.start()
        self.loop.start()
        log.info("gRPC on %s:%d, metrics on %s; warming up", self.config.host, self.port, self.metrics_port)

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        """Blocks until warm-up is done (SERVING); False on timeout."""
        return self.loop.ready.wait(timeout)

    def drain(self, timeout: float | None = None) -> int:
        """Stops admission, lets accepted requests finish for up to `timeout` (default the config's drain_timeout),
        then ends the rest; returns how many had to be ended. Health reports NOT_SERVING from the first moment.
        """
        timeout = self.config.drain_timeout if timeout is None else timeout
        self.service.stop_admission()
        self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + timeout
        while (self.service.open_streams() or self.scheduler.has_work()) and time.monotonic() < deadline:
            time.sleep(0.02)
        ended = self.service.end_streams(grace=5.0)
        if ended:
            log.warning("drain timeout (%.1f s): ended %d request(s) still running", timeout, ended)
        end_by = time.monotonic() + 6.0
        while self.service.open_streams() and time.monotonic() < end_by:
            time.sleep(0.02)
        return ended

    def stop(self, grace: float = 1.0) -> None:
        """Stops gRPC (open RPCs get `grace` seconds), the engine loop and the metrics endpoint. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self._grpc.stop(grace).wait()
        self.loop.stop()
        self.metrics.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Blocks until `stop()` has run; False on timeout."""
        return self._stopped.wait(timeout)

    # ----- engine-thread callbacks ------------------------------------------------------------------------------

    def _set_health(self, status: int) -> None:
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def _on_ready(self) -> None:
        b = self.engine.budget
        gbps = self.config.memory_bandwidth_gbps
        if gbps is None:
            gbps = measure_memory_bandwidth() / 1e9
            log.info("measured memory bandwidth: %.1f GB/s", gbps)
        self._cost = DispatchCost(
            weight_bytes=b.weight_bytes,
            kv_bytes_per_token=b.kv_bytes_per_token,
            flops_per_token=self.engine.model_config.flops_per_token(),
            decode_steps=self.engine.config.decode_steps,
            num_slots=self.engine.config.num_slots,
            bandwidth_bytes_per_s=gbps * 1e9,
        )
        self.metrics.startup.set(time.monotonic() - self._started_at)
        self.metrics.observe_step(self.scheduler.stats(), None)
        if not self.service.draining:
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready to serve after %.1f s", time.monotonic() - self._started_at)

    def _on_stall(self, stalled: bool) -> None:
        self.metrics.engine_stalled.set(1 if stalled else 0)
        # after enter_graceful_shutdown() the health servicer ignores set(): draining stays NOT_SERVING
        self._set_health(
            health_pb2.HealthCheckResponse.NOT_SERVING if stalled else health_pb2.HealthCheckResponse.SERVING
        )

    def _on_step(self) -> None:
        self.metrics.observe_step(self.scheduler.stats(), self._cost)
