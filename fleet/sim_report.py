"""The fleet simulator's figures per routing policy: the summary of a run, the comparison table, its markdown and
the plots.

Definitions (times seen by the client, round trips included):
- goodput: requests that completed with TTFT <= slo_ttft_s and TPOT <= slo_tpot_s (TPOT vacuous for one token), per
  second of the simulated day, and as a share of all requests sent (`slo_attainment`).
- shed rate: requests refused (by reason: fleet.admission's absent / draining / full, or too long for the context)
  over requests sent.
- KV hit rate: prompt tokens read from a replica's prefix cache over prompt tokens of the completed requests.
- cost per million tokens: the fleet's cost for the simulated time (every replica always on: no autoscaling; price
  per chip-hour x chips) over the output tokens of completed requests, x 1e6; `cost_per_m_good_tokens` counts only
  the requests that met the SLOs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bench import stats

if TYPE_CHECKING:
    from fleet.sim import FleetSim, Record


def _met(r: Record, slo_ttft: float, slo_tpot: float) -> bool:
    if not r.ok or r.ttft is None or r.ttft > slo_ttft:
        return False
    t = r.tpot
    return t is None or t <= slo_tpot


def summarize(sim: FleetSim, duration: float) -> dict[str, Any]:
    """The figures of one run (JSON-ready)."""
    c = sim.config
    recs = sim.records
    ok = [r for r in recs if r.ok]
    good = [r for r in ok if _met(r, c.slo_ttft_s, c.slo_tpot_s)]
    refused: dict[str, int] = {}
    for r in recs:
        if not r.ok:
            reason = r.status.split(":", 1)[1]
            refused[reason] = refused.get(reason, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    good_tokens = sum(r.output_tokens for r in good)
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    cost_per_hour = sum(s.price_per_chip_hour * s.chips for s in sim.specs)
    cost = cost_per_hour * duration / 3600.0
    end = max((r.sent + (r.e2e or 0.0) for r in ok), default=duration)
    by_priority = {}
    for p in sorted({r.priority for r in recs}):
        mine = [r for r in recs if r.priority == p]
        by_priority[str(p)] = {
            "requests": len(mine),
            "shed_rate": sum(not r.ok for r in mine) / len(mine),
            "slo_attainment": sum(_met(r, c.slo_ttft_s, c.slo_tpot_s) for r in mine) / len(mine),
            "ttft_p50_ms": stats.percentile([r.ttft for r in mine if r.ok], 50) * 1e3,
        }
    by_region = {}
    for region in sorted({r.region for r in recs}):
        mine = [r for r in recs if r.region == region]
        served = [r for r in mine if r.ok]
        by_region[region] = {
            "requests": len(mine),
            "shed_rate": sum(not r.ok for r in mine) / len(mine),
            "served_elsewhere": sum(sim.by_name[r.replica].region != region for r in served) / max(len(served), 1),
            "ttft_p50_ms": stats.percentile([r.ttft for r in served], 50) * 1e3,
        }
    replicas = {}
    for name, rep in sim.replicas.items():
        mine = [r for r in ok if r.replica == name]
        replicas[name] = {
            "region": sim.by_name[name].region,
            "requests": len(mine),
            "busy_fraction": rep.stats.busy_s / end if end > 0 else 0.0,
            "hit_rate": rep.stats.cached_tokens / rep.stats.prompt_tokens if rep.stats.prompt_tokens else 0.0,
            "evictions": rep.stats.evictions,
        }
    return {
        "policy": c.policy,
        "duration_s": duration,
        "conversations": sim.conversations,
        "requests": len(recs),
        "completed": len(ok),
        "refused": refused,
        "shed_rate": (len(recs) - len(ok)) / len(recs) if recs else 0.0,
        "goodput_requests_per_s": len(good) / duration,
        "slo_attainment": len(good) / len(recs) if recs else 0.0,
        "slo": {"ttft_s": c.slo_ttft_s, "tpot_s": c.slo_tpot_s},
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration,
        "kv_hit_rate": cached / prompt if prompt else 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "ttft_ms": stats.summarize((r.ttft for r in ok), 1e3),
        "tpot_ms": stats.summarize((r.tpot for r in ok), 1e3),
        "queued_ms": stats.summarize((r.queued_s for r in ok), 1e3),
        "fleet_cost_per_hour": cost_per_hour,
        "cost": cost,
        "cost_per_m_tokens": cost / out_tokens * 1e6 if out_tokens else None,
        "cost_per_m_good_tokens": cost / good_tokens * 1e6 if good_tokens else None,
        "by_priority": by_priority,
        "by_region": by_region,
        "replicas": replicas,
        "series": _series(sim, duration),
    }


def _series(sim: FleetSim, duration: float) -> dict[str, list[float]]:
    """Per time bucket: requests sent, completed within SLO, refused (per second) and TTFT p50 (ms)."""
    c = sim.config
    n = c.buckets
    width = duration / n
    sent = np.zeros(n)
    good = np.zeros(n)
    shed = np.zeros(n)
    ttfts: list[list[float]] = [[] for _ in range(n)]
    for r in sim.records:
        i = min(int(r.sent / width), n - 1)
        sent[i] += 1
        shed[i] += not r.ok
        good[i] += _met(r, c.slo_ttft_s, c.slo_tpot_s)
        if r.ok:
            ttfts[i].append(r.ttft)
    hours = [(i + 0.5) * width * c.workload.time_scale / 3600 for i in range(n)]
    return {
        "hour": hours,
        "sent_per_s": list(sent / width),
        "good_per_s": list(good / width),
        "shed_per_s": list(shed / width),
        "ttft_p50_ms": [stats.percentile(t, 50) * 1e3 for t in ttfts],
    }


COLUMNS = (
    ("policy", "policy", "{}"),
    ("goodput req/s", "goodput_requests_per_s", "{:.2f}"),
    ("SLO met", "slo_attainment", "{:.1%}"),
    ("shed", "shed_rate", "{:.1%}"),
    ("KV hit", "kv_hit_rate", "{:.1%}"),
    ("TTFT p50 ms", ("ttft_ms", "p50"), "{:.0f}"),
    ("TTFT p99 ms", ("ttft_ms", "p99"), "{:.0f}"),
    ("TPOT p50 ms", ("tpot_ms", "p50"), "{:.0f}"),
    ("tok/s", "output_tokens_per_s", "{:.0f}"),
    ("$/M tok", "cost_per_m_tokens", "{:.3f}"),
)


def _cell(summary: Mapping[str, Any], key: Any, fmt: str) -> str:
    value = summary[key[0]][key[1]] if isinstance(key, tuple) else summary[key]
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return fmt.format(value)


def rows(results: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    return [[_cell(s, key, fmt) for _, key, fmt in COLUMNS] for s in results.values()]


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The comparison as aligned text (stdout)."""
    head = [h for h, _, _ in COLUMNS]
    body = rows(results)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(line, widths, strict=True)))
             for line in [head, *body]]  # fmt: skip
    return "\n".join(lines)


