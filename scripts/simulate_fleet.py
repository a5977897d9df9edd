"""Simulate a no-autoscale fleet for a day under each routing policy (fleet/sim.py), from a measured engine profile.

    python scripts/simulate_fleet.py                                     # the bundled SmolLM2 CPU profile, 6 replicas
    python scripts/simulate_fleet.py --policies=cache_aware,round_robin --hours=24 --time_scale=24 --markdown
    python scripts/simulate_fleet.py --replicas=fleet.toml --rtt_ms=us-east:eu-west=80 --slo_ttft_ms=1500
    python scripts/simulate_fleet.py --scale_to=h100                     # the profile scaled (NOT measured) to H100
    python scripts/simulate_fleet.py --validate_w3=bench_results/serve-....json   # one replica vs a measured W3 run

Profiles come from `scripts/benchmark.py profile` (bench/step_profile.py). The replicas file is the router's own
(fleet/config.py); without one, six replicas scattered over three regions. Writes <output_dir>/fleet_sim-<time>.json
(flags, profile, every policy's figures), PNG plots, and with --markdown a README-ready snippet (fleet_sim.md);
prints the comparison table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

# Run as a plain script, Python puts scripts/ on the path, not the repository root that holds the packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from fleet import admission as adm
from fleet import config as fleet_config
from fleet import policy as pol
from fleet import sim, sim_profile, sim_report
from fleet.sim_workload import WorkloadConfig

_PROFILE = flags.DEFINE_string("profile", sim_profile.DEFAULT_PROFILE, "Step profile JSON (benchmark.py profile).")
_SCALE_TO = flags.DEFINE_enum(
    "scale_to", None, ["tpu_v5e", "tpu_v6e", "h100", "h200"], "Scale the profile to this device by the roofline ratio."
)
_WRITE_SCALED = flags.DEFINE_string("write_scaled", None, "With --scale_to: write the scaled profile here and exit.")
_REPLICAS = flags.DEFINE_string("replicas", None, "The router's replicas file (TOML / JSON); default: 6 replicas.")
_RTT_MS = flags.DEFINE_list("rtt_ms", [], "Round trips between regions, a:b=ms (default: us-east, eu-west, ap-south).")
_LOCAL_RTT_MS = flags.DEFINE_float("local_rtt_ms", sim.LOCAL_RTT_MS, "Round trip within a region, ms.")
_POLICIES = flags.DEFINE_list("policies", ["round_robin", "least_load", "cache_aware"], "Routing policies compared.")
_HOURS = flags.DEFINE_float("hours", 24.0, "Hours of the day simulated.")
_TIME_SCALE = flags.DEFINE_float("time_scale", 48.0, "Compression of the day's load envelope (48: a day in 30 min).")
_PEAK = flags.DEFINE_float("peak_conversations_per_s", 2.0, "Conversations/s were every region at its peak at once.")
_BURSTS = flags.DEFINE_float("bursts_per_day", 6.0, "Bursts per (uncompressed) day.")
_BURST_FACTOR = flags.DEFINE_float("burst_factor", 3.0, "A burst multiplies its region's rate by this.")
_THINK_S = flags.DEFINE_float("think_s", 8.0, "Mean think time between turns, seconds.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the workload.")
_SLO_TTFT_MS = flags.DEFINE_float("slo_ttft_ms", 2000.0, "Goodput SLO on TTFT, ms (client side, round trip included).")
_SLO_TPOT_MS = flags.DEFINE_float("slo_tpot_ms", 250.0, "Goodput SLO on TPOT, ms.")
_LOAD_POLL_S = flags.DEFINE_float("load_poll_s", 0.5, "Seconds between two load reports (the router polls).")
_LOAD_SLACK = flags.DEFINE_float("load_slack", pol.RoutingConfig.load_slack, "cache_aware: load slack.")
_QUEUE_PER_SLOT = flags.DEFINE_float("queue_per_slot", pol.RoutingConfig.queue_per_slot, "Replica bound per slot.")
_MAX_QUEUED = flags.DEFINE_integer("max_queued", adm.AdmissionConfig.max_queued, "Gateway queue bound.")
_MAX_WAIT_S = flags.DEFINE_float("max_wait_s", adm.AdmissionConfig.max_wait, "Gateway queue time limit, seconds.")
_VALIDATE_W3 = flags.DEFINE_string("validate_w3", None, "A `benchmark.py serve` W3 JSON: replay it on one replica.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "bench_results/fleet_sim", "Where JSON, plots and markdown go.")
_PLOT = flags.DEFINE_bool("plot", True, "Draw PNG plots.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Write and print a README-ready markdown snippet.")


def _rtts(values: list[str]) -> dict[tuple[str, str], float]:
    if not values:
        return dict(sim.DEFAULT_RTT_MS)
    out = {}
    for v in values:
        try:
            pair, ms = v.split("=")
            a, b = pair.split(":")
            out[(a, b)] = float(ms)
        except ValueError:
            raise app.UsageError(f"--rtt_ms entries are region:region=ms, got {v!r}") from None
    return out


def config() -> sim.SimConfig:
    """The flags as a SimConfig (the one place flags meet the simulator)."""
    replicas = tuple(fleet_config.load(_REPLICAS.value)) if _REPLICAS.value else ()
    for name in _POLICIES.value:
        if name not in pol.POLICIES:
            raise app.UsageError(f"--policies: {name!r} is not one of {', '.join(sorted(pol.POLICIES))}")
    return sim.SimConfig(
        routing=pol.RoutingConfig(load_slack=_LOAD_SLACK.value, queue_per_slot=_QUEUE_PER_SLOT.value),
        admission=adm.AdmissionConfig(max_queued=_MAX_QUEUED.value, max_wait=_MAX_WAIT_S.value),
        workload=WorkloadConfig(
            hours=_HOURS.value,
            time_scale=_TIME_SCALE.value,
            peak_conversations_per_s=_PEAK.value,
            bursts_per_day=_BURSTS.value,
            burst_factor=_BURST_FACTOR.value,
            think_s=_THINK_S.value,
            seed=_SEED.value,
        ),
        replicas=replicas,
        rtt_ms=_rtts(_RTT_MS.value),
        local_rtt_ms=_LOCAL_RTT_MS.value,
        load_poll_s=_LOAD_POLL_S.value,
        slo_ttft_s=_SLO_TTFT_MS.value / 1e3,
        slo_tpot_s=_SLO_TPOT_MS.value / 1e3,
    )


def _config_json(c: sim.SimConfig, replicas: list) -> dict:
    out = dataclasses.asdict(c)
    out["rtt_ms"] = {f"{a}:{b}": ms for (a, b), ms in c.rtt_ms.items()}
    out["replicas"] = [dataclasses.asdict(r) for r in replicas]
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        profile = sim_profile.load_profile(_PROFILE.value)
        if _SCALE_TO.value:
            profile = sim_profile.scaled(profile, _SCALE_TO.value)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if _WRITE_SCALED.value:
        if not _SCALE_TO.value:
            raise app.UsageError("--write_scaled needs --scale_to")
        with open(_WRITE_SCALED.value, "w", encoding="utf-8") as f:
            json.dump({"machine": profile.machine, "figures": profile.doc}, f, indent=2)
        print(f"wrote {_WRITE_SCALED.value}: {profile.describe()}")
        return
    print(f"profile: {profile.describe()}")
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if _VALIDATE_W3.value:
        with open(_VALIDATE_W3.value, encoding="utf-8") as f:
            doc = json.load(f)
        rows = [sim.replay_w3(profile, doc, i) for i in range(len(doc["figures"]["runs"]))]
        for r in rows:
            print(
                f"W3 at rate {r['rate']}: measured {r['measured_output_tokens_per_s']:.1f} tok/s, simulated "
                f"{r['predicted_output_tokens_per_s']:.1f} tok/s ({r['ratio']:.3f}x; goal within 15%: "
                f"{'met' if abs(r['ratio'] - 1) <= 0.15 else 'NOT met'}); TTFT p50 {r['measured_ttft_p50_ms']:.0f} "
                f"vs {r['predicted_ttft_p50_ms']:.0f} ms, TPOT p50 {r['measured_tpot_p50_ms']:.0f} vs "
                f"{r['predicted_tpot_p50_ms']:.0f} ms"
            )
        path = os.path.join(_OUTPUT_DIR.value, f"fleet_validate-{stamp}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"profile": profile.describe(), "w3": _VALIDATE_W3.value, "runs": rows}, f, indent=2)
        print(f"wrote {path}")
        return
    try:
        cfg = config()
    except fleet_config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    started = time.time()
    results = sim.run_policies(cfg, profile, _POLICIES.value)
    print(sim_report.table(results))
    replicas = list(cfg.replicas or sim.default_fleet())
    regions = sorted({r.region for r in replicas})
    context = (
        f"{len(replicas)} replicas of {profile.describe()}; regions "
        + ", ".join(f"{g} {sum(r.region == g for r in replicas)}" for g in regions)
        + f"; {cfg.workload.hours:g} h of diurnal load compressed {cfg.workload.time_scale:g}x, "
        f"W4-style chats, SLO TTFT {cfg.slo_ttft_s * 1e3:.0f} ms / TPOT {cfg.slo_tpot_s * 1e3:.0f} ms"
    )
    pngs = (
        sim_report.plot(results, _OUTPUT_DIR.value, title=f"fleet simulation: {profile.model_name}")
        if _PLOT.value
        else []
    )
    given = {name: flags.FLAGS[name].value for name in flags.FLAGS if flags.FLAGS[name].present}
    command = "python scripts/simulate_fleet.py " + " ".join(f"--{k}={v}" for k, v in given.items() if k != "markdown")
    doc = {
        "command": "simulate_fleet",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": time.time() - started,
        "flags": given,
        "profile": {
            "path": profile.path,
            "describe": profile.describe(),
            "machine": profile.machine,
            "source": profile.source,
        },
        "config": _config_json(cfg, replicas),
        "context": context,
        "results": results,
        "plots": [os.path.basename(p) for p in pngs],
    }
    path = os.path.join(_OUTPUT_DIR.value, f"fleet_sim-{stamp}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(sim_report.json_safe(doc), f, indent=2)
    print(f"wrote {path}" + "".join(f", {p}" for p in pngs))
    if _MARKDOWN.value:
        snippet = sim_report.markdown(results, context=context, plots=pngs, command=command.strip())
        md = os.path.join(_OUTPUT_DIR.value, "fleet_sim.md")
        with open(md, "w", encoding="utf-8") as f:
            f.write(snippet)
        print(snippet)
        print(f"wrote {md}")


if __name__ == "__main__":
    app.run(main)
