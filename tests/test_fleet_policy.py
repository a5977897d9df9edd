"""The fleet's pure parts: routing policies, ejection hysteresis, the admission queue and refusals, the replicas
config file. No servers: replicas are `ReplicaView`s whose load the tests set by hand."""

from __future__ import annotations

import collections
import json
import os

import pytest

from fleet import admission, config, policy
from fleet.admission import AdmissionConfig, AdmissionQueue
from fleet.policy import EjectionConfig, Ejector, ReplicaView, RouteRequest, RoutingConfig


def views(n: int = 3, **fields) -> list[ReplicaView]:
    return [ReplicaView(name=f"r{i}", **{"num_slots": 64, **fields}) for i in range(n)]


def prompt(seed: int, blocks: int, block: int = 64) -> list[int]:
    return [(seed * 7919 + i) % 50000 for i in range(blocks * block)]


# ----- block hashes -------------------------------------------------------------------------------------------------


def test_block_hashes_are_a_chain_over_full_blocks():
    a = [*prompt(1, 3), 1, 2, 3]  # a partial last block is not hashed (the engine caches whole pages)
    b = prompt(1, 3)[:128] + [9] * 64
    ha, hb = policy.block_hashes(a), policy.block_hashes(b)
    assert len(ha) == 3 and len(hb) == 3
    assert ha[:2] == hb[:2] and ha[2] != hb[2]
    # a block equal to another's at a different position hashes differently (the chain includes what precedes it)
    c = [5] * 128
    hc = policy.block_hashes(c)
    assert hc[0] != hc[1]
    assert policy.block_hashes([1] * 63) == ()
    assert policy.block_hashes(list(range(32)), block_size=16) == policy.block_hashes(list(range(32)), 16)


# ----- policies -----------------------------------------------------------------------------------------------------


def test_hot_system_prompt_from_64_users_spreads_over_replicas():
    """64 users, one 512-token system prompt, each a different question, arriving together: the cache-aware policy
    keeps the prefix's affinity only within the load slack, so no replica takes more than 1/3 + a margin."""
    replicas = views(3, num_slots=32)
    p = policy.make_policy("cache_aware")
    system = prompt(0, 8)
    counts = collections.Counter()
    for user in range(64):
        ids = system + prompt(user + 1, 2)
        chosen = p.pick(RouteRequest(key=f"user{user}", block_hashes=policy.block_hashes(ids)), replicas, now=0.0)
        assert chosen is not None
        counts[chosen.name] += 1
    assert sum(counts.values()) == 64
    assert max(counts.values()) <= 64 * (1 / 3 + 0.1), counts
    assert len(counts) == 3
    # and the affinity still holds where load allows: after the burst, every replica holds the system prompt
    request = RouteRequest(block_hashes=policy.block_hashes(system))
    assert all(p.cached_blocks(request, r) == 8 for r in replicas)


def test_cache_aware_follows_the_conversation_while_load_allows():
    replicas = views(3)
    p = policy.make_policy("cache_aware", RoutingConfig(load_slack=0.25))
    turn1 = prompt(3, 4)
    first = p.pick(RouteRequest(block_hashes=policy.block_hashes(turn1)), replicas, 0.0)
    # the other replicas get more load, but within the slack: the next turn still goes where its prefix is
    for r in replicas:
        if r is not first:
            r.active_slots = 2
    first.active_slots = 8  # 8/64 + in-flight: within 0.25 of 2/64
    turn2 = turn1 + prompt(4, 2)
    again = p.pick(RouteRequest(block_hashes=policy.block_hashes(turn2)), replicas, 1.0)
    assert again is first
    # past the slack, least-load wins over affinity
    first.active_slots = 40
    third = p.pick(RouteRequest(block_hashes=policy.block_hashes(turn2)), replicas, 2.0)
    assert third is not first


