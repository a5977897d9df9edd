"""The fleet router over three real tiny-model replicas, each a process of its own on loopback (tests/fleet_support.py),
so that one can be SIGKILLed or SIGTERMed: routing and the streams it relays, a client's bad requests never ejecting
a replica, a full fleet queueing then refusing with a reason, the replicas file reloaded live, the gateway serving
over a router (in-process and as `scripts/gateway.py --replicas`), a replica killed under load (every stream
completes, a cut greedy stream's text equals the uninterrupted one) and a replica drained (no new work, its streams
finish). The destructive tests run last. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from fleet import admission
from fleet.admission import AdmissionConfig
from fleet.config import ReplicaSpec
from fleet.policy import RoutingConfig
from fleet.router import Router, RouterConfig
from gateway.gate import GateError
from gateway.open_gate import OpenGate
from gateway.server import Gateway, GatewayConfig
from protos.meshserve.v1 import meshserve_pb2 as pb
from tests.fleet_support import ROOT, Child, start_replicas

STEP_DELAY = 0.03  # seconds before each decode dispatch: streams last long enough to be cut mid-way
MAX_TOKENS = 48
FAST = RouterConfig(poll_period=0.2, probe_timeout=2.0, reload_period=0.2)
# 70 bytes (byte-level tokens): one whole 64-token page to be cached, and room for MAX_TOKENS in the 128 context
PROMPTS = [f"user {i:02d} asks: tell me about the fleet, its regions and replicas, ok?" for i in range(12)]
assert all(64 <= len(p) <= 128 - MAX_TOKENS - 10 for p in PROMPTS)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> list[Child]:
    children = start_replicas(3, str(tmp_path_factory.mktemp("fleet")), f"--step_delay={STEP_DELAY}")
    yield children
    for child in children:
        child.stop()


def specs(children: list[Child], regions=("eu", "eu", "us")) -> list[ReplicaSpec]:
    return [
        ReplicaSpec(name=f"r{i}", address=c.address, region=regions[i], price_per_chip_hour=1.5, chips=2)
        for i, c in enumerate(children)
    ]


def greedy(prompt: str, max_tokens: int = MAX_TOKENS, **sampling) -> pb.GenerateRequest:
    options = pb.SamplingOptions(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **sampling)
    return pb.GenerateRequest(request_id=f"t-{abs(hash(prompt)) % 10**8}", text=prompt, sampling=options)


async def run_stream(stream, timeout: float = 60.0) -> list[pb.GenerateResponse]:
    async def read():
        return [m async for m in stream]

    try:
        return await asyncio.wait_for(read(), timeout)
    finally:
        stream.cancel()


def text_of(messages: list[pb.GenerateResponse]) -> str:
    return "".join(m.text for m in messages)


def ids_of(messages: list[pb.GenerateResponse]) -> list[int]:
    return [t for m in messages for t in m.token_ids]


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def up_router(children: list[Child], config: RouterConfig = FAST, **kw) -> Router:
    router = Router(specs(children), config, **kw)
    await router.start()
    await wait_until(lambda: all(r["state"] == "up" for r in router.snapshot()["replicas"]), 20, "3 replicas up")
    return router


_REFERENCE: dict[str, tuple[list[int], str]] = {}


async def reference(router: Router) -> dict[str, tuple[list[int], str]]:
    """Each prompt's uninterrupted greedy (token ids, text), computed once, concurrently, through the router."""
    if not _REFERENCE:
        results = await asyncio.gather(*(run_stream(router.generate(greedy(p))) for p in PROMPTS))
        for p, messages in zip(PROMPTS, results, strict=True):
            _REFERENCE[p] = (ids_of(messages), text_of(messages))
    return _REFERENCE


# ----- routing ------------------------------------------------------------------------------------------------------


