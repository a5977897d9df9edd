"""The fleet router's admission end to end, over two real one-slot tiny-model replicas (processes of their own,
tests/fleet_support.py): what happens to a request when no replica has room.

- Order. With a router bound of one request per replica (`queue_per_slot=0`) and the replica held busy by a long
  stream, queued requests are admitted strictly one at a time, so the order of their first messages is the admission
  order: paid before standard before free, and round-robin between keys within a band (a key sending many times the
  others gets one turn in k). Checked at the router (`Router.generate` with `GenerateRequest.priority` and the
  `route_key` context variable, as the gateway sets them) and through the gateway's HTTP API (the key's policy
  priority class -> gateway/flow.py -> the router's queue; keys from a real store). The same request priority orders
  the replica's own waiting queue the same way (the engine runs lower values first; the router's queue higher priority
  classes first: one sign convention end to end).
- Refusals: 429 / RESOURCE_EXHAUSTED with Retry-After and a reason - `replicas_full` (the gateway queue over its bound,
  a lower band shed for a higher one, the queue's time limit), `replicas_draining` (a SIGTERMed replica finishing its
  streams), `replicas_absent` (none configured, none ever up, the only one killed).
- Busy replicas: a replica answering RESOURCE_EXHAUSTED (its own waiting queue full) is not a failure: the request goes
  to another replica, or waits in the gateway queue until the replica reports room, and the client never sees it.

Every wait is bounded; the destructive tests (SIGTERM, SIGKILL) run last.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time

import grpc
import httpx
import pytest

from fleet.admission import AdmissionConfig
from fleet.config import ReplicaSpec
from fleet.policy import RoutingConfig
from fleet.router import RoutedGeneration, Router, RouterConfig
from gateway.backend import GrpcReplica, route_key
from gateway.gate import GateError
from gateway.keys import KeyStore
from gateway.policy import PolicyStore
from gateway.server import Gateway, GatewayConfig
from gateway.store import Store
from gateway.store_gate import StoreGate
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc
from tests import fleet_support
from tests.fleet_support import Child, start_each

STEP_DELAY = 0.05  # seconds before each decode dispatch (4 tokens): a hold of HOLD_TOKENS lasts >= 1.5 s
HOLD_TOKENS = 120  # with a 4-token prompt, within the tiny model's 128-token context
SHORT_TOKENS = 8  # a queued request: its prefill and two dispatches, >= 0.1 s between two admissions
TIMEOUT = 30.0  # bound of any one stream or wait

# the engine's convention (GenerateRequest.priority, as gateway/flow.py sends the policy's class): lower runs first
PAID, STANDARD, FREE = -2, -1, 0
HOLD_PRIORITY = -100  # the holds queued behind a hold: ahead of every request under test


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict[str, Child]:
    """ "tight": one slot and room for one waiting request; "roomy": one slot, eight waiting."""
    common = ("--num_slots=1", f"--step_delay={STEP_DELAY}")
    tight, roomy = start_each(
        str(tmp_path_factory.mktemp("admission")), (*common, "--max_waiting=1"), (*common, "--max_waiting=8")
    )
    yield {"tight": tight, "roomy": roomy}
    tight.stop()
    roomy.stop()


def spec(name: str, child: Child, region: str = "eu") -> ReplicaSpec:
    return ReplicaSpec(name=name, address=child.address, region=region)


def one_at_a_time(**admission) -> RouterConfig:
    """A bound of one request per one-slot replica: everything else waits in the gateway queue."""
    return RouterConfig(
        poll_period=0.2,
        routing=RoutingConfig(queue_per_slot=0.0),
        admission=AdmissionConfig(**{"max_queued": 64, "max_wait": TIMEOUT, **admission}),
    )


def request(tag: str, *, priority: int = FREE, max_tokens: int = SHORT_TOKENS) -> pb.GenerateRequest:
    """Greedy, ignoring EOS; the prompt is the tag's bytes as token ids (the router needs no Tokenize)."""
    ids = list(tag.encode()[:4].ljust(4, b"."))
    options = pb.SamplingOptions(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return pb.GenerateRequest(request_id=tag, token_ids=pb.TokenIds(ids=ids), sampling=options, priority=priority)


def generate(router: Router, req: pb.GenerateRequest, key: str = "") -> RoutedGeneration:
    """`router.generate` as the gateway calls it for API key `key` (the flow sets `route_key`)."""
    token = route_key.set(key)
    try:
        return router.generate(req)
    finally:
        route_key.reset(token)


async def wait_until(predicate, what: str, timeout: float = TIMEOUT) -> None:
    await fleet_support.wait_until(predicate, timeout, what, poll=0.01)


async def up(router: Router) -> Router:
    await router.start()
    await wait_until(lambda: all(r["state"] == "up" for r in router.snapshot()["replicas"]), "every replica up")
    return router


def in_flight(router: Router) -> int:
    return sum(r["in_flight"] for r in router.snapshot()["replicas"])


class Admissions:
    """Runs streams and records the order of their first messages (one slot, a bound of one: the admission order)."""

    def __init__(self) -> None:
        self.order: list[str] = []

    async def run(self, stream: RoutedGeneration, tag: str) -> list[pb.GenerateResponse]:
        messages = []
        try:
            async with asyncio.timeout(TIMEOUT):
                async for message in stream:
                    if not messages:
                        self.order.append(tag)
                    messages.append(message)
        finally:
            stream.cancel()
        return messages


async def hold(router: Router, tag: str = "hold", chain: int = 1) -> list[asyncio.Task]:
    """A long stream through `router`, in flight once this returns; with `chain` > 1 that many more queued behind
    it in the router's top band (HOLD_PRIORITY), so the replica stays held chain x >= 1.5 s however slow the test's
    own setup runs. `release` ends them."""
    before, queued = in_flight(router), len(router.queue)
    tasks = []
    for i in range(chain):
        stream = router.generate(request(f"{tag}{i}", priority=HOLD_PRIORITY, max_tokens=HOLD_TOKENS))
        tasks.append(asyncio.create_task(Admissions().run(stream, f"{tag}{i}")))
        if i == 0:
            await wait_until(lambda: in_flight(router) == before + 1, f"{tag} in flight")
        else:
            await wait_until(lambda i=i: len(router.queue) == queued + i, f"{tag}{i} queued")
    return tasks


async def release(held: list[asyncio.Task]) -> None:
    """Ends held streams (the queued ones first), having checked the replica is still held (else what queued
    behind them was not all queued at once)."""
    assert not held[-1].done(), "the held streams ended before the test released them: the replica was not held"
    for task in reversed(held):
        task.cancel()
    for task in held:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def queue_in_order(router: Router, plan: list[tuple[str, str, int]], admissions: Admissions) -> list:
    """Queues (tag, key, priority) requests one after another, each in the gateway queue before the next is sent."""
    tasks = []
    for tag, key, priority in plan:
        queued = len(router.queue)
        stream = generate(router, request(tag, priority=priority), key)
        tasks.append(asyncio.create_task(admissions.run(stream, tag)))
        await wait_until(lambda q=queued: len(router.queue) == q + 1, f"{tag} queued")
    return tasks


async def refused(stream: RoutedGeneration) -> GateError:
    with pytest.raises(GateError) as info:
        await Admissions().run(stream, "refused")
    return info.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- the order of admission ---------------------------------------------------------------------------------------


def test_the_gateway_queue_admits_higher_bands_first_and_keys_in_turn(replicas):
    """Router layer: requests queued free (one key sending ten times what each of two others sends, and first), then
    standard, then paid are admitted paid first, then standard, then free with the keys in turn: the busy key gets
    one turn in three while the others wait, its surplus after them."""
    plan = [(f"hog{i}", "hog", FREE) for i in range(10)]
    plan += [("a0", "a", FREE), ("b0", "b", FREE), ("s0", "s", STANDARD), ("p0", "p", PAID), ("p1", "p", PAID)]

    async def main():
        router = await up(Router([spec("roomy", replicas["roomy"])], one_at_a_time()))
        try:
            held = await hold(router, chain=3)
            admissions = Admissions()
            tasks = await queue_in_order(router, plan, admissions)
            assert router.queue.queued_by_priority() == {0: 12, 1: 1, 2: 2, 100: 2}  # the router's bands: higher first
            await release(held)
            results = await asyncio.gather(*tasks)
            assert all(len([t for m in r for t in m.token_ids]) == SHORT_TOKENS for r in results)
            expected = ["p0", "p1", "s0", "hog0", "a0", "b0", *(f"hog{i}" for i in range(1, 10))]
            assert admissions.order == expected
            assert router.snapshot()["shed"] == {}
        finally:
            await router.close()

    asyncio.run(main())


def test_the_replicas_own_queue_runs_the_same_priorities_first(replicas):
    """Router -> engine: with room at the router (a bound of 11), requests wait in the replica's own queue instead;
    the router passes `GenerateRequest.priority` on unchanged and the engine runs lower values (paid) first, the
    same order the router's queue gives the same requests."""

    async def main():
        config = RouterConfig(poll_period=0.2, routing=RoutingConfig(queue_per_slot=10.0))
        router = await up(Router([spec("roomy", replicas["roomy"])], config))
        direct = GrpcReplica(replicas["roomy"].address, name="roomy")
        try:
            held = await hold(router)
            admissions = Admissions()
            tasks = []
            for tag, priority in (("free", FREE), ("paid", PAID), ("standard", STANDARD)):
                tasks.append(asyncio.create_task(admissions.run(router.generate(request(tag, priority=priority)), tag)))
            waiting = 0
            deadline = time.monotonic() + TIMEOUT
            while waiting != 3 and time.monotonic() < deadline:
                waiting = (await direct.load()).waiting_requests
                await asyncio.sleep(0.02)
            assert waiting == 3 and len(router.queue) == 0, "the three should wait at the replica, not the router"
            await release(held)
            await asyncio.gather(*tasks)
            assert admissions.order == ["paid", "standard", "free"]
        finally:
            await direct.close()
            await router.close()

    asyncio.run(main())


def test_through_the_gateway_the_keys_policy_class_and_key_set_the_order(replicas, tmp_path):
    """HTTP layer: keys in a real store, one with the policy priority class "paid", one "standard", three free ones
    (one sending five requests). POST /v1/completions through the gateway over the router: admitted paid, standard,
    then free keys in turn. One more request with the queue at its bound gets HTTP 429 with Retry-After and
    `replicas_full`; over the gateway's gRPC front, RESOURCE_EXHAUSTED with `retry-after` metadata."""
    store = Store(f"sqlite:///{tmp_path}/gateway.db")
    gate = StoreGate(store)
    keys, policies = KeyStore(store), PolicyStore(store)
    keys.create_user("u")
    secrets = {name: keys.create_key("u", name) for name in ("paid", "standard", "hog", "a", "b")}
    policies.set("key", secrets["paid"].info.id, "test", {"priority_class": "paid"})
    policies.set("key", secrets["standard"].info.id, "test", {"priority_class": "standard"})
    plan = ["hog"] * 5 + ["a", "a", "b", "standard", "paid", "paid"]

    async def main():
        router = await up(Router([spec("roomy", replicas["roomy"])], one_at_a_time(max_queued=len(plan) + 2)))
        gateway = Gateway(router, gate, GatewayConfig(http_port=0, grpc_port=0))
        await gateway.start()
        model = (await router.model_info()).model_name
        order: list[str] = []

        async def complete(client: httpx.AsyncClient, key: str, tag: str) -> httpx.Response:
            body = {"model": model, "prompt": tag, "max_tokens": SHORT_TOKENS, "temperature": 0, "ignore_eos": True}
            headers = {"Authorization": f"Bearer {secrets[key].secret}"}
            response = await client.post("/v1/completions", json=body, headers=headers)
            order.append(tag)  # completion order = admission order (one at a time, >= 0.1 s apart)
            return response

        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=TIMEOUT) as client:
                held = await hold(router, chain=3)  # two of them queued
                tasks = []
                for i, key in enumerate(plan):
                    tasks.append(asyncio.create_task(complete(client, key, f"{key}-{i}")))
                    await wait_until(lambda i=i: len(router.queue) == 2 + i + 1, f"request {i} queued")

                over = await complete(client, "b", "over")
                assert over.status_code == 429, over.text
                assert int(over.headers["retry-after"]) >= 1
                assert over.json()["error"]["code"] == "replicas_full", over.text
                assert "queue is full" in over.json()["error"]["message"]
                async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                    call = pb_grpc.MeshServeStub(channel).Generate(
                        pb.GenerateRequest(text="over", sampling=pb.SamplingOptions(max_tokens=4)),
                        metadata=[("authorization", f"Bearer {secrets['a'].secret}")],
                        timeout=TIMEOUT,
                    )
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        async for _ in call:
                            pass
                    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert int(dict(info.value.trailing_metadata())["retry-after"]) >= 1
                    assert "queue is full" in info.value.details()

                order.clear()
                await release(held)
                responses = await asyncio.gather(*tasks)
            for response in responses:
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["completion_tokens"] == SHORT_TOKENS
            assert order == [
                *("paid-9", "paid-10", "standard-8"),
                *("hog-0", "a-5", "b-7", "hog-1", "a-6", "hog-2", "hog-3", "hog-4"),
            ]
        finally:
            await gateway.stop()
            store.close()

    asyncio.run(main())


