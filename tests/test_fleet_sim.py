"""The fleet simulator: hand-checked timings on a synthetic profile, the prefix cache, the router's policies and
admission as the simulator runs them, the `benchmark.py profile` command on the tiny model, and one simulated replica
against a real measured W3 run (tiny model, in-process server) within 15%.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from bench import runner
from fleet import admission as adm
from fleet import sim, sim_profile, sim_report
from fleet.config import ReplicaSpec
from fleet.sim_replica import SimReplica, SimRequest
from fleet.sim_workload import App, KeyClass, WorkloadConfig

# prefill call: 10 ms + 1 ms per token; dispatch: 5 ms + 20 ms per step; no host time
SYNTH = dict(prefill_fixed_s=0.01, prefill_per_token_s=0.001, decode_fixed_s=0.005, decode_per_step_s=0.02)


def _replica(**overrides) -> tuple[sim.EventLoop, SimReplica, list[SimRequest]]:
    loop = sim.EventLoop()
    done: list[SimRequest] = []
    profile = sim_profile.synthetic(**{**SYNTH, **overrides})
    return loop, SimReplica("r", profile, loop.at, on_done=lambda r, t: done.append(r)), done


def _one_request_fleet(rtt_ms: float) -> sim.FleetSim:
    """One replica in region "a", clients in region "b", one-turn chats of a 50-token system prompt + 10-token
    message, max_tokens 4."""
    workload = WorkloadConfig(
        hours=1, time_scale=1, region_share=(("b", 1.0, 0.0),), turns=(1, 1), message_tokens=(10, 10),
        max_tokens=(4, 4), apps=(App("x", 50, 1.0),), keys=(KeyClass("paid", 2, 1),), max_seq_len=512,
    )  # fmt: skip
    config = sim.SimConfig(
        workload=workload,
        replicas=(ReplicaSpec("a-0", "sim://a-0", "a", price_per_chip_hour=1.0),),
        rtt_ms={("a", "b"): rtt_ms},
        routing=dataclasses.replace(sim.SimConfig().routing, block_size=16),
    )
    return sim.FleetSim(config, sim_profile.synthetic(**SYNTH))


def test_one_request_ttft_is_prefill_plus_round_trip():
    fleet = _one_request_fleet(rtt_ms=100.0)
    fleet.loop.at(0.0, lambda t: fleet.start_conversation(t, "b"))
    summary = fleet.run(starts=False)
    (rec,) = fleet.records
    assert rec.ok and rec.prompt_tokens == 60 and rec.replica == "a-0"
    # 100 ms round trip + one prefill call of 60 tokens (10 + 60 ms)
    assert rec.ttft == pytest.approx(0.1 + 0.07)
    # then one 1-step dispatch (25 ms, a slot is free) per further token, the end arriving half a round trip later
    assert rec.e2e == pytest.approx(0.1 + 0.07 + (rec.output_tokens - 1) * 0.025)
    assert 2 <= rec.output_tokens <= 4
    assert summary["completed"] == 1 and summary["shed_rate"] == 0.0 and summary["kv_hit_rate"] == 0.0
    assert summary["cost"] == pytest.approx(1.0 * summary["duration_s"] / 3600)


def test_cache_hit_cuts_prefill_and_lru_evicts():
    loop, replica, done = _replica(page_size=16, kv_pages=8)
    a = SimRequest(0, 40, 8, 8, block_hashes=(1, 2), sequence_hashes=(1, 2, 3))
    loop.at(0.0, lambda t: replica.submit(a, t))
    loop.run()
    assert a.first_token == pytest.approx(0.01 + 0.04) and a.cached_tokens == 0
    # 40 + 8 tokens: three full pages (prompt and reply) stay cached after it ends
    assert replica.pages_cached == 3 and replica.pages_used == 0
    b = SimRequest(1, 40, 8, 8, block_hashes=(1, 2), sequence_hashes=(1, 2, 4))
    loop.at(loop.now + 1, lambda t: replica.submit(b, t))
    loop.run()
    # two cached pages (32 tokens): 8 computed, 10 + 8 ms instead of 10 + 40
    assert b.cached_tokens == 32 and b.first_token - b.arrived == pytest.approx(0.018)
    # a prompt needing every page (8 x 16 = 128 tokens reserved) evicts what is cached
    c = SimRequest(2, 100, 28, 28, block_hashes=(9, 8, 7, 6, 5, 4), sequence_hashes=())
    loop.at(loop.now + 1, lambda t: replica.submit(c, t))
    loop.run()
    assert c.cached_tokens == 0 and replica.stats.evictions >= 3 and len(done) == 3


def test_slots_and_memory_bound_admission():
    loop, replica, done = _replica(num_slots=2, page_size=16, kv_pages=64)
    reqs = [SimRequest(i, 16, 5, 5) for i in range(3)]
    for r in reqs:
        loop.at(0.0, lambda t, r=r: replica.submit(r, t))
    loop.run()
    first, second, third = reqs
    # the first two share one prefill call (10 + 32 ms), the third waits for a slot
    assert first.first_token == second.first_token == pytest.approx(0.042)
    assert third.first_token > first.done - 1e-9
    assert [r.generated for r in done] == [5, 5, 5]


def _w4_config(policy: str, **workload) -> sim.SimConfig:
    base = dict(hours=24, time_scale=24 * 60 / 2, peak_conversations_per_s=1.2, think_s=2.0, max_seq_len=2048)
    return sim.SimConfig(
        policy=policy,
        workload=WorkloadConfig(**{**base, **workload}),
        replicas=tuple(ReplicaSpec(f"r{i}", f"sim://r{i}", "us-east", price_per_chip_hour=0.1) for i in range(4)),
    )


def _w4_profile() -> sim_profile.StepProfile:
    return sim_profile.synthetic(num_slots=8, kv_pages=160, page_size=64, max_seq_len=2048, max_prefill_len=256,
                                 decode_steps=8, prefill_fixed_s=0.02, prefill_per_token_s=0.0005,
                                 decode_fixed_s=0.005, decode_per_step_s=0.03, prefill_token_budget=256)  # fmt: skip


def test_cache_aware_beats_round_robin_on_multiturn_chats():
    profile = _w4_profile()
    results = {p: sim.FleetSim(_w4_config(p), profile).run() for p in ("round_robin", "cache_aware")}
    rr, ca = results["round_robin"], results["cache_aware"]
    assert rr["requests"] > 300 and ca["requests"] > 300
    # each conversation's history is cached where its last turn ran: only affinity finds it again
    assert ca["kv_hit_rate"] > rr["kv_hit_rate"] + 0.1
    assert ca["ttft_ms"]["p50"] < rr["ttft_ms"]["p50"]
    # bounded by load: no replica takes more than half the requests though one system prompt dominates
    busiest = max(r["requests"] for r in ca["replicas"].values())
    assert busiest <= 0.5 * ca["completed"]
    table = sim_report.table(results)
    assert "cache_aware" in table and "round_robin" in table
    md = sim_report.markdown(results, context="test", plots=["a.png"], command="x")
    assert "| `cache_aware` |" in md and "![a](a.png)" in md


def test_overload_sheds_with_reason_and_paid_first():
    profile = _w4_profile()
    config = dataclasses.replace(
        _w4_config("least_load", peak_conversations_per_s=8.0, keys=(KeyClass("paid", 2, 10), KeyClass("free", 0, 10))),
        admission=adm.AdmissionConfig(max_queued=16, max_wait=2.0),
    )
    out = sim.FleetSim(config, profile).run()
    assert out["shed_rate"] > 0.05 and set(out["refused"]) == {adm.FULL}
    assert out["by_priority"]["2"]["shed_rate"] < out["by_priority"]["0"]["shed_rate"]
    assert out["completed"] + sum(out["refused"].values()) == out["requests"]  # nothing silently dropped


def test_profile_interpolation_and_scaling():
    p = sim_profile.synthetic(**SYNTH, max_prefill_len=256)
    assert p.prefill_seconds(100) == pytest.approx(0.11)
    assert p.prefill_seconds(300) == pytest.approx(0.01 + 0.256 + 0.01 + 0.044)  # two calls
    assert p.decode_seconds(2, 100, 1) == pytest.approx(0.025)
    assert p.decode_seconds(2, 100, 3) == pytest.approx(0.065)  # linear in steps between 1 and 4
    p.doc["limits"] = {"bandwidth_gb_s": 33.5, "peak_tflop_s": 0.989}
    h = sim_profile.scaled(p, "h100")
    assert h.source == "scaled" and "SCALED" in h.describe()
    assert h.prefill_seconds(100) == pytest.approx(0.11 * 1e-3)
    assert h.decode_seconds(2, 100, 1) == pytest.approx(0.025 * 0.01 * 2 / 4)  # f32 measured, bf16 there


# ----- against the real engine (tiny random model) -------------------------------------------------------------------

TINY = dict(
    random_model="tiny",
    dtype="float32",
    num_slots=4,
    slot_counts=(1,),
    max_seq_len=128,
    max_prefill_len=32,
    page_size=16,
    decode_steps=4,
    ttft_prompt_lens=(16, 32),
    contexts=(48,),
    repeats=1,
    bandwidth_mb=16,
    matmul_n=256,
    max_tokens=16,
    progress=False,
)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> tuple[str, sim_profile.StepProfile]:
    out = tmp_path_factory.mktemp("profile")
    _, path, _ = runner.run_command("profile", runner.Options(**TINY), str(out), draw=False)
    return path, sim_profile.load_profile(path)


def test_profile_command_writes_a_usable_profile(tiny_profile):
    path, profile = tiny_profile
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    fig = doc["figures"]
    assert doc["command"] == "profile" and doc["machine"]["platform"] == "cpu"
    assert fig["source"] == "measured" and fig["host"]["cpu_model"]
    assert {(r["tokens"], r["context"]) for r in fig["prefill"]} == {(16, 0), (32, 0), (16, 48), (32, 48)}
    # slots 1 and all 4 (the engine's), dispatches of 1 step (a slot is free) and of decode_steps
    assert {(r["batch"], r["steps"]) for r in fig["decode"]} == {(1, 1), (1, 4), (4, 1), (4, 4)}
    assert all(r["seconds"] > 0 for r in fig["prefill"] + fig["decode"])
    assert fig["limits"]["bandwidth_gb_s"] > 0 and fig["host_overhead"]["seconds_per_step"] >= 0
    assert profile.num_slots == 4 and profile.page_size == 16 and profile.kv_pages == 4 * 128 // 16
    assert profile.prefill_seconds(24, 10) > 0 and profile.decode_seconds(3, 40, 2) > 0
    assert "tiny-random-llama" in profile.describe()


def test_one_replica_within_15_percent_of_measured_w3(tiny_profile, tmp_path):
    _, profile = tiny_profile
    # W3's shape on the tiny model: random 24-token prompts, 16 tokens each, Poisson arrivals at 40 req/s
    opts = runner.Options(**{**TINY, "random_prompt_lens": (24,), "num_prompts": 8, "num_requests": 32,
                             "request_rates": (40.0,), "warmup_requests": 2, "seed": 3})  # fmt: skip
    doc, _, _ = runner.run_command("serve", opts, str(tmp_path), draw=False)
    (run,) = doc["figures"]["runs"]
    assert run["summary"]["completed"] == 32
    result = sim.replay_w3(profile, doc)
    assert result["requests"] == 32 and math.isfinite(result["ratio"])
    assert abs(result["ratio"] - 1) <= 0.15, result