def test_routes_over_the_fleet_and_relays_whole_streams(replicas):
    async def main():
        router = await up_router(replicas, RouterConfig(poll_period=0.2, region="eu"))
        try:
            info = await router.model_info()
            assert info.num_slots == 12 and info.context_length == 128
            ref = await reference(router)
            streams = [router.generate(greedy(p)) for p in PROMPTS]
            results = await asyncio.gather(*(run_stream(s) for s in streams))
            for p, stream, messages in zip(PROMPTS, streams, results, strict=True):
                assert (ids_of(messages), text_of(messages)) == ref[p] and len(ref[p][0]) == MAX_TOKENS
                assert messages[0].request_id and messages[0].prompt_tokens == len(p.encode())
                assert all(not m.request_id for m in messages[1:])  # one first message
                assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
                assert messages[-1].usage.completion_tokens == MAX_TOKENS
                assert stream.replica in ("r0", "r1", "r2")
            used = {s.replica for s in streams}
            assert len(used) >= 2, used  # 12 concurrent requests do not all land on one 4-slot replica
            # the client's region first: 12 requests over the two "eu" replicas' bound of 2 x 6, none to "us"
            assert used <= {"r0", "r1"}, used

            # conversation affinity: the next turn (the same first 64-token page) goes where the first turn went
            first = router.generate(greedy(PROMPTS[0], max_tokens=8))
            await run_stream(first)
            follow = router.generate(greedy(PROMPTS[0] + "and then?", max_tokens=8))
            last = (await run_stream(follow))[-1]
            assert follow.replica == first.replica
            assert last.usage.cached_tokens >= 64  # the replica's prefix cache held the page

            snap = router.snapshot()
            json.dumps(snap)
            assert snap["policy"] == "cache_aware" and snap["model"] == info.model_name
            assert {r["name"] for r in snap["replicas"]} == {"r0", "r1", "r2"}
            assert snap["regions"]["eu"]["replicas"] == 2 and snap["regions"]["us"]["up"] == 1
            assert snap["cost_per_hour"] == pytest.approx(3 * 2 * 1.5)
            assert sum(r["routed"] for r in snap["replicas"]) >= 26
            registry = router.metrics.registry
            routed = sum(
                registry.get_sample_value("meshserve_fleet_requests_routed_total", {"replica": n, "region": g}) or 0
                for n, g in (("r0", "eu"), ("r1", "eu"), ("r2", "us"))
            )
            assert routed == sum(r["routed"] for r in snap["replicas"])
            load = await router.load()
            assert load.slots_total == 12 and not load.draining
        finally:
            await router.close()

    asyncio.run(main())


def test_client_errors_never_eject_a_replica(replicas):
    async def main():
        router = await up_router(replicas)
        try:
            for _ in range(8):  # far more than failures_to_eject
                with pytest.raises(GateError) as info:
                    await run_stream(router.generate(greedy("hello", max_tokens=500)))  # beyond the context
                assert info.value.status == 400
                with pytest.raises(GateError) as info:
                    await run_stream(router.generate(greedy("hello", top_p=7.0)))
                assert info.value.status == 400 and info.value.param == "top_p"
            await asyncio.sleep(0.5)  # a few probe rounds
            snap = router.snapshot()
            assert all(r["state"] == "up" and r["failures"] == 0 for r in snap["replicas"]), snap["replicas"]
            assert snap["failovers"] == {}
        finally:
            await router.close()

    asyncio.run(main())


def test_full_fleet_queues_then_refuses_with_the_reason(replicas):
    async def main():
        config = RouterConfig(
            poll_period=0.2,
            policy="least_load",
            routing=RoutingConfig(queue_per_slot=0.0),  # 4 requests per replica, then the gateway queue
            admission=AdmissionConfig(max_queued=2, max_wait=0.3),
        )
        router = await up_router(replicas, config)
        try:
            long = [router.generate(greedy(p, max_tokens=56)) for p in PROMPTS]
            running = [asyncio.create_task(run_stream(s)) for s in long]
            await wait_until(lambda: sum(r["in_flight"] for r in router.snapshot()["replicas"]) == 12, 10, "12 routed")
            queued = [asyncio.create_task(run_stream(router.generate(greedy("q" * 20)))) for _ in range(2)]
            await wait_until(lambda: len(router.queue) == 2, 5, "2 queued")
            with pytest.raises(GateError) as info:
                await run_stream(router.generate(greedy("one too many")))
            e = info.value
            assert e.status == 429 and e.code == "replicas_full" and e.retry_after >= 1.0
            assert "queue is full (2 waiting)" in e.message
            for task in queued:  # the 12 long streams (>= 14 dispatches of >= 30 ms) outlast the queue's time limit
                with pytest.raises(GateError, match=r"waited 0\.[3-9] s in the gateway queue"):
                    await task
            assert router.snapshot()["shed"] == {admission.FULL: 3}
            for messages in await asyncio.gather(*running):
                assert len(ids_of(messages)) == 56
        finally:
            await router.close()

    asyncio.run(main())