# ----- refusals -----------------------------------------------------------------------------------------------------


def test_a_full_gateway_queue_refuses_sheds_the_lowest_band_and_times_out(replicas):
    """Router layer, `replicas_full` with Retry-After: a request finding the queue at its bound is refused at once; a
    paid one arriving then sheds the newest free request of the key holding the most (which is refused) and is
    admitted first; with a short time limit a queued request is refused after waiting it out."""

    async def main():
        router = await up(Router([spec("roomy", replicas["roomy"])], one_at_a_time(max_queued=3)))
        try:
            held = await hold(router)
            admissions = Admissions()
            plan = [("hog0", "hog", FREE), ("hog1", "hog", FREE), ("a0", "a", FREE)]
            tasks = await queue_in_order(router, plan, admissions)

            e = await refused(generate(router, request("b0"), "b"))
            assert (e.status, e.code) == (429, "replicas_full") and "the gateway queue is full (3 waiting)" in e.message
            assert e.retry_after == pytest.approx(3.0)  # 1 s per queued request per slot

            paid = asyncio.create_task(admissions.run(generate(router, request("p0", priority=PAID), "p"), "p0"))
            with pytest.raises(GateError) as info:
                await asyncio.wait_for(tasks[1], TIMEOUT)  # hog1: the newest of the busiest free key
            assert (info.value.status, info.value.code) == (429, "replicas_full") and info.value.retry_after >= 1.0
            assert router.queue.queued_by_priority() == {0: 2, 2: 1}

            await release(held)
            await asyncio.gather(tasks[0], tasks[2], paid)
            assert admissions.order == ["p0", "hog0", "a0"]
            assert router.snapshot()["shed"] == {"full": 2}
        finally:
            await router.close()

        router = await up(Router([spec("roomy", replicas["roomy"])], one_at_a_time(max_wait=0.3)))
        try:
            held = await hold(router)
            started = time.monotonic()
            e = await refused(generate(router, request("late"), "late"))
            waited = time.monotonic() - started
            assert (e.status, e.code) == (429, "replicas_full") and e.retry_after >= 1.0
            assert "in the gateway queue" in e.message and 0.3 <= waited < 3.0, (e.message, waited)
            await release(held)
        finally:
            await router.close()

    asyncio.run(main())


