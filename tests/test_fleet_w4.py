"""W4 through the gateway over three real tiny-model replicas (processes of their own on loopback, bench/fleet_w4.py):
the cache-aware policy against round-robin, each over the gateway's OpenAI API with a `fleet.router.Router` behind.

24 users of three applications (a shared system prompt each) talk for 7 turns at once, resending the whole history
every turn. Each replica's KV pool holds a third of the conversations, not all of them, so where a turn goes decides
what it finds cached: round-robin scatters a conversation over the fleet, cache-aware keeps it where its pages are.

The runs share one set of replicas (starting three takes 10-40 s on two busy cores): run i tags its system prompts
"[run i]", so no run finds another's pages (same users, messages and lengths otherwise), and the order is ABBA so
that neither policy always meets the fresher pools. Every wait is bounded (bench.fleet_w4.START_TIMEOUT, the W4
client's timeout).
"""

from __future__ import annotations

from bench import fleet_w4 as fw

CONFIG = fw.ReplicaConfig()  # 8 slots, 1024-token context, 384 pages of 16 tokens
SPEC = fw.chat_spec(users=24, turns=7, stagger_s=0.05, max_tokens=24)
ORDER = ("cache_aware", "round_robin", "round_robin", "cache_aware")


def test_cache_aware_routing_beats_round_robin_on_w4(tmp_path):
    reports = fw.compare(SPEC, CONFIG, order=ORDER, fresh=False, log_dir=str(tmp_path))
    figs = fw.by_policy(reports)
    ca, rr = figs["cache_aware"], figs["round_robin"]
    print("\n".join(fw.table(figs)))  # shown with -s, and on failure

    runs = 2 * SPEC.users * SPEC.turns
    for f in (ca, rr):
        assert f["failures"] == [] and f["skipped"] == 0 and f["completed"] == f["requests"] == runs
    requests = [q for r in reports for q in r["requests"]]
    assert all(q["cached_tokens"] is not None for q in requests)  # every hit figure is the replica's usage
    # sized so that routing matters: every conversation's last prompt, together, is over twice one replica's pool
    last = sum(q["prompt_tokens"] for q in reports[0]["requests"] if q["turn"] == SPEC.turns)
    assert last > 2 * CONFIG.kv_pages * CONFIG.page_size

    # Measured (8 ABBA groups, 2 shared cores): hit rate cache-aware 0.63-0.68, round-robin 0.41-0.43 (the ideal
    # ~0.85); cache-aware computes 0.55-0.64 of round-robin's prompt tokens.
    assert ca["hit_rate"] >= rr["hit_rate"] + 0.10
    assert ca["computed_tokens"] <= 0.8 * rr["computed_tokens"]
    # TTFT: on the tiny model a prompt token costs next to nothing; TTFT is the gateway, the router, gRPC and the
    # wait for a decode dispatch on two shared cores. Cache-aware's p50 measured 0.80-0.96 of round-robin's: lower
    # every time, but too close to assert "lower" with margin, so the margin is asserted on the computed prompt
    # tokens above (what TTFT follows once prefill costs, as on a real model). TTFT must at least not be worse by
    # more than noise, as it would be if affinity piled the conversations onto one replica.
    assert ca["ttft_ms"]["p50"] <= 1.15 * rr["ttft_ms"]["p50"]
    routed = ca["routed"].values()
    assert len(routed) == 3 and min(routed) >= 0.05 * sum(routed)  # every replica takes its part