def test_replicas_file_is_reloaded_without_dropping_streams(replicas, tmp_path):
    path = tmp_path / "fleet.json"

    async def main():
        path.write_text(json.dumps({"replicas": [{"name": "r0", "address": replicas[0].address}]}))
        router = Router(str(path), FAST)
        await router.start()
        try:
            await wait_until(lambda: router.snapshot()["replicas"][0]["state"] == "up", 20, "r0 up")
            stream = router.generate(greedy(PROMPTS[1]))
            reading = asyncio.create_task(run_stream(stream))
            entries = [{"name": s.name, "address": s.address, "region": s.region} for s in specs(replicas)[1:]]
            path.write_text(json.dumps({"replicas": entries}))  # r0 leaves, r1 and r2 join
            os.utime(path, (time.time() + 5, time.time() + 5))
            await wait_until(
                lambda: {r["name"] for r in router.snapshot()["replicas"] if r["state"] == "up"} == {"r1", "r2"},
                20,
                "r1 and r2 up",
            )
            messages = await reading  # r0's stream finished although r0 left the fleet
            assert stream.replica == "r0" and len(ids_of(messages)) == MAX_TOKENS
            await wait_until(lambda: "r0" not in {r["name"] for r in router.snapshot()["replicas"]}, 10, "r0 gone")
            path.write_text('{"replicas": [{"address": 7}]}')  # a bad edit is refused; the fleet stays
            os.utime(path, (time.time() + 10, time.time() + 10))
            await wait_until(lambda: router.snapshot()["config_error"] is not None, 10, "the bad edit noticed")
            assert "replicas[0].address" in router.snapshot()["config_error"]
            assert len(router.snapshot()["replicas"]) == 2
        finally:
            await router.close()

    asyncio.run(main())


# ----- the gateway over a router ------------------------------------------------------------------------------------


def test_gateway_serves_over_the_router(replicas):
    async def main():
        router = Router(specs(replicas), FAST)
        await router.start()
        gateway = Gateway(router, OpenGate(), GatewayConfig(http_port=0, grpc_port=0))
        await gateway.start()
        try:
            ref = await reference(router)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=60) as client:
                body = {"model": (await router.model_info()).model_name, "prompt": PROMPTS[3], "max_tokens": MAX_TOKENS}
                body.update(temperature=0, ignore_eos=True)
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                completion = r.json()
                assert completion["usage"]["completion_tokens"] == MAX_TOKENS
                assert completion["choices"][0]["text"] == ref[PROMPTS[3]][1]
                health = await client.get("/health")
                assert health.status_code == 200 and health.json()["replica"] == "fleet"
        finally:
            await gateway.stop()

    asyncio.run(main())


