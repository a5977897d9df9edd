"""A load generator for an OpenAI-compatible HTTP API (the gateway's): streaming chat completions over aiohttp.

The same prompts, arrival schedules and figures as the gRPC load generator (bench/serve_client.py), so the two can be
compared request for request. Every request streams (`stream: true` with `stream_options.include_usage`), greedy,
exactly `max_tokens` tokens (`ignore_eos`, vLLM's extra, which the gateway accepts). Per request, on the client's
clock:
- TTFT: until the first delta that carries content (a reply whose every delta is empty, as a random model's may be,
  falls back to the delta that carries the finish reason);
- chunks: one per content delta. The API says how many tokens a reply had (the final chunk's usage) but not how many
  each delta carried, so the reply's tokens are spread evenly over its deltas: TPOT, which needs only the total, is
  exact; inter-token latency is the gap between deltas divided by that share (the gateway forwards one delta per
  replica message, so the gaps are the gRPC messages' gaps);
- usage: prompt and completion tokens from the final chunk, cached tokens from `usage.prompt_tokens_details`.
A failed request keeps its HTTP status ("HTTP_503"), a mid-stream error event ("STREAM_ERROR") or the transport
error's name, and the error message, so nothing is silently dropped.

Why aiohttp and not the `openai` client (or httpx, which it streams through): a load generator that shares the machine
with the server should spend as little as it can per request, so that what it measures is the server. A streamed
one-token chat costs this client ~0.3-0.35 ms of CPU against ~1.1 ms with an httpx.AsyncClient (pure-Python HTTP/1.1
in httpcore, anyio underneath; measured against the same raw SSE server, 2-core Zen 3 VM), and the `openai` client
adds a pydantic model per chunk on top. aiohttp parses HTTP in C, as the gateway's uvicorn does; aiperf uses it too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from bench.serve_client import LoadResult, Schedule, arrival_times, check_schedule
from bench.stats import RequestRecord
from bench.workloads import Prompt

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


def base_url(target: str) -> str:
    """The API's base URL from a target: "http://host:port" (a trailing /v1 is dropped) or a bare "host:port"."""
    url = target.rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url.removesuffix("/v1")


def request_body(prompt: Prompt, model: str, seed: int) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of a benchmark prompt: greedy, exactly `max_tokens` tokens, streamed with usage."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": prompt.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if prompt.messages is not None:
        return CHAT_PATH, {**body, "messages": [dict(m) for m in prompt.messages]}
    if prompt.text is not None:
        return COMPLETIONS_PATH, {**body, "prompt": prompt.text}
    raise ValueError(
        f"prompt {prompt.id!r} is token ids; the OpenAI API takes text: use a synthetic --workload or a "
        "--prompts_file of messages / prompt / text"
    )


def chat_body(
    messages: Sequence[dict[str, str]], model: str, max_tokens: int, seed: int, *, ignore_eos: bool = False
) -> dict[str, Any]:
    """A greedy streamed chat request (W4: EOS ends the reply, as in a real chat)."""
    body = {
        "model": model,
        "messages": [dict(m) for m in messages],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def spread(total: int, parts: int) -> list[int]:
    """`total` tokens over `parts` deltas as evenly as whole tokens allow (the later deltas take the remainder);
    at least one each, so a gap is never divided by zero."""
    if parts <= 0:
        return []
    base, extra = divmod(max(total, 0), parts)
    return [max(1, base + (i >= parts - extra)) for i in range(parts)]


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:500].decode("utf-8", errors="replace")


@dataclasses.dataclass
class StreamResult:
    """What one streamed request brought back besides its record's timings."""

    text: str = ""
    usage: dict[str, Any] | None = None


