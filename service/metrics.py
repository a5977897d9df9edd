"""Prometheus metrics of one server: what a request experienced, and how well each decode dispatch used the machine.

Every metric lives in the server's own `CollectorRegistry` (several servers can share a process, as tests do) and is
named `meshserve_*`. Request metrics are recorded by the RPC handlers; the engine-side gauges are refreshed by the
engine thread after every scheduler step, from `SchedulerStats` alone (the service knows nothing of einsums).

The roofline gauges follow shared/PERFORMANCE.md: a decode dispatch of `decode_steps` steps reads every weight once
per step plus the KV cache held by the active slots, so

    bytes  ~ decode_steps * (weight_bytes + kv_tokens_used * kv_bytes_per_token)
    FLOPs  ~ flops_per_token * tokens produced
    arithmetic intensity = FLOPs / bytes;  bandwidth utilization = bytes / dispatch seconds / measured bandwidth.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine.scheduler import SchedulerStats

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# Latency buckets span a tiny CPU model (milliseconds) to a long generation on a loaded server (minutes).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0)


@dataclasses.dataclass(frozen=True)
class DispatchCost:
    """What one decode dispatch costs the machine, per the roofline model in the module docstring."""

    weight_bytes: int
    """Bytes of weights read by one decode step."""
    kv_bytes_per_token: int
    """Bytes of K and V one cached token holds across all layers."""
    flops_per_token: int
    """Matmul FLOPs of one token's forward pass."""
    decode_steps: int
    """Decode steps per dispatch."""
    num_slots: int
    """Slots decoded together."""
    bandwidth_bytes_per_s: float
    """Measured (or configured) memory bandwidth the utilization is a fraction of."""

    def estimate(self, stats: SchedulerStats) -> tuple[float, float, float]:
        """(arithmetic intensity FLOP/byte, bandwidth utilization 0..1, batch occupancy 0..1) of the last dispatch."""
        moved = self.decode_steps * (self.weight_bytes + stats.kv_tokens_used * self.kv_bytes_per_token)
        flops = self.flops_per_token * stats.last_dispatch_tokens
        intensity = flops / moved if moved else 0.0
        secs = stats.last_dispatch_seconds
        utilization = moved / secs / self.bandwidth_bytes_per_s if secs > 0 and self.bandwidth_bytes_per_s > 0 else 0.0
        occupancy = stats.last_dispatch_tokens / (self.decode_steps * self.num_slots)
        return intensity, utilization, occupancy