def markdown(results: Mapping[str, Mapping[str, Any]], *, context: str, plots: Sequence[str], command: str) -> str:
    """A README-ready snippet: what was simulated, the table and the plots."""
    head = [h for h, _, _ in COLUMNS]
    lines = [
        f"Simulated ({context}):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for row in rows(results):
        row[0] = f"`{row[0]}`"
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Reproduce: `{command}`", ""]
    lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# ----- plots ------------------------------------------------------------------------------------------------------


def plot(results: Mapping[str, Mapping[str, Any]], out_dir: str, *, title: str) -> list[str]:
    """PNGs under `out_dir`: the policy comparison (bars), load and goodput over the day, TTFT over the day."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    paths = []
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    bars = (
        ("goodput (req/s)", lambda s: s["goodput_requests_per_s"]),
        ("shed rate", lambda s: s["shed_rate"]),
        ("KV hit rate", lambda s: s["kv_hit_rate"]),
        ("$ per M output tokens", lambda s: s["cost_per_m_tokens"] or 0.0),
    )
    colors = [f"C{i}" for i in range(len(names))]
    for ax, (label, fn) in zip(axes, bars, strict=True):
        ax.bar(names, [fn(results[n]) for n in names], color=colors)
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(_save(fig, plt, os.path.join(out_dir, "fleet_policies.png")))

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    first = results[names[0]]["series"]
    axes[0].plot(first["hour"], first["sent_per_s"], "k-", lw=1.5, label="sent (offered)")
    for i, n in enumerate(names):
        s = results[n]["series"]
        axes[0].plot(s["hour"], s["good_per_s"], "-", color=colors[i], label=f"{n}: within SLO")
        axes[0].plot(s["hour"], s["shed_per_s"], ":", color=colors[i], label=f"{n}: refused")
        axes[1].plot(s["hour"], s["ttft_p50_ms"], "-", color=colors[i], label=n)
    axes[0].set(xlabel="hour of day (UTC)", ylabel="requests/s", title="load, goodput and shedding")
    axes[1].set(xlabel="hour of day (UTC)", ylabel="TTFT p50 (ms)", title="TTFT p50 over the day", yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(_save(fig, plt, os.path.join(out_dir, "fleet_day.png")))
    return paths


def _save(fig: Any, plt: Any, path: str) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def json_safe(value: Any) -> Any:
    """Strict JSON: nan becomes null, infinities strings (as bench/runner.py writes them)."""
    if isinstance(value, float):
        if np.isnan(value):
            return None
        return value if np.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value