def test_no_replica_configured_or_up_is_refused_as_absent():
    """Router layer, `replicas_absent` with Retry-After: no replica configured; one configured that never answers."""

    async def main():
        for specs, message in (
            ([], "no replica is configured"),
            ([ReplicaSpec(name="gone", address=f"127.0.0.1:{free_port()}")], r"no replica is serving \(1 configured"),
        ):
            router = Router(specs, RouterConfig(poll_period=0.2, probe_timeout=1.0))
            try:
                e = await refused(router.generate(request("x")))
                assert (e.status, e.code, e.retry_after) == (429, "replicas_absent", 5.0)
                assert re.search(message, e.message), e.message
            finally:
                await router.close()

    asyncio.run(main())


# ----- busy replicas ------------------------------------------------------------------------------------------------


def test_a_replica_with_its_queue_full_sends_the_request_elsewhere_or_back_to_the_queue(replicas):
    """A router whose bound (3 per replica) is beyond what "tight" holds (1 running + 1 waiting) routes a third
    request there and gets RESOURCE_EXHAUSTED: not a failure of the replica (never ejected or counted), and not the
    client's error. With another replica with room the request goes there ("tight>roomy"); with none it waits in
    the gateway queue until "tight" reports room, and completes."""
    config = RouterConfig(poll_period=0.2, region="eu", routing=RoutingConfig(queue_per_slot=2.0))

    async def run(router: Router, tags: list[str]) -> tuple[list[RoutedGeneration], list]:
        streams = [router.generate(request(t, max_tokens=40)) for t in tags]
        results = await asyncio.gather(*(Admissions().run(s, t) for s, t in zip(streams, tags, strict=True)))
        return streams, results

    async def main():
        both = [spec("tight", replicas["tight"], "eu"), spec("roomy", replicas["roomy"], "us")]
        router = await up(Router(both, config))
        try:
            streams, results = await run(router, ["e0", "e1", "e2"])
            assert all(len([t for m in r for t in m.token_ids]) == 40 for r in results)
            assert sorted(s.replica for s in streams) == ["tight", "tight", "tight>roomy"]
            snap = router.snapshot()
            assert snap["failovers"] == {"retry": 1} and snap["shed"] == {}
            assert all(r["failures"] == 0 and r["ejections"] == 0 for r in snap["replicas"])
        finally:
            await router.close()

        router = await up(Router([spec("tight", replicas["tight"])], config))
        try:
            streams, results = await run(router, ["q0", "q1", "q2"])
            assert all(len([t for m in r for t in m.token_ids]) == 40 for r in results)
            snap = router.snapshot()
            # tight is not tried again while its load reports say its queue is full: once, or twice when a report
            # asked for just before the refusal arrives just after it
            retries = snap["failovers"].get("retry", 0)
            assert retries in (1, 2) and snap["shed"] == {}, snap
            assert sorted(s.replica for s in streams) == ["tight", "tight", ">".join(["tight"] * (1 + retries))]
            assert snap["replicas"][0]["failures"] == 0 and snap["replicas"][0]["state"] == "up"
        finally:
            await router.close()

    asyncio.run(main())