async def stream_request(
    client: Any,
    path: str,
    body: dict[str, Any],
    record: RequestRecord,
    *,
    headers: dict[str, str] | None = None,
    on_delta: Callable[[str], None] | None = None,
) -> StreamResult:
    """Sends one streamed request with `client` (`async_client`'s session, made in the running loop), filling
    `record`; never raises for an HTTP or transport failure (the record keeps it). `on_delta` sees each content
    delta."""
    import aiohttp

    result = StreamResult()
    texts: list[str] = []
    times: list[float] = []
    finished_at: float | None = None
    done = False
    payload = json.dumps(body).encode()
    start = time.perf_counter()

    def handle(event: bytes, now: float) -> None:
        nonlocal finished_at, done
        if not event.startswith(b"data: "):
            return
        data = event[6:]
        if data == b"[DONE]":
            done = True
            return
        obj = json.loads(data)
        if "error" in obj:
            record.status, record.error = "STREAM_ERROR", str(obj["error"].get("message"))
            return
        for choice in obj.get("choices") or ():
            delta = choice.get("delta")
            content = delta.get("content") if delta is not None else choice.get("text")
            if content:
                if record.ttft is None:
                    record.ttft = now
                times.append(now)
                texts.append(content)
                if on_delta is not None:
                    on_delta(content)
            if choice.get("finish_reason"):
                record.finish_reason = choice["finish_reason"]
                finished_at = now
        if obj.get("usage"):
            result.usage = obj["usage"]

    try:
        async with client.post(
            path, data=payload, headers={"content-type": "application/json", **(headers or {})}
        ) as response:
            if response.status != 200:
                record.status, record.error = f"HTTP_{response.status}", _error_message(await response.read())
                return result
            buffer = b""
            async for data in response.content.iter_any():
                now = time.perf_counter() - start
                buffer += data
                while (cut := buffer.find(b"\n\n")) >= 0:
                    event, buffer = buffer[:cut], buffer[cut + 2 :]
                    handle(event, now)
        record.e2e = time.perf_counter() - start
    except (aiohttp.ClientError, TimeoutError) as exc:
        record.status, record.error = type(exc).__name__, str(exc) or type(exc).__name__
        return result
    result.text = "".join(texts)
    usage = result.usage or {}
    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    record.output_tokens = int(usage.get("completion_tokens") or len(times))
    details = usage.get("prompt_tokens_details") or {}
    record.cached_tokens = details.get("cached_tokens") if result.usage else None
    if record.ttft is None and finished_at is not None and record.output_tokens:
        record.ttft, times = finished_at, [finished_at]  # every delta was empty: the finish carried the reply
    record.chunks = list(zip(times, spread(record.output_tokens, len(times)), strict=True))
    if record.error is None:
        if not done:
            record.error = "stream ended without [DONE]"
        elif record.finish_reason is None:
            record.error = "stream ended without a finish reason"
        elif record.ttft is None:
            record.error = "stream finished without any token"
    return result


def async_client(target: str, timeout: float, api_key: str | None = None) -> Any:
    """An aiohttp.ClientSession for the API at `target` (call it in the event loop that will use it): no connection
    limit (an open loop must never queue in the client), `timeout` seconds per read, the key as a bearer token."""
    import aiohttp

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return aiohttp.ClientSession(
        base_url=base_url(target),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 30.0), sock_read=timeout),
        # Idle connections are dropped before uvicorn's 5 s keep-alive ends them: a POST sent on a connection the
        # server is closing fails, and a POST is not retried.
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0),
        headers=headers,
    )


def model_info(target: str, api_key: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """What the API says it serves (GET /v1/models): the first model's name and context length."""
    import urllib.error
    import urllib.request

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(base_url(target) + "/v1/models", headers=headers), timeout=timeout
        ) as r:
            card = json.loads(r.read())["data"][0]
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"GET /v1/models on {target}: HTTP {e.code}: {_error_message(e.read())}") from None
    except OSError as e:  # refused, unreachable, timed out
        raise RuntimeError(f"GET /v1/models on {target}: {getattr(e, 'reason', e)}") from None
    return {"model_name": card["id"], "context_length": card.get("max_model_len"), "api": "openai"}


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
    model: str | None = None,
    api_key: str | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
    schedule: Schedule | None = None,
) -> LoadResult:
    """Drives the OpenAI API at `target` with `num_requests` streamed requests at `rate` or `concurrency`, as
    `serve_client.run_load` does the gRPC API (same schedule, same seeds; `schedule` as there). `model`: the name to
    send (default the API's first model). Runs its own event loop: call it from a thread that has none running."""
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate and concurrency")
    check_schedule(schedule, num_requests, rate, warmup)
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if num_requests < 1 or not prompts:
        raise ValueError("need at least one request and one prompt")
    model = model or model_info(target, api_key)["model_name"]
    bodies = [request_body(prompts[i % len(prompts)], model, seed + warmup + i) for i in range(num_requests)]
    warm = [request_body(prompts[i % len(prompts)], model, seed + i) for i in range(warmup)]

    async def drive() -> LoadResult:
        async with async_client(target, timeout, api_key) as client:
            for i, (path, body) in enumerate(warm):
                await stream_request(client, path, body, RequestRecord(f"warmup-{i}"))
            records: list[RequestRecord | None] = [None] * num_requests
            start = time.perf_counter() if schedule is None else schedule.start

            async def send(i: int) -> None:
                record = RequestRecord(f"req-{i}", sent_at=time.perf_counter() - start)
                await stream_request(client, *bodies[i], record)
                records[i] = record
                if on_done is not None:
                    on_done(record)

            if concurrency is not None:
                queue = iter(range(num_requests))

                async def worker() -> None:
                    for i in queue:
                        await send(i)

                await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
            else:
                tasks = []
                times = arrival_times(num_requests, rate, burstiness, seed) if schedule is None else schedule.times
                for i, at in enumerate(times):
                    delay = start + at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(send(i)))
                await asyncio.gather(*tasks)
        finished = [r for r in records if r is not None]
        end = max((r.sent_at + (r.e2e or 0.0) for r in finished), default=0.0)
        return LoadResult(finished, end, seed, rate, burstiness, concurrency)

    return asyncio.run(drive())


class LoopThread:
    """An event loop in a daemon thread, for callers that block (one thread per W4 user): `call(coro)` runs a
    coroutine there and waits for its result."""

    def __init__(self, name: str = "bench-http") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