def test_a_short_shared_prefix_is_no_affinity_but_a_large_enough_share_is():
    """A one-page system prompt every user shares is 1 of a 6-block prompt's blocks: below `min_cached_share` it does
    not draw the request to a busier replica holding it; a conversation whose history is most of the prompt does."""
    system = prompt(0, 1)
    holder, idle, other = views(3)
    p = policy.make_policy("cache_aware")
    p.observe(holder, policy.block_hashes(system), 0.0)
    holder.active_slots, other.active_slots = 2, 4  # the holder is not the least loaded, but within the slack
    user = RouteRequest(block_hashes=policy.block_hashes(system + prompt(1, 5)))
    assert p.cached_blocks(user, holder) == 1 and p.affinity(user, holder) == 0
    assert p.pick(user, [holder, idle, other], 1.0) is idle
    # without the threshold, the one shared block wins over load (the trap this guards against)
    blind = policy.make_policy("cache_aware", RoutingConfig(min_cached_share=0.0))
    blind.observe(holder, policy.block_hashes(system), 0.0)
    assert blind.pick(user, [holder, idle, other], 1.0) is holder
    # a conversation's next turn: 4 of its 6 blocks held (>= half) is affinity, within the slack
    history = system + prompt(2, 3)
    p.observe(other, policy.block_hashes(history), 2.0)
    turn = RouteRequest(block_hashes=policy.block_hashes(history + prompt(3, 2)))
    assert p.affinity(turn, other) == 4
    assert p.pick(turn, [holder, idle, other], 3.0) is other
    # and a minimum number of blocks: a whole 2-block prompt held is not enough when 3 are required
    few = policy.make_policy("cache_aware", RoutingConfig(min_cached_blocks=3))
    short = policy.block_hashes(prompt(4, 2))
    few.observe(holder, short, 0.0)
    assert few.affinity(RouteRequest(block_hashes=short), holder) == 0
    assert few.pick(RouteRequest(block_hashes=short), [holder, idle, other], 4.0) is idle


def test_simultaneous_picks_see_each_other():
    """Two picks in the same instant, with no load report in between, land on different replicas."""
    for name in ("least_load", "cache_aware", "round_robin"):
        replicas = views(3, num_slots=4)
        p = policy.make_policy(name)
        picked = [p.pick(RouteRequest(), replicas, now=5.0).name for _ in range(3)]
        assert sorted(picked) == ["r0", "r1", "r2"], (name, picked)
        assert [r.in_flight for r in replicas] == [1, 1, 1]
        assert [r.sent_since_load for r in replicas] == [1, 1, 1]
        for r in replicas:
            p.release(r)
        assert [r.in_flight for r in replicas] == [0, 0, 0]
        # a stale report still counting requests that ended since does not make the replica look busy
        replicas[0].active_slots, replicas[0].sent_since_load, replicas[0].finished_since_load = 3, 0, 3
        assert policy.requests_on(replicas[0]) == 0


def test_least_load_counts_kv_pages_waiting_and_weight():
    a, b = views(2, num_slots=8, kv_pages_total=100)
    a.kv_pages_used = 90  # few requests but almost no KV memory left
    b.active_slots, b.waiting = 4, 1
    p = policy.make_policy("least_load")
    assert p.pick(RouteRequest(), [a, b], 0.0) is b
    # a heavier replica takes proportionally more
    c, d = views(2, num_slots=8)
    c.weight = 3.0
    names = collections.Counter(p.pick(RouteRequest(), [c, d], 0.0).name for _ in range(8))
    assert names["r0"] == 6 and names["r1"] == 2, names


def test_round_robin_is_weighted_and_interleaved():
    replicas = views(3)
    replicas[0].weight = 2.0
    p = policy.make_policy("round_robin")
    order = []
    for _ in range(8):
        r = p.pick(RouteRequest(), replicas, 0.0)
        order.append(r.name)
        p.release(r)
    assert collections.Counter(order) == {"r0": 4, "r1": 2, "r2": 2}
    assert "r0r0" not in "".join(order[:4])  # smooth: r0's turns are spread out