def measure_memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second one device reads a large array at (best of `repeats` reductions), for the MBU gauge."""
    n = megabytes * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()  # compile and touch the pages outside the timed runs
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


class ServerMetrics:
    """The metrics of one server, in `self.registry`; `serve(port)` exposes them over HTTP."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "meshserve_requests", "Generate requests that ended, by finish reason.", ["finish_reason"], registry=r
        )
        self.rejected = Counter(
            "meshserve_requests_rejected",
            "Generate requests refused before running, by gRPC status code.",
            ["code"],
            registry=r,
        )
        self.ttft = Histogram(
            "meshserve_time_to_first_token_seconds",
            "Arrival at the scheduler to the first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "meshserve_inter_token_latency_seconds",
            "Gap between streamed chunks divided by the tokens in the chunk, observed once per token.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "meshserve_request_latency_seconds",
            "Arrival to the end of the request (end-to-end).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "meshserve_queue_time_seconds", "Arrival to the start of prefill.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("meshserve_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generated_tokens = Counter("meshserve_generated_tokens", "Tokens generated and streamed.", registry=r)
        self.slots_used = Gauge("meshserve_slots_used", "Slots decoding a request.", registry=r)
        self.slots_total = Gauge("meshserve_slots_total", "Slots in total.", registry=r)
        self.waiting = Gauge("meshserve_waiting_requests", "Requests waiting for a slot.", registry=r)
        self.kv_used = Gauge("meshserve_kv_cache_tokens_used", "KV cache tokens held by active requests.", registry=r)
        self.kv_capacity = Gauge("meshserve_kv_cache_tokens_capacity", "KV cache tokens in total.", registry=r)
        self.occupancy = Gauge(
            "meshserve_decode_batch_occupancy",
            "Share of the last decode dispatch's slot-steps that produced a token (0..1).",
            registry=r,
        )
        self.intensity = Gauge(
            "meshserve_step_arithmetic_intensity",
            "FLOPs per byte moved in the last decode dispatch (estimate).",
            registry=r,
        )
        self.bandwidth = Gauge(
            "meshserve_bandwidth_utilization",
            "Bytes moved per second in the last decode dispatch over the measured memory bandwidth (estimate, 0..1).",
            registry=r,
        )
        self.dispatch_seconds = Gauge(
            "meshserve_last_dispatch_seconds", "Wall time of the last decode dispatch.", registry=r
        )
        self.prefix_queried = Counter(
            "meshserve_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_hits = Counter(
            "meshserve_prefix_cache_hit_tokens",
            "Prompt tokens whose K/V came from cached KV pages instead of being computed, by tier: device (the pool) "
            "or host (copied back from host memory); hit rate: their sum / queried.",
            ["tier"],
            registry=r,
        )
        self.kv_host_bytes = Gauge(
            "meshserve_kv_host_bytes",
            "Bytes of KV pages the host-memory tier holds, and its capacity.",
            ["of"],
            registry=r,
        )
        self.kv_host_pages = Counter(
            "meshserve_kv_host_pages",
            "KV pages moved between the device pool and the host tier: spilled (copied out on eviction), restored "
            "(copied back on a hit).",
            ["direction"],
            registry=r,
        )
        self.kv_pages = Gauge(
            "meshserve_kv_pages",
            "KV pages by state: used (held by running requests), cached (prefix cache only, evictable), free, "
            "reserved (admitted requests may still take them).",
            ["state"],
            registry=r,
        )
        self.kv_evictions = Counter(
            "meshserve_kv_evictions",
            "Cached KV pages reclaimed for new sequences (least recently used first).",
            registry=r,
        )
        self.busy = Counter(
            "meshserve_engine_busy_seconds",
            "Wall time of the engine's prefill and decode calls; the requests' Usage.device_seconds add up to it.",
            registry=r,
        )
        self.preemptions = Counter(
            "meshserve_preemptions",
            "Running requests preempted to free KV pages (admission 'grow'); each resumes from the prefix cache.",
            registry=r,
        )
        self.prefilling = Gauge(
            "meshserve_prefilling_requests", "Admitted prompts still being read in chunks.", registry=r
        )
        self.compiles = Counter(
            "meshserve_compiles", "XLA backend compilations seen in this process since the server started.", registry=r
        )
        self.startup = Gauge(
            "meshserve_startup_seconds", "Process start (or server creation) to ready to serve.", registry=r
        )
        self.engine_stalled = Gauge(
            "meshserve_engine_stalled", "1 while the watchdog sees the engine loop making no progress.", registry=r
        )
        self.engine_errors = Counter(
            "meshserve_engine_loop_errors", "Exceptions that escaped a scheduler step.", registry=r
        )
        self._last_step = -1
        self._prefix_seen: tuple[float, ...] | None = None
        self._evictions_seen: int | None = None
        self._http: Any = None
        self._lock = threading.Lock()
        self._listening = False

    # ----- lifecycle --------------------------------------------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the HTTP endpoint; returns the bound port (pass 0 to pick a free one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def listen_for_compiles(self) -> None:
        """Counts XLA compilations from now on (a process-wide JAX event, so every live server sees them)."""
        with self._lock:
            if not self._listening:
                jax.monitoring.register_event_duration_secs_listener(self._on_event)
                self._listening = True

    def close(self) -> None:
        """Stops the HTTP endpoint and the compile listener."""
        with self._lock:
            if self._listening:
                jax.monitoring.unregister_event_duration_listener(self._on_event)
                self._listening = False
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == COMPILE_EVENT:
            self.compiles.inc()

    # ----- recording --------------------------------------------------------------------------------------------

    def request_finished(
        self,
        reason: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        e2e: float,
        queue_time: float | None,
        ttft: float | None,
    ) -> None:
        """Records one request that reached the scheduler and ended (any finish reason)."""
        self.requests.labels(finish_reason=reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.e2e.observe(e2e)
        if queue_time is not None:
            self.queue_time.observe(queue_time)
        if ttft is not None:
            self.ttft.observe(ttft)

    def tokens_streamed(self, count: int, gap: float | None) -> None:
        """Records `count` tokens sent in one chunk, `gap` seconds after the previous chunk (None for the first)."""
        self.generated_tokens.inc(count)
        if gap is not None and count:
            per_token = gap / count
            for _ in range(count):
                self.inter_token.observe(per_token)

    def observe_step(self, stats: SchedulerStats, cost: DispatchCost | None) -> None:
        """Refreshes the engine gauges after a scheduler step; roofline gauges only when a new dispatch ran."""
        self.slots_used.set(stats.slots_used)
        self.slots_total.set(stats.slots_total)
        self.waiting.set(stats.waiting)
        self.kv_used.set(stats.kv_tokens_used)
        self.kv_capacity.set(stats.kv_tokens_capacity)
        # counters follow the engine's cumulative totals from the first observation on (the server's start)
        host = stats.prefix_cache_host_hit_tokens
        seen = (
            stats.prefix_cache_queried_tokens,
            stats.prefix_cache_hit_tokens - host,
            host,
            stats.kv_host_spilled_pages,
            stats.kv_host_restored_pages,
            stats.preemptions,
            stats.busy_seconds,
        )
        if self._prefix_seen is not None:
            up = [max(now - before, 0) for now, before in zip(seen, self._prefix_seen, strict=True)]
            self.prefix_queried.inc(up[0])
            self.prefix_hits.labels("device").inc(up[1])
            self.prefix_hits.labels("host").inc(up[2])
            self.kv_host_pages.labels("spilled").inc(up[3])
            self.kv_host_pages.labels("restored").inc(up[4])
            self.preemptions.inc(up[5])
            self.busy.inc(up[6])
        self._prefix_seen = seen
        self.kv_host_bytes.labels("used").set(stats.kv_host_bytes)
        self.kv_host_bytes.labels("capacity").set(stats.kv_host_capacity_bytes)
        for state in ("used", "cached", "free", "reserved"):
            self.kv_pages.labels(state).set(getattr(stats, f"kv_pages_{state}"))
        if self._evictions_seen is not None:
            self.kv_evictions.inc(max(stats.kv_evictions - self._evictions_seen, 0))
        self._evictions_seen = stats.kv_evictions
        self.prefilling.set(stats.prefilling)
        if cost is None or stats.steps == self._last_step or stats.last_dispatch_seconds <= 0:
            return
        self._last_step = stats.steps
        intensity, utilization, occupancy = cost.estimate(stats)
        self.intensity.set(intensity)
        self.bandwidth.set(utilization)
        self.occupancy.set(occupancy)
        self.dispatch_seconds.set(stats.last_dispatch_seconds)
