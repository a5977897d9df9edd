"""Prometheus metrics of the gateway itself (not of the replica behind it, which serves its own `meshserve_*`):
what came in through each front door and what became of it, what ran, and the ledger writer's backlog.

Every metric lives in one `GatewayMetrics.registry` per gateway (several gateways may share a process, as tests do)
and is named `meshserve_gateway_*`. The HTTP front serves them at `GET /metrics` (no key needed: nothing in them
names a caller).

Labels are bounded sets chosen here, never what a caller sent: the front door (`http`, `grpc`), the route (a fixed
list of paths, `other` for the rest; gRPC method names of the service), the status (an HTTP code or a gRPC code name)
and the refusal reason (see `refusal_reason`). No key, user, secret, prompt, model or client address is ever a label:
per-key figures are the ledger's job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.gate import GateError, Outcome
from gateway.limits import LIMIT_NAMES

CONTENT_TYPE = CONTENT_TYPE_LATEST

# a request through a gateway on a tiny CPU model takes milliseconds, a long generation on a loaded replica minutes
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

HTTP_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/feedback",
        "/health",
        "/metrics",
        "/fleet",
        "/fleet.json",
    }
)
"""The HTTP routes named in labels; `/v1/models/<name>` is `/v1/models/{model}`, anything else `other`."""

_STATUS_REASONS = {
    400: "invalid",
    401: "auth",
    403: "forbidden",
    404: "not_found",
    413: "too_large",
    499: "cancelled",
    504: "timeout",
}


def http_route(path: str) -> str:
    """The bounded route label of a request path."""
    if path in HTTP_ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def refusal_reason(error: GateError) -> str:
    """Why a request was refused, as a label: auth, forbidden, policy, a limit's name (requests_per_minute, ...),
    overload (the replica's queue is full), unavailable, invalid, not_found, too_large, cancelled, timeout or error."""
    if error.status == 429:
        return error.code if error.code in LIMIT_NAMES else "limit"
    if error.code == "overloaded":
        return "overload"
    if error.status == 503:
        return "unavailable"
    if error.code == "unsupported_parameter":  # a parameter the caller's policy does not allow
        return "policy"
    return _STATUS_REASONS.get(error.status, "error")


class _LedgerCollector(Collector):
    """Reads the gate's ledger writer (if the gate has one) at scrape time: its queue and what it wrote."""

    def __init__(self, gate: Any) -> None:
        self._gate = gate

    def describe(self) -> list:
        return []  # collected lazily: the gate's ledger may appear or not

    def collect(self) -> Iterator[Any]:
        ledger = getattr(self._gate, "ledger", None)
        if ledger is None:
            return
        queue = GaugeMetricFamily(
            "meshserve_gateway_ledger_queue_rows", "Ledger rows recorded and not yet written to the store."
        )
        queue.add_metric([], ledger.pending)
        yield queue
        batches = CounterMetricFamily(
            "meshserve_gateway_ledger_batches", "Batches of ledger rows written to the store (one transaction each)."
        )
        batches.add_metric([], ledger.batches)
        yield batches
        rows = CounterMetricFamily(
            "meshserve_gateway_ledger_rows",
            "Ledger rows by fate: written to the store, spilled to a file (store unreachable at close), dropped.",
            labels=["fate"],
        )
        for fate in ("written", "spilled", "dropped"):
            rows.add_metric([fate], getattr(ledger, fate))
        yield rows


class GatewayMetrics:
    """The metrics of one gateway, in `self.registry`; `gate` (optional) is read for its ledger and prices."""

    def __init__(self, gate: Any = None, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._gate = gate
        r = self.registry
        self.requests = Counter(
            "meshserve_gateway_requests",
            "Requests answered, by front door (http, grpc), route (path or gRPC method) and status (HTTP code or gRPC "
            "code name), counted when the response (a stream's last message) ends.",
            ["front", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "meshserve_gateway_request_seconds",
            "Arrival to the end of the response (a stream's last byte), by front door and route.",
            ["front", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "meshserve_gateway_time_to_first_token_seconds",
            "Arrival at the gateway to the replica's first generated token, by front door.",
            ["front"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.admitted = Counter(
            "meshserve_gateway_admitted",
            "Generation requests the gate admitted and the replica started, by front door.",
            ["front"],
            registry=r,
        )
        self.refused = Counter(
            "meshserve_gateway_refused",
            "Generation requests refused before they ran, by front door and reason: auth, forbidden, policy, a "
            "limit's name, overload (the replica's queue), unavailable, invalid, not_found, too_large, ...",
            ["front", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "meshserve_gateway_streams_in_flight",
            "Admitted requests not yet settled with the gate (running on the replica).",
            registry=r,
        )
        self.finished = Counter(
            "meshserve_gateway_finished",
            "Admitted requests settled with the gate, by finish reason (stop, length, cancelled, error).",
            ["finish_reason"],
            registry=r,
        )
        self.tokens = Counter(
            "meshserve_gateway_tokens",
            "Tokens of settled requests: prompt (in; cached ones included), cached (of the prompt, from the prefix "
            "cache), completion (out).",
            ["kind"],
            registry=r,
        )
        self.device_seconds = Counter(
            "meshserve_gateway_device_seconds",
            "Device-seconds of settled requests (each request's share of the dispatches it took part in).",
            registry=r,
        )
        self.cost = Counter(
            "meshserve_gateway_cost",
            "Cost of settled requests at the ledger's prices: device (device-seconds x price per chip-hour, each "
            "replica's share at its own price after a failover) and tokens (tokens x price per million).",
            ["kind"],
            registry=r,
        )
        for kind in ("prompt", "cached", "completion"):
            self.tokens.labels(kind)
        for kind in ("device", "tokens"):
            self.cost.labels(kind)
        self.registry.register(_LedgerCollector(gate))

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

    # ----- recording ----------------------------------------------------------------------------------------

    def answered(self, front: str, route: str, status: str, seconds: float | None = None) -> None:
        """One request answered with `status`; `seconds` from arrival to the end of the response."""
        self.requests.labels(front, route, status).inc()
        if seconds is not None:
            self.latency.labels(front, route).observe(seconds)

    def refusal(self, front: str, error: GateError) -> None:
        self.refused.labels(front, refusal_reason(error)).inc()

    def started(self, front: str) -> None:
        """An admitted request's first message came from the replica."""
        self.admitted.labels(front).inc()

    def running(self, front: str, run: Any) -> None:
        """Follows an admitted `flow.Run` until it is settled (in flight until then; its outcome counted then)."""
        self.in_flight.inc()

        def done(_task: Any) -> None:
            self.in_flight.dec()
            if run.outcome is not None:
                self.settled(front, run.ticket.prepared.model, run.outcome)

        run.done.add_done_callback(done)

    def settled(self, front: str, model: str, outcome: Outcome) -> None:
        """Counts one settled request's tokens, device time and cost (its TTFT when a token came)."""
        self.finished.labels(outcome.finish_reason or "error").inc()
        self.tokens.labels("prompt").inc(outcome.prompt_tokens)
        self.tokens.labels("cached").inc(outcome.cached_tokens)
        self.tokens.labels("completion").inc(outcome.completion_tokens)
        self.device_seconds.inc(outcome.device_seconds)
        if outcome.completion_tokens and outcome.ttft_seconds > 0:
            self.ttft.labels(front).observe(outcome.ttft_seconds)
        prices = getattr(getattr(self._gate, "ledger", None), "prices", None)
        if prices is not None:
            device = prices.device_cost(outcome.replica, outcome.device_seconds, outcome.device_seconds_by_replica)
            self.cost.labels("device").inc(device)
            self.cost.labels("tokens").inc(
                prices.token_cost(model, outcome.prompt_tokens, outcome.cached_tokens, outcome.completion_tokens)
            )


class HttpMetrics:
    """ASGI middleware: counts every HTTP request by bounded route and status, and times it to its last byte."""

    def __init__(self, app, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        route = http_route(scope.get("path", ""))
        status: list[int] = []
        ended = False

        async def observed_send(message) -> None:
            nonlocal ended
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not ended:
                ended = True
                self.metrics.answered("http", route, str(status[0] if status else 500), time.monotonic() - started)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            if not ended:  # an exception, or the client went away before the last byte
                code = str(status[0]) if status else "500"
                self.metrics.answered("http", route, code, time.monotonic() - started)