def test_region_preferred_then_spill_and_none_when_full():
    local, remote = views(2, num_slots=2)
    local.region, remote.region = "eu", "us"
    p = policy.make_policy("least_load", RoutingConfig(queue_per_slot=0.0))
    remote.active_slots = 0
    local.active_slots = 1  # busier than remote, but the client's region wins while it has room
    assert p.pick(RouteRequest(region="eu"), [local, remote], 0.0) is local
    # local is now at its bound (2 slots, no queue allowance): spill to the other region
    assert p.pick(RouteRequest(region="eu"), [local, remote], 0.0) is remote
    assert p.pick(RouteRequest(region="eu"), [local, remote], 0.0) is remote
    assert p.pick(RouteRequest(region="eu"), [local, remote], 0.0) is None


def test_unavailable_replicas_are_never_picked():
    replicas = views(3)
    replicas[0].healthy = False
    replicas[1].draining = True
    p = policy.make_policy()
    assert p.name == policy.DEFAULT_POLICY == "cache_aware"
    assert {p.pick(RouteRequest(), replicas, 0.0).name for _ in range(5)} == {"r2"}
    replicas[2].num_slots = 0
    assert p.pick(RouteRequest(), replicas, 0.0) is None
    with pytest.raises(ValueError, match="round_robin"):
        policy.make_policy("random")


# ----- ejection -----------------------------------------------------------------------------------------------------


def test_ejection_hysteresis():
    e = Ejector(EjectionConfig(failures_to_eject=2, successes_to_readmit=2, cooldown=1.0, stable_after=30.0))
    assert not e.failure(0.0, "UNAVAILABLE")  # one failure is not enough
    e.success(0.1)  # a served request starts the count over
    assert not e.failure(0.2, "UNAVAILABLE")
    assert e.failure(0.3, "UNAVAILABLE") and e.ejected and e.reason == "UNAVAILABLE"
    # SERVING probes during the cooldown do not readmit; after it, two in a row do
    assert not e.probe(policy.SERVING, 0.8)
    assert not e.probe(policy.SERVING, 1.4)
    assert e.probe(policy.SERVING, 1.5) and e.admits()
    # ejected again soon after (flapping): the cooldown doubles
    assert e.probe(policy.NOT_SERVING, 2.0) and e.ejected
    assert not e.probe(policy.SERVING, 3.5) and not e.probe(policy.SERVING, 3.9)
    assert not e.probe(policy.SERVING, 4.0) and e.probe(policy.SERVING, 4.1)
    assert e.ejections == 2
    # an unreachable probe counts like a failed request; it never sticks once the replica serves again
    assert not e.probe(policy.UNREACHABLE, 100.0)
    assert e.probe(policy.UNREACHABLE, 100.5) and e.ejected
    assert not e.probe(policy.SERVING, 200.0)
    assert e.probe(policy.SERVING, 200.5) and not e.ejected


# ----- admission ----------------------------------------------------------------------------------------------------


def test_priority_bands_admit_paid_before_free():
    q = AdmissionQueue(AdmissionConfig(max_queued=8, max_wait=10.0))
    for i in range(3):
        q.push(f"free{i}", key="f", priority=0, now=float(i))
    q.push("paid", key="p", priority=2, now=5.0)
    q.push("std", key="s", priority=1, now=6.0)
    assert [q.pop().item for _ in range(5)] == ["paid", "std", "free0", "free1", "free2"]
    assert q.pop() is None and len(q) == 0