# ----- the destructive ones, last -----------------------------------------------------------------------------------


def test_a_sigtermed_replica_is_refused_as_draining_while_it_finishes(replicas):
    """Router layer, `replicas_draining` with Retry-After naming the replica: "tight" SIGTERMed with two streams on it
    (one running, one in its queue) takes no new work while both finish; then it exits 0. A router that has not
    polled since the drain began (`stale`, which holds the streams) sends it requests: the replica refuses them
    saying it drains (meshserve-draining), which is no failure - counted as failures, two would eject it and cut the
    streams it is finishing."""
    child = replicas["tight"]

    async def main():
        stale = await up(Router([spec("tight", child)], RouterConfig(poll_period=60.0)))
        fresh = await up(Router([spec("tight", child)], RouterConfig(poll_period=0.2)))
        try:
            held = [*await hold(stale, "held"), *await hold(stale, "waiting")]
            child.process.send_signal(signal.SIGTERM)
            await wait_until(lambda: fresh.snapshot()["replicas"][0]["state"] == "draining", "the drain seen")
            e = await refused(fresh.generate(request("late")))
            assert (e.status, e.code, e.retry_after) == (429, "replicas_draining", 2.0)
            assert "(tight)" in e.message, e.message
            for i in range(3):
                e = await refused(stale.generate(request(f"stale{i}")))
                assert (e.status, e.code) == (429, "replicas_draining"), e.message
            (seen,) = stale.snapshot()["replicas"]
            assert (seen["state"], seen["failures"], seen["ejections"]) == ("draining", 0, 0), seen
            for task in held:
                messages = await asyncio.wait_for(task, TIMEOUT)
                assert len([t for m in messages for t in m.token_ids]) == HOLD_TOKENS
            assert await asyncio.to_thread(child.process.wait, TIMEOUT) == 0
        finally:
            await stale.close()
            await fresh.close()

    asyncio.run(main())


def test_a_request_whose_only_replica_dies_is_refused_as_absent(replicas):
    """Router layer, `replicas_absent`: "roomy" SIGKILLed; a router that has not probed it since sends a request
    there, which fails to connect: refused naming the one configured replica as not serving (not "none configured").
    Once the probes eject it, the same refusal comes without trying it."""
    child = replicas["roomy"]

    async def main():
        stale = await up(Router([spec("roomy", child)], RouterConfig(poll_period=60.0)))
        fresh = await up(Router([spec("roomy", child)], RouterConfig(poll_period=0.2, probe_timeout=1.0)))
        try:
            child.stop()
            e = await refused(stale.generate(request("late")))
            assert (e.status, e.code, e.retry_after) == (429, "replicas_absent", 5.0)
            assert "no replica is serving (1 configured" in e.message, e.message
            await wait_until(lambda: fresh.snapshot()["replicas"][0]["state"] == "ejected", "roomy ejected")
            e = await refused(fresh.generate(request("later")))
            assert (e.status, e.code, e.retry_after) == (429, "replicas_absent", 5.0)
            assert "no replica is serving (1 configured" in e.message, e.message
        finally:
            await stale.close()
            await fresh.close()

    asyncio.run(main())
