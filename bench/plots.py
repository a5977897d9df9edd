"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.roofline import Roofline


def throughput_vs_slots(
    points: Sequence[dict[str, Any]],
    roofline: Roofline,
    context: int,
    path: str,
    *,
    title: str,
    recommended: int | None = None,
) -> str:
    """Measured tokens/s per slot count (`points` rows with "slots" and "tokens_per_s") under the roofline's
    prediction at `context` tokens per slot, with the two bounds it is the minimum of."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    slots = sorted({int(p["slots"]) for p in points})
    lo, hi = 1, max([*slots, math.ceil(roofline.critical_batch) * 2])
    grid = sorted({2**i for i in range(int(math.log2(hi)) + 2)} | set(slots))
    grid = [b for b in grid if lo <= b <= hi]
    ax.plot(grid, [roofline.tokens_per_second(b, context) for b in grid], "k-", label=f"roofline (context {context})")
    ax.plot(grid, [b / roofline.memory_seconds(b, context) for b in grid], "k:", lw=1, label="memory bound")
    ax.plot(grid, [b / roofline.compute_seconds(b) for b in grid], "k--", lw=1, label="compute bound")
    measured = sorted((int(p["slots"]), p["tokens_per_s"]) for p in points if p.get("tokens_per_s"))
    if measured:
        ax.plot(*zip(*measured, strict=True), "o-", color="tab:blue", label="measured")
    ax.axvline(
        roofline.critical_batch, color="tab:gray", alpha=0.5, label=f"critical batch {roofline.critical_batch:.0f}"
    )
    if recommended is not None:
        ax.axvline(recommended, color="tab:green", label=f"recommended {recommended} slots")
    return _finish_log_log(fig, ax, path, xlabel="slots (decode batch)", ylabel="output tokens/s", title=title)


def roofline_table(rows: Sequence[dict[str, Any]], path: str, *, title: str) -> str:
    """Predicted decode tokens/s against slot count, one line per context length."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for context in sorted({r["context"] for r in rows}):
        pts = sorted((r["slots"], r["tokens_per_s"]) for r in rows if r["context"] == context)
        ax.plot(*zip(*pts, strict=True), "o-", label=f"context {context}")
    return _finish_log_log(fig, ax, path, xlabel="slots", ylabel="predicted tokens/s", title=title)


def _finish_log_log(fig: Any, ax: Any, path: str, *, xlabel: str, ylabel: str, title: str) -> str:
    """Log-log axes with labels, legend and grid; writes the PNG and frees the figure."""
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_vs_rate(runs: Sequence[dict[str, Any]], path: str, *, title: str) -> str:
    """TTFT, TPOT and e2e (p50 solid, p99 dashed) against offered load (request rate or concurrency)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    xs = [r["rate"] if r["rate"] is not None else r["concurrency"] for r in runs]
    finite = [x if math.isfinite(x) else None for x in xs]
    # An infinite rate (everything at once) is drawn one step past the largest finite rate.
    top = max((x for x in finite if x is not None), default=1.0)
    xs = [x if x is not None else top * 2 for x in finite]
    label = "request rate (req/s)" if runs and runs[0]["rate"] is not None else "concurrency"
    for ax, key in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"), strict=True):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(xs, [r["summary"][key][q] for r in runs], style, label=q)
        ax.set(xlabel=label, ylabel=key.replace("_", " "), title=key.split("_")[0].upper())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