def test_full_queue_sheds_lowest_band_for_a_higher_one():
    q = AdmissionQueue(AdmissionConfig(max_queued=3, max_wait=10.0))
    for i in range(3):
        assert q.push(f"free{i}", key="f", priority=0, now=float(i)) is not None
    assert q.push("free3", key="g", priority=0, now=3.0) is None  # same band: refused, nobody shed
    assert q.take_shed() == []
    assert q.push("paid", key="p", priority=2, now=4.0) is not None
    assert [w.item for w in q.take_shed()] == ["free2"]  # the newest of the lowest band
    assert [q.pop().item for _ in range(3)] == ["paid", "free0", "free1"]


def test_a_key_sending_ten_times_more_gets_its_fair_share():
    q = AdmissionQueue(AdmissionConfig(max_queued=1000))
    t = 0.0
    for i in range(50):  # the heavy key arrives first and sends 10x
        q.push(("heavy", i), key="heavy", priority=1, now=t)
        t += 0.01
    for k in range(4):
        for i in range(5):
            q.push((f"k{k}", i), key=f"k{k}", priority=1, now=t)
            t += 0.01
    first = [q.pop().item[0] for _ in range(25)]
    counts = collections.Counter(first)
    assert counts["heavy"] == 5, counts  # 1 in 5 keys: its share, not 50 / 70 of it
    assert all(counts[f"k{k}"] == 5 for k in range(4))
    # within a key, its own requests keep their order
    q2 = AdmissionQueue()
    for i in range(3):
        q2.push(i, key="a", priority=0, now=0.0)
    assert [q2.pop().item for _ in range(3)] == [0, 1, 2]


def test_queue_time_limit_and_removal():
    q = AdmissionQueue(AdmissionConfig(max_wait=2.0))
    a = q.push("a", key="x", priority=0, now=0.0)
    b = q.push("b", key="y", priority=0, now=1.0)
    q.push("c", key="x", priority=0, now=1.5)
    assert q.next_deadline() == 2.0
    assert q.remove(b) and not q.remove(b)
    assert q.expire(1.9) == []
    assert [w.item for w in q.expire(3.5)] == ["a", "c"]
    assert a.deadline == 2.0 and len(q) == 0 and q.peek() is None


def test_refusal_says_absent_draining_or_full():
    replicas = views(2, num_slots=4)
    full = admission.refusal(replicas, queued=16)
    assert full.reason == admission.FULL and "full (16 waiting)" in full.message
    assert full.retry_after == pytest.approx(2.0)  # 16 waiting over 8 slots
    assert "waited 3.0 s" in admission.refusal(replicas, waited=3.0).message
    replicas[0].draining = True
    replicas[1].healthy = False
    draining = admission.refusal(replicas)
    assert draining.reason == admission.DRAINING and "r0" in draining.message
    replicas[0].draining = False
    replicas[0].healthy = False
    absent = admission.refusal(replicas)
    assert absent.reason == admission.ABSENT and "2 configured" in absent.message
    assert admission.refusal([]).reason == admission.ABSENT
    assert absent.retry_after > draining.retry_after > 0