def test_gateway_script_takes_a_replicas_file(replicas, tmp_path):
    path = tmp_path / "fleet.toml"
    lines = []
    for s in specs(replicas):
        lines += ["[[replicas]]", f'name = "{s.name}"', f'address = "{s.address}"', f'region = "{s.region}"', ""]
    path.write_text("\n".join(lines))
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "gateway.py"),
        f"--replicas={path}",
        "--routing_policy=least_load",
        "--http_port=0",
        "--gateway_grpc_port=0",
        "--tokenizer=",
        "--fleet_metrics_port=0",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines_seen: list[str] = []
    ports: dict[str, int] = {}

    def read():
        for line in proc.stdout:
            lines_seen.append(line)
            m = re.search(r"gateway listening on \S+ http_port=(\d+)", line)
            if m:
                ports["http"] = int(m.group(1))
            m = re.search(r"fleet metrics on port (\d+)", line)
            if m:
                ports["metrics"] = int(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while "http" not in ports:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines_seen)
            time.sleep(0.1)
        base = f"http://127.0.0.1:{ports['http']}"
        body = {"prompt": PROMPTS[4], "max_tokens": 8, "temperature": 0}
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        r = httpx.post(f"{base}/v1/completions", json={"model": model, **body}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        metrics = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).text
        assert "meshserve_fleet_requests_routed_total" in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "".join(lines_seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ----- failover (destructive: last) ---------------------------------------------------------------------------------


def test_sigkill_under_load_every_stream_completes_and_cut_streams_resume_exactly(replicas):
    async def main():
        router = await up_router(replicas, RouterConfig(poll_period=0.2, policy="round_robin"))
        try:
            ref = await reference(router)
            prompts = PROMPTS + PROMPTS[:6]  # 18: the replicas' bound (3 x 6), some waiting in the victim's queue
            streams = [router.generate(greedy(p)) for p in prompts]
            got: list[list[pb.GenerateResponse]] = [[] for _ in streams]

            async def read(i):
                async for message in streams[i]:
                    got[i].append(message)

            tasks = [asyncio.create_task(read(i)) for i in range(len(streams))]
            victim = replicas[1]
            # kill once some of the victim's streams are mid-way (tokens streamed, far from the end)
            await wait_until(
                lambda: sum(1 for s, g in zip(streams, got, strict=True) if s.replica == "r1" and g) >= 2,
                30,
                "streams under way on r1",
            )
            on_victim = [i for i, s in enumerate(streams) if s.replica == "r1"]
            cut = [i for i in on_victim if 0 < len(ids_of(got[i])) < MAX_TOKENS]
            victim.process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*tasks), 90)
            for i, messages in enumerate(got):
                # the client's whole stream - text and ids - is the uninterrupted greedy one
                assert (ids_of(messages), text_of(messages)) == ref[prompts[i]], (i, streams[i].replica)
                assert sum(1 for m in messages if m.request_id) == 1 and messages[0].prompt_tokens > 0
                assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
                assert messages[-1].usage.completion_tokens == MAX_TOKENS
            assert cut, "no stream was cut mid-way"
            for i in on_victim:
                assert streams[i].replica.startswith("r1>"), streams[i].replica
            snap = router.snapshot()
            assert snap["failovers"].get("resume", 0) >= len(cut)
            await wait_until(lambda: router.snapshot()["replicas"][1]["state"] == "ejected", 5, "r1 ejected")
            # the fleet keeps serving on the others
            after = router.generate(greedy(PROMPTS[5]))
            assert ids_of(await run_stream(after)) == ref[PROMPTS[5]][0] and after.replica != "r1"
        finally:
            await router.close()

    asyncio.run(main())


def test_sigterm_drain_takes_no_new_work_and_finishes_its_streams(replicas):
    async def main():
        live = [c for c in replicas if c.process.poll() is None]
        assert len(live) >= 2
        router = Router(specs(live, regions=("eu", "eu", "eu")), RouterConfig(poll_period=0.2, policy="round_robin"))
        await router.start()
        try:
            await wait_until(lambda: all(r["state"] == "up" for r in router.snapshot()["replicas"]), 20, "up")
            ref = await reference(router)
            streams = [router.generate(greedy(p)) for p in PROMPTS[:6]]
            tasks = [asyncio.create_task(run_stream(s, timeout=90)) for s in streams]
            target = live[-1]
            name = f"r{len(live) - 1}"
            await wait_until(lambda: any(s.replica == name for s in streams), 10, "a stream on the target")
            target.process.send_signal(signal.SIGTERM)
            await wait_until(lambda: router.snapshot()["replicas"][-1]["state"] == "draining", 10, "draining seen")
            later = [router.generate(greedy(p, max_tokens=8)) for p in PROMPTS[6:10]]
            await asyncio.gather(*(run_stream(s) for s in later))
            assert all(s.replica != name for s in later), [s.replica for s in later]
            results = await asyncio.gather(*tasks)
            for p, s, messages in zip(PROMPTS[:6], streams, results, strict=True):
                assert (ids_of(messages), text_of(messages)) == ref[p]
                assert ">" not in s.replica  # finished where it started: the drain let it
            assert await asyncio.to_thread(target.process.wait, 30) == 0
        finally:
            await router.close()

    asyncio.run(main())
