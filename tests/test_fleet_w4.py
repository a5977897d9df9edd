"""W4 through the gateway over three real random-model replicas (processes of their own on loopback, bench/fleet_w4.py):
the cache-aware policy against round-robin (higher hit rate, fewer prompt tokens computed, lower TTFT, each with a
margin), each over the gateway's OpenAI API with a `fleet.router.Router` behind.

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

# 8 slots, 1024-token context, 384 pages of 16 tokens; the "small" random model (~3M parameters, bytes as tokens), so
# a prompt token recomputed costs prefill time and TTFT shows where routing made replicas recompute histories
CONFIG = fw.ReplicaConfig(model="small")
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

    # Measured on the small model (3 ABBA groups, 2-core Zen 5 VM, 2026-12-06): hit rate cache-aware 0.77-0.78,
    # round-robin 0.53-0.55; cache-aware computes 0.46-0.50 of round-robin's prompt tokens; TTFT p50 0.68-0.79 of
    # round-robin's (296-325 against 411-438 ms).
    assert ca["hit_rate"] >= rr["hit_rate"] + 0.10
    assert ca["computed_tokens"] <= 0.8 * rr["computed_tokens"]
    assert ca["ttft_ms"]["p50"] <= 0.9 * rr["ttft_ms"]["p50"]
    routed = ca["routed"].values()
    assert len(routed) == 3 and min(routed) >= 0.05 * sum(routed)  # every replica takes its part