# ----- config -------------------------------------------------------------------------------------------------------


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_reads_toml_and_json(tmp_path):
    toml = write(
        tmp_path,
        "fleet.toml",
        """
[[replicas]]
name = "eu-1"
address = "127.0.0.1:50051"
region = "eu"
pool = "v5e-8"
price_per_chip_hour = 1.2
chips = 8
weight = 2

[[replicas]]
address = "127.0.0.1:50061"
region = "us"
""",
    )
    specs = config.load(toml)
    assert [s.name for s in specs] == ["eu-1", "127.0.0.1:50061"]
    assert specs[0].weight == 2.0 and specs[0].chips == 8 and specs[0].cost_per_hour == pytest.approx(9.6)
    assert specs[1].region == "us" and specs[1].weight == 1.0 and specs[1].price_per_chip_hour == 0.0
    data = {"replicas": [{"name": "a", "address": "h:1", "region": "eu"}]}
    js = write(tmp_path, "fleet.json", json.dumps(data))
    assert config.load(js)[0].address == "h:1"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"replicas": []}', "replicas: at least one replica"),
        ('{"replica": [{"address": "h:1"}]}', "replica: unknown field (the file holds `replicas`)"),
        ('{"replicas": [{"name": "a"}]}', "replicas[0].address: required"),
        ('{"replicas": [{"address": "nohost"}]}', "replicas[0].address: 'nohost' is not host:port"),
        ('{"replicas": [{"address": "h:1", "weight": 0}]}', "replicas[0].weight: must be > 0"),
        ('{"replicas": [{"address": "h:1", "price_per_chip_hour": -1}]}', "replicas[0].price_per_chip_hour"),
        ('{"replicas": [{"address": "h:1", "colour": "red"}]}', "replicas[0].colour: unknown field"),
        ('{"replicas": [{"address": "h:1"}, {"address": "h:1"}]}', "replicas[1].name: 'h:1' is used twice"),
        ('{"replicas": [{"address": "h:1", "region": 3}]}', "replicas[0].region: must be a string"),
        ("{not json", "not valid JSON"),
    ],
)
def test_config_errors_name_the_field(tmp_path, text, error):
    path = write(tmp_path, "bad.json", text)
    with pytest.raises(config.ConfigError, match=None) as info:
        config.load(path)
    message = str(info.value)
    assert error in message and "\n" not in message, message
    assert message.startswith(path)


def test_config_watcher_reloads_on_change_and_keeps_the_last_good(tmp_path):
    path = write(tmp_path, "fleet.json", json.dumps({"replicas": [{"address": "h:1"}]}))
    watcher = config.ConfigWatcher(path)
    assert [s.address for s in watcher.specs] == ["h:1"]
    assert watcher.poll() is None  # unchanged
    with open(path, "w") as f:
        json.dump({"replicas": [{"address": "h:1"}, {"address": "h:2", "region": "us"}]}, f)
    os.utime(path, (1e9, 1e9))  # a distinct mtime, whatever the clock's resolution
    assert [s.address for s in watcher.poll()] == ["h:1", "h:2"]
    with open(path, "w") as f:
        f.write('{"replicas": [{"address": 5}]}')
    os.utime(path, (2e9, 2e9))
    assert watcher.poll() is None and "replicas[0].address" in watcher.error
    assert [s.address for s in watcher.specs] == ["h:1", "h:2"]


def test_enqueue_and_drain_hand_out_in_turn_and_never_let_the_head_be_overtaken():
    """The glue the router and the simulator share: drain yields lazily in the queue's order, drops items whose
    caller went away, and stops at the first item that finds no room even if a later one would."""
    q = AdmissionQueue(AdmissionConfig(max_queued=3, max_wait=10.0))
    assert admission.enqueue(q, "free-a", key="a", priority=0, now=0.0)[1] == []
    admission.enqueue(q, "free-newest", key="b", priority=0, now=0.5)
    admission.enqueue(q, "paid", key="c", priority=2, now=0.0)
    waiter, shed = admission.enqueue(q, "paid-2", key="d", priority=2, now=0.0)  # full: sheds the newest free one
    assert waiter is not None and [w.item for w in shed] == ["free-newest"]
    rooms = iter(["r0", "r1"])
    picked = []
    for w, room in admission.drain(q, lambda item: next(rooms, None)):
        picked.append((w.item, room))
        assert len(q) == 3 - len(picked)  # popped before the caller sees it
    assert picked == [("paid", "r0"), ("paid-2", "r1")] and len(q) == 1
    # the head finds no room: nothing behind it is handed out
    admission.enqueue(q, "free-b", key="b", priority=0, now=1.0)
    assert list(admission.drain(q, lambda item: None if item == "free-a" else "r2")) == [] and len(q) == 2
    # a head whose caller went away is dropped, and the next one goes
    out = list(admission.drain(q, lambda item: "r3", gone=lambda item: item == "free-a"))
    assert [(w.item, room) for w, room in out] == [("free-b", "r3")] and len(q) == 0
