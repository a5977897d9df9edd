"""Latency statistics of a benchmark run: percentiles, TTFT / TPOT / inter-token latency, goodput at SLOs.

Definitions (one request, times in seconds from the moment it was sent):
- TTFT: until the first generated token arrived.
- e2e: until the last token arrived.
- TPOT (time per output token after the first) = (e2e - TTFT) / (output tokens - 1); undefined for one token.
- inter-token latency (ITL): the gaps between streamed chunks. A chunk of k tokens arriving g seconds after the
  previous one counts as k gaps of g / k, so a request's gaps sum to e2e - TTFT and their mean is its TPOT.
- goodput: requests per second that succeeded *and* met every SLO given (TTFT, TPOT, e2e).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default); nan if empty."""
    if len(samples) == 0:
        return math.nan
    return float(np.percentile(np.asarray(samples, np.float64), q))


def summarize(samples: Iterable[float], scale: float = 1.0) -> dict[str, float | int]:
    """count, mean, p50, p90, p99, min and max of `samples` times `scale` (1e3 turns seconds into ms)."""
    values = [float(s) * scale for s in samples if s is not None and not math.isnan(s)]
    out: dict[str, float | int] = {"count": len(values)}
    out["mean"] = float(np.mean(values)) if values else math.nan
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    out["min"] = min(values) if values else math.nan
    out["max"] = max(values) if values else math.nan
    return out


def tpot(e2e: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first: (e2e - TTFT) / (tokens - 1); None for fewer than two tokens."""
    if output_tokens < 2:
        return None
    return (e2e - ttft) / (output_tokens - 1)


@dataclasses.dataclass
class RequestRecord:
    """What one request experienced, as the client saw it. Failed requests keep their status and message."""

    request_id: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    sent_at: float = 0.0
    """When it was sent (seconds on the run's clock)."""
    ttft: float | None = None
    e2e: float | None = None
    chunks: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    """(seconds since sent, tokens in the chunk) for every streamed chunk that carried tokens."""
    status: str = "OK"
    """gRPC status code name ("OK" on success)."""
    error: str | None = None
    finish_reason: str | None = None
    cached_tokens: int | None = None
    """Prompt tokens the server read from its prefix cache (its usage report; None when it sent none)."""

    @property
    def ok(self) -> bool:
        return self.status == "OK" and self.error is None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.e2e is None or self.ttft is None:
            return None
        return tpot(self.e2e, self.ttft, self.output_tokens)

    def itl(self) -> list[float]:
        """Inter-token gaps after the first chunk: a chunk of k tokens after a gap g gives k gaps of g / k."""
        gaps = []
        for (t0, _), (t1, k) in itertools.pairwise(self.chunks):
            gaps.extend([(t1 - t0) / k] * k)
        return gaps

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["chunks"]
        out["tpot"] = self.tpot
        return out


@dataclasses.dataclass(frozen=True)
class SLO:
    """Service-level objectives in seconds; None leaves a figure unconstrained."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def met(self, record: RequestRecord) -> bool:
        """Whether a request succeeded and met every objective (TPOT is vacuous for a one-token request)."""
        if not record.ok:
            return False
        if self.ttft is not None and (record.ttft is None or record.ttft > self.ttft):
            return False
        if self.e2e is not None and (record.e2e is None or record.e2e > self.e2e):
            return False
        t = record.tpot
        return not (self.tpot is not None and t is not None and t > self.tpot)

    def to_json(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


def goodput(records: Sequence[RequestRecord], slo: SLO, duration: float) -> dict[str, float | int]:
    """Requests meeting `slo` per second of `duration`, their count and their share of all requests."""
    good = sum(slo.met(r) for r in records)
    return {
        "requests_meeting_slo": good,
        "slo_attainment": good / len(records) if records else math.nan,
        "goodput_requests_per_s": good / duration if duration > 0 else math.nan,
    }


def serving_summary(records: Sequence[RequestRecord], duration: float, slo: SLO) -> dict[str, Any]:
    """The W3 report of one run: latency percentiles (ms), throughput, goodput and every failed request."""
    ok = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "request_throughput_per_s": len(ok) / duration if duration > 0 else math.nan,
        "output_tokens_per_s": output_tokens / duration if duration > 0 else math.nan,
        "output_tokens": output_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens": sum(r.cached_tokens or 0 for r in ok),
        "ttft_ms": summarize((r.ttft for r in ok), 1e3),
        "tpot_ms": summarize((r.tpot for r in ok), 1e3),
        "itl_ms": summarize((g for r in ok for g in r.itl()), 1e3),
        "e2e_ms": summarize((r.e2e for r in ok), 1e3),
        "slo": slo.to_json(),
        **goodput(records, slo, duration),
        "failures": [{"request_id": r.request_id, "status": r.status, "error": r.error} for r in records if not r.ok],
    }
