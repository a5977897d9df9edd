"""A load generator for a running MeshServe server: streaming Generate calls on an arrival schedule.

Two ways to offer load:
- open loop: requests sent at a given rate, inter-arrival gaps drawn from a gamma distribution with mean 1 / rate and
  shape `burstiness` (1 is a Poisson process; below 1 burstier, above 1 more regular; an infinite rate sends
  everything at once);
- closed loop: a fixed number of requests in flight, each sent as soon as another finishes.

A run sends a fixed number of requests (the prompt set is cycled), after `warmup` requests sent one by one and left
out of the figures. Every request's timings come from the client's clock; a request that fails keeps its gRPC
status and message, so nothing is silently dropped. The seed (arrival gaps and per-request sampling seeds) is
recorded with the result.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np

from bench.stats import RequestRecord
from bench.workloads import Prompt
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc

_FINISH_NAMES = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_ERROR: "error",
}


def arrival_times(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times (seconds from the start) of `count` requests: gamma gaps of mean 1 / rate and shape `burstiness`;
    all zeros for an infinite rate."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(count)
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)
    gaps[0] = 0.0  # the first request opens the run
    return np.cumsum(gaps)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Send times shared by clients that run at once (e.g. gRPC and the OpenAI API, interleaved): `start` on
    time.perf_counter's clock, `times` seconds after it, one per request of this client."""

    start: float
    times: np.ndarray


def check_schedule(schedule: Schedule | None, num_requests: int, rate: float | None, warmup: int) -> None:
    if schedule is None:
        return
    if rate is None or warmup:
        raise ValueError("a shared schedule is an open loop at a rate, without warm-up requests")
    if len(schedule.times) != num_requests:
        raise ValueError(f"the schedule has {len(schedule.times)} send times for {num_requests} requests")


def generate_request(prompt: Prompt, request_id: str, seed: int) -> pb.GenerateRequest:
    """The Generate request of a benchmark prompt: greedy, exactly `max_tokens` tokens (EOS ignored)."""
    sampling = pb.SamplingOptions(temperature=0.0, max_tokens=prompt.max_tokens, ignore_eos=True, seed=seed)
    request = pb.GenerateRequest(request_id=request_id, sampling=sampling)
    if prompt.messages is not None:
        request.chat.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in prompt.messages]))
    elif prompt.text is not None:
        request.text = prompt.text
    else:
        request.token_ids.CopyFrom(pb.TokenIds(ids=list(prompt.token_ids)))
    return request


def stream_one(
    stub: pb_grpc.MeshServeStub,
    request: pb.GenerateRequest,
    timeout: float,
    sent_at: float,
    *,
    record: RequestRecord | None = None,
    on_message: Callable[[Any, RequestRecord], None] | None = None,
) -> RequestRecord:
    """Sends one request and records when each chunk arrived (into `record` if given); never raises for an RPC
    failure. `on_message(msg, record)` sees every streamed message after it is recorded."""
    record = record or RequestRecord(request.request_id, sent_at=sent_at)
    start = time.perf_counter()
    try:
        for msg in stub.Generate(request, timeout=timeout):
            now = time.perf_counter() - start
            if msg.prompt_tokens:
                record.prompt_tokens = msg.prompt_tokens
            if msg.token_ids:
                if record.ttft is None:
                    record.ttft = now
                record.chunks.append((now, len(msg.token_ids)))
                record.output_tokens += len(msg.token_ids)
            if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                record.finish_reason = _FINISH_NAMES.get(msg.finish_reason, str(msg.finish_reason))
            if msg.HasField("usage"):
                record.cached_tokens = msg.usage.cached_tokens
            if on_message is not None:
                on_message(msg, record)
        record.e2e = time.perf_counter() - start
        if record.finish_reason is None:
            record.error = "stream ended without a finish reason"
        elif record.ttft is None:
            record.error = "stream finished without any token"
    except grpc.RpcError as exc:
        record.status = exc.code().name if exc.code() is not None else "UNKNOWN"
        record.error = exc.details() or str(exc)
    return record


@dataclasses.dataclass
class LoadResult:
    """Every timed request (in send order) and the run's duration: first send to last completion."""

    records: list[RequestRecord]
    duration_s: float
    seed: int
    rate: float | None
    burstiness: float
    concurrency: int | None


def run_load(
    target: str,
    prompts: Sequence[Prompt],
    *,
    num_requests: int,
    rate: float | None = None,
    concurrency: int | None = None,
    burstiness: float = 1.0,
    warmup: int = 1,
    seed: int = 0,
    timeout: float = 600.0,
    on_done: Callable[[RequestRecord], None] | None = None,
    schedule: Schedule | None = None,
) -> LoadResult:
    """Drives the server at `target` ("host:port") with `num_requests` requests at `rate` or `concurrency`.

    Exactly one of `rate` (requests/s, may be inf) and `concurrency` must be given. `on_done` is called (from a
    worker thread) after each timed request. `schedule`: send times shared with another client (with `rate`, the
    whole schedule's, and no warm-up).
    """
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate and concurrency")
    check_schedule(schedule, num_requests, rate, warmup)
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if num_requests < 1 or not prompts:
        raise ValueError("need at least one request and one prompt")
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.MeshServeStub(channel)
    try:
        for i in range(warmup):
            stream_one(stub, generate_request(prompts[i % len(prompts)], f"warmup-{i}", seed + i), timeout, 0.0)
        requests = [
            generate_request(prompts[i % len(prompts)], f"req-{i}", seed + warmup + i) for i in range(num_requests)
        ]
        records: list[RequestRecord | None] = [None] * num_requests
        start = time.perf_counter() if schedule is None else schedule.start

        def send(i: int) -> None:
            record = stream_one(stub, requests[i], timeout, time.perf_counter() - start)
            records[i] = record
            if on_done is not None:
                on_done(record)

        if concurrency is not None:
            _closed_loop(send, num_requests, concurrency)
        else:
            times = arrival_times(num_requests, rate, burstiness, seed) if schedule is None else schedule.times
            _open_loop(send, times, start)
        finished = [r for r in records if r is not None]
        end = max((r.sent_at + (r.e2e or 0.0) for r in finished), default=0.0)
        return LoadResult(finished, end, seed, rate, burstiness, concurrency)
    finally:
        channel.close()


def _open_loop(send: Callable[[int], None], times: np.ndarray, start: float) -> None:
    # One thread per request in flight: an open loop must never wait for earlier requests before sending.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(times), 1024)) as pool:
        futures = []
        for i, at in enumerate(times):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(send, i))
        for f in futures:
            f.result()


def _closed_loop(send: Callable[[int], None], count: int, concurrency: int) -> None:
    lock = threading.Lock()
    next_index = iter(range(count))

    def worker() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            send(i)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def model_info(target: str, timeout: float = 30.0) -> dict[str, object]:
    """What the server says it serves (for the result JSON)."""
    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.MeshServeStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
    return {
        "model_name": info.model_name,
        "vocab_size": info.vocab_size,
        "num_slots": info.num_slots,
        "context_length": info.context_length,
        "dtype": info.dtype,
        "platform": info.platform,
        "decode_steps": info.decode_steps,
        "mesh": {a.name: a.size for a in info.mesh},
    }
