"""The fleet router over three real tiny-model replicas, each a process of its own on loopback (tests/fleet_support.py),
so that one can be SIGKILLed or SIGTERMed: routing and the streams it relays, prompts tokenized in the gateway with no
Tokenize round trip, a client's bad requests never ejecting a replica, a full fleet queueing then refusing with a
reason, the replicas file reloaded live, the gateway serving over a router (in-process and as `scripts/gateway.py
--replicas`), a failover billed to each replica at its own price, a replica killed under load (every stream
completes, a cut greedy stream's text equals the uninterrupted one) and a replica drained (no new work, its streams
finish). The destructive tests run last. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2

from engine.tokenizer import make_tiny_tokenizer
from fleet import admission, policy
from fleet.admission import AdmissionConfig
from fleet.config import ReplicaSpec
from fleet.policy import EjectionConfig, RoutingConfig
from fleet.router import RoutedGeneration, Router, RouterConfig
from gateway import backend
from gateway.backend import GrpcReplica, TokenVocab
from gateway.gate import GateError
from gateway.ledger import Prices, ReplicaPrice
from gateway.open_gate import OpenGate
from gateway.server import Gateway, GatewayConfig
from gateway.store import Store
from gateway.store.models import LedgerRow
from gateway.store_gate import StoreGate
from protos.meshserve.v1 import meshserve_pb2 as pb
from tests.fleet_support import ROOT, Child, start_replicas, wait_until
from tests.postgres_support import create_database, postgres_url  # noqa: F401  (the session fixture)

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


_STOPS: dict[str, tuple[str, list[int], str]] = {}


def _stop_for(text: str, matching: bool) -> str:
    """A stop string for a greedy text: `matching`, the two characters that first occur latest in it (the random
    model's text soon repeats itself); otherwise one that never matches but begins at its most frequent character, so
    the replica keeps holding that character back (the text a cut must not lose)."""
    if matching:
        firsts = {text[j : j + 2]: j for j in range(len(text) - 2, -1, -1) if "\ufffd" not in text[j : j + 2]}
        return max(firsts, key=firsts.get)
    common = collections.Counter(c for c in text if c != "\ufffd").most_common(1)[0][0]
    return next(common + c for c in map(chr, range(1, 128)) if common + c not in text)


async def stop_reference(router: Router) -> dict[str, tuple[str, list[int], str]]:
    """Per prompt: a stop string (`_stop_for`: a matching one for every other prompt) and the uninterrupted greedy
    (token ids, text) with it, computed once through the router: the greedy text up to the stop string."""
    if not _STOPS:
        ref = await reference(router)
        stops = {p: _stop_for(ref[p][1], matching=i % 2 == 0) for i, p in enumerate(PROMPTS)}
        results = await asyncio.gather(*(run_stream(router.generate(greedy(p, stop=[s]))) for p, s in stops.items()))
        for (p, stop), messages in zip(stops.items(), results, strict=True):
            text = ref[p][1]
            assert text_of(messages) == (text[: text.find(stop)] if stop in text else text), (p, stop)
            stopped = pb.FINISH_REASON_STOP if stop in text else pb.FINISH_REASON_LENGTH
            assert messages[-1].finish_reason == stopped
            _STOPS[p] = (stop, ids_of(messages), text_of(messages))
    return _STOPS


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


def counting_tokenize(router: Router) -> collections.Counter[str]:
    """Counts, per replica, the Tokenize calls the router makes (each still goes to the real replica)."""
    calls: collections.Counter[str] = collections.Counter()
    for m in router._members.values():

        async def counted(request, _tokenize=m.replica.tokenize, _name=m.name):
            calls[_name] += 1
            return await _tokenize(request)

        m.replica.tokenize = counted
    return calls


def _chat(*turns: tuple[str, str]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in turns])


NON_ASCII = "Grüße aus Köln, 東京 und Zürich: ÄÖÜ äöü ß 🤖 — «quotes», tabs\tand  spaces. "
TOKENIZED = [
    pb.TokenizeRequest(text=PROMPTS[0], add_special_tokens=True),
    pb.TokenizeRequest(text=NON_ASCII, add_special_tokens=True),
    pb.TokenizeRequest(text=(NON_ASCII * 40)[:2000], add_special_tokens=True),
    pb.TokenizeRequest(chat=_chat(("system", "You are brief."), ("user", NON_ASCII), ("assistant", "OK."))),
    pb.TokenizeRequest(chat=_chat(("user", (PROMPTS[1] + NON_ASCII) * 12))),
]


def test_the_router_tokenizes_prompts_as_the_replicas_do_without_a_round_trip(replicas, monkeypatch, caplog):
    """With the gateway's tokenizer matching the replicas' (checked on probe texts when the router starts), the router
    computes a prompt's ids in process: the ids a replica's Tokenize gives, for text and chat prompts (long ones, in a
    worker thread; non-ASCII), hence the same block hashes and routing, and N requests through the gateway make no
    Tokenize call at all. Without a tokenizer, or with one that tokenizes otherwise (BOS added), every request asks
    a replica's Tokenize, as before the router counted locally, and the log says so once."""
    monkeypatch.setattr(backend, "LOCAL_COUNT_INLINE_CHARS", 1000)  # the 2,000-character prompts go to a thread
    bos = make_tiny_tokenizer()
    bos.add_bos = True
    n = 8

    async def serve(router: Router, calls: collections.Counter[str]) -> int:
        """N requests (completions and chats) through a gateway over `router`; the Tokenize calls they made."""
        before = sum(calls.values())
        gateway = Gateway(router, OpenGate(), GatewayConfig(http_port=0, grpc_port=0))
        await gateway.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=60) as client:
                model = (await router.model_info()).model_name
                for i in range(n):
                    body = {"model": model, "max_tokens": 4, "temperature": 0}
                    if i % 2:  # within the 128-token context with the 4 tokens asked for
                        body["messages"] = [{"role": "user", "content": f"{i} {NON_ASCII[:40]}"}]
                        expected = len(make_tiny_tokenizer().encode_chat(body["messages"]))
                    else:
                        body["prompt"] = f"{PROMPTS[i][:40]} {NON_ASCII[:30]}"
                        expected = len(body["prompt"].encode())
                    r = await client.post("/v1/chat/completions" if i % 2 else "/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    assert r.json()["usage"]["prompt_tokens"] == expected
            return sum(calls.values()) - before
        finally:
            await gateway.stop()  # closes the router too

    async def main():
        reference = GrpcReplica(replicas[0].address)
        routers = {
            "local": Router(specs(replicas), FAST, vocab=TokenVocab(make_tiny_tokenizer())),
            "bos": Router(specs(replicas), FAST, vocab=TokenVocab(bos)),
            "none": Router(specs(replicas), FAST),
        }
        calls = {name: counting_tokenize(router) for name, router in routers.items()}
        try:
            for router in routers.values():
                await router.start()
            local = routers["local"]
            await wait_until(lambda: local.counts_locally, 10, "the probes agreeing")
            assert sum(calls["local"].values()) == 2  # the two probe texts, once
            for request in TOKENIZED:
                expected = list((await reference.tokenize(request)).token_ids)
                assert await local.count_tokens(request) == len(expected)
                generate = pb.GenerateRequest()
                if request.WhichOneof("input") == "chat":
                    generate.chat.CopyFrom(request.chat)
                else:
                    generate.text = request.text
                assert await local.prompt_ids(generate) == expected  # kept from the count
                local._tokens.clear()
                ids = await local.prompt_ids(generate)  # computed again, in process
                assert ids == expected and policy.block_hashes(ids, 64) == policy.block_hashes(expected, 64)
                for other in ("bos", "none"):
                    assert await routers[other].prompt_ids(generate) == expected  # by the replica's Tokenize
            assert sum(calls["local"].values()) == 2
            # an input the replicas refuse is theirs to explain, naming the field
            with pytest.raises(GateError) as err:
                await local.count_tokens(pb.TokenizeRequest(text="", add_special_tokens=True))
            assert err.value.status == 400 and err.value.param == "prompt"
            assert sum(calls["local"].values()) == 3

            assert await serve(local, calls["local"]) == 0
            assert not routers["bos"].counts_locally and not routers["none"].counts_locally
            assert await serve(routers["bos"], calls["bos"]) == n
            assert await serve(routers["none"], calls["none"]) == n
        finally:
            await reference.close()
            for router in routers.values():
                if not router._closed:
                    await router.close()

    with caplog.at_level(logging.INFO, logger="gateway.backend"):
        asyncio.run(main())
    # which way each router tokenizes is said once, at its check
    messages = [r.getMessage() for r in caplog.records]
    for line in (
        "fleet: prompts are tokenized in the gateway",
        "fleet: the gateway's tokenizer (--tokenizer) tokenizes differently",
        "fleet: the gateway has no tokenizer",
    ):
        assert sum(line in m for m in messages) == 1, (line, messages)


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


# ----- device-seconds of cut attempts (scripted replicas, no processes) ---------------------------------------------


class _Health:
    async def Check(self, request, timeout=None):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class _Scripted:
    """A Generation that yields its messages (the first after `delay` seconds), then raises its error (if any;
    `_HANG`: never answers again)."""

    def __init__(self, messages: list[pb.GenerateResponse], error: GateError | None, delay: float = 0.0) -> None:
        self._messages, self._error, self._delay = list(messages), error, delay

    def __aiter__(self):
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        await asyncio.sleep(self._delay)
        self._delay = 0.0
        if self._messages:
            return self._messages.pop(0)
        if self._error is _HANG:
            await asyncio.Event().wait()
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def cancel(self) -> None:
        pass


class _ScriptedReplica:
    """Stands for a replica's gRPC client: each Generate plays the next script."""

    def __init__(self, scripts: list[tuple]) -> None:
        """`scripts`: one (messages, error[, delay]) per Generate call, as `_Scripted` takes them."""
        self.scripts, self.requests = list(scripts), []

    async def load(self) -> pb.Load:
        return pb.Load(slots_total=4, free_slots=4, kv_page_size=16)

    async def model_info(self) -> pb.ModelInfo:
        return pb.ModelInfo(model_name="scripted", vocab_size=256, context_length=128, num_slots=4)

    def generate(self, request: pb.GenerateRequest) -> _Scripted:
        self.requests.append(request)
        return _Scripted(*self.scripts.pop(0))

    async def close(self) -> None:
        pass


def _tokens(*ids: int, **fields) -> pb.GenerateResponse:
    return pb.GenerateResponse(token_ids=list(ids), text="x" * len(ids), **fields)


def _last(*ids: int, completion: int, device: float) -> pb.GenerateResponse:
    usage = pb.Usage(prompt_tokens=3, completion_tokens=completion, device_seconds=device)
    return _tokens(*ids, finish_reason=pb.FINISH_REASON_LENGTH, usage=usage)


_DIED = GateError(503, "the model is unavailable (connection reset)", kind="server_error", code="unavailable")
_HANG = GateError(0, "never raised: the stream stops answering")


async def _scripted_router(*replicas: _ScriptedReplica, config: RouterConfig | None = None) -> Router:
    names = [f"r{i}" for i in range(len(replicas))]
    config = config or RouterConfig(policy="round_robin")
    router = Router([ReplicaSpec(name=n, address="127.0.0.1:9") for n in names], config)
    for name, replica in zip(names, replicas, strict=True):
        router._members[name].replica = replica
        router._members[name]._health = _Health()
    await router.start()
    return router


def test_a_resumed_requests_usage_counts_the_cut_attempts_device_seconds():
    """The final usage's device-seconds is every attempt's: a cut attempt's as its replica reported it (a drain
    timeout's last message), else estimated at the request's own rate on the replica that finished it."""
    request = pb.GenerateRequest(request_id="d", token_ids=pb.TokenIds(ids=[7, 8, 9]), sampling=pb.SamplingOptions())
    request.sampling.max_tokens = 6

    async def run(cut_end: list[pb.GenerateResponse]) -> tuple[RoutedGeneration, list[pb.GenerateResponse], list]:
        died = _ScriptedReplica([([_tokens(1), _tokens(2), *cut_end], _DIED)])
        # the resumed hop generates 4 tokens for 1.2 s: 0.3 s per token
        finisher = _ScriptedReplica([([_tokens(3), _last(4, 5, 6, completion=6, device=1.2)], None)])
        router = await _scripted_router(died, finisher)
        try:
            stream = router.generate(request)
            messages = await run_stream(stream, timeout=10)
            return stream, messages, finisher.requests
        finally:
            await router.close()

    async def main():
        stream, messages, resumed = await run([])  # died: no word from it
        assert ids_of(messages) == [1, 2, 3, 4, 5, 6] and stream.replica == "r0>r1"
        assert resumed[0].resumed_tokens == 2 and list(resumed[0].token_ids.ids) == [7, 8, 9, 1, 2]
        assert stream.device_seconds_by_replica == pytest.approx({"r0": 2 * 0.3, "r1": 1.2})
        assert messages[-1].usage.device_seconds == pytest.approx(1.8)

        drained = pb.GenerateResponse(
            finish_reason=pb.FINISH_REASON_CANCELLED, usage=pb.Usage(completion_tokens=2, device_seconds=0.25)
        )
        stream, messages, _ = await run([drained])  # drained: it said what it spent
        assert ids_of(messages) == [1, 2, 3, 4, 5, 6] and stream.replica == "r0>r1"
        assert messages[-1].usage.device_seconds == pytest.approx(1.2 + 0.25)

        # every token streamed before the cut (only the finish was lost): priced at the cut replica's own rate
        only = _ScriptedReplica(
            [([_last(1, 2, 3, 4, completion=4, device=0.4)], None), ([_tokens(1), _tokens(2)], _DIED)]
        )
        router = await _scripted_router(only)
        try:
            await run_stream(router.generate(request), timeout=10)  # 0.1 s per token on r0
            two = pb.GenerateRequest()
            two.CopyFrom(request)
            two.sampling.max_tokens = 2
            stream = router.generate(two)
            messages = await run_stream(stream, timeout=10)
            assert ids_of(messages) == [1, 2] and messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert messages[-1].usage.device_seconds == pytest.approx(0.2)
        finally:
            await router.close()

    asyncio.run(main())


def test_a_stop_string_stream_cut_after_its_last_token_is_not_faked():
    """Without stop strings a stream cut after its last token ends as `length` (its text was all streamed); with
    them the lost finish message may have carried held-back text that no replica can be asked for: a 503."""

    async def main():
        for stop in ([], ["zz"]):
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7, 8]), sampling=pb.SamplingOptions(stop=stop))
            request.sampling.max_tokens = 2
            router = await _scripted_router(_ScriptedReplica([([_tokens(1), _tokens(2)], _DIED)]))
            try:
                stream = router.generate(request)
                if not stop:
                    messages = await run_stream(stream, timeout=10)
                    assert ids_of(messages) == [1, 2] and messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
                    continue
                with pytest.raises(GateError, match=r"after 2 completed tokens .* held back") as info:
                    await run_stream(stream, timeout=10)
                assert info.value.status == 503
            finally:
                await router.close()

    asyncio.run(main())


def test_a_stalled_stream_is_cut_after_the_stall_limit_and_resumed():
    """A replica that stops sending mid-stream (its probes still answered) is cut after `stall_timeout`: the stream
    resumes elsewhere and the stall counts against the replica. Before an attempt's first message no limit applies
    (the request may be queued there)."""
    request = pb.GenerateRequest(request_id="s", token_ids=pb.TokenIds(ids=[7, 8, 9]), sampling=pb.SamplingOptions())
    request.sampling.max_tokens = 4

    async def main():
        stalls = _ScriptedReplica([([_tokens(1)], _HANG)])
        finisher = _ScriptedReplica([([_last(2, 3, 4, completion=4, device=0.3)], None)])
        config = RouterConfig(policy="round_robin", stall_timeout=0.3)
        router = await _scripted_router(stalls, finisher, config=config)
        try:
            started = time.monotonic()
            stream = router.generate(request)
            messages = await run_stream(stream, timeout=10)
            took = time.monotonic() - started
            assert ids_of(messages) == [1, 2, 3, 4] and stream.replica == "r0>r1"
            assert 0.3 <= took < 3, took
            assert finisher.requests[0].resumed_tokens == 1
            snap = router.snapshot()
            assert snap["failovers"] == {"resume": 1}
            assert snap["replicas"][0]["failures"] == 1 and "stalled" in router._members["r0"].last_error
        finally:
            await router.close()

        # no message yet: waiting in the replica's queue is not a stall
        slow = _ScriptedReplica([([_last(1, 2, 3, 4, completion=4, device=0.1)], None, 0.3)])
        router = await _scripted_router(slow, config=RouterConfig(stall_timeout=0.05))
        try:
            stream = router.generate(request)
            messages = await run_stream(stream, timeout=10)
            assert ids_of(messages) == [1, 2, 3, 4] and stream.replica == "r0"
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


# ----- failover -----------------------------------------------------------------------------------------------------


def test_sigstop_under_load_cuts_and_resumes_the_hung_replicas_streams_then_readmits_it(replicas):
    """A frozen replica keeps its connections open, so its streams would hang: once its probes go unanswered it is
    ejected and every stream on it is cut and resumed (or retried) elsewhere, the texts equal to the uninterrupted
    ones, with stop strings (matching, or holding text back that the cut must not lose); after SIGCONT it is
    readmitted and serves again."""
    victim = replicas[0]

    async def main():
        config = RouterConfig(
            poll_period=0.2, probe_timeout=1.0, policy="round_robin", ejection=EjectionConfig(cooldown=0.5)
        )
        router = await up_router(replicas, config)
        stopped = False
        try:
            ref = await reference(router)
            stops = await stop_reference(router)
            # every stream has a stop string (the SIGKILL test runs without): 4 on each replica
            streams = [router.generate(greedy(p, stop=[stops[p][0]])) for p in PROMPTS]
            expected = {p: (stops[p][1], stops[p][2]) for p in PROMPTS}
            got: list[list[pb.GenerateResponse]] = [[] for _ in streams]

            async def read(i):
                async for message in streams[i]:
                    got[i].append(message)

            tasks = [asyncio.create_task(read(i)) for i in range(len(streams))]
            await wait_until(
                lambda: sum(1 for s, g in zip(streams, got, strict=True) if s.replica == "r0" and g) >= 2,
                30,
                "streams under way on r0",
            )
            on_victim = [i for i, s in enumerate(streams) if s.replica == "r0"]
            # far from their end: no finish message can be on its way when the process stops
            cut = [i for i in on_victim if len(ids_of(got[i])) < min(MAX_TOKENS // 2, len(expected[PROMPTS[i]][0]) - 8)]
            under_way = [i for i in cut if got[i]]
            victim.process.send_signal(signal.SIGSTOP)
            stopped, frozen_at = True, time.monotonic()
            await wait_until(lambda: router.snapshot()["replicas"][0]["state"] == "ejected", 15, "r0 ejected")
            ejected_after = time.monotonic() - frozen_at
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            done_after = time.monotonic() - frozen_at
            for i, messages in enumerate(got):
                assert (ids_of(messages), text_of(messages)) == expected[PROMPTS[i]], (i, streams[i].replica)
                assert sum(1 for m in messages if m.request_id) == 1
                assert messages[-1].usage.completion_tokens == len(expected[PROMPTS[i]][0])
            assert under_way, "no stream was under way on r0"
            moved = [i for i, s in enumerate(streams) if s.replica.startswith("r0>")]
            assert set(cut) <= set(moved), [s.replica for s in streams]
            # a stream with no token yet is retried, one under way resumed (one whose first message was on its way
            # when the process stopped may be either)
            failovers = router.snapshot()["failovers"]
            assert failovers.get("resume", 0) >= len(under_way), failovers
            assert failovers.get("resume", 0) + failovers.get("retry", 0) == len(moved), failovers
            print(f"r0 frozen: ejected after {ejected_after:.2f} s, {failovers}, all done after {done_after:.2f} s")

            victim.process.send_signal(signal.SIGCONT)
            stopped = False
            await wait_until(lambda: router.snapshot()["replicas"][0]["state"] == "up", 20, "r0 readmitted")
            after = [router.generate(greedy(p)) for p in PROMPTS[:3]]  # round-robin: one each
            results = await asyncio.gather(*(run_stream(s) for s in after))
            assert "r0" in {s.replica for s in after}, [s.replica for s in after]
            for p, messages in zip(PROMPTS[:3], results, strict=True):
                assert (ids_of(messages), text_of(messages)) == ref[p]
        finally:
            if stopped:
                victim.process.send_signal(signal.SIGCONT)
            await router.close()

    asyncio.run(main())


def test_a_failover_is_billed_to_each_replica_at_its_own_price(replicas, tmp_path_factory, postgres_url):  # noqa: F811
    """A replica SIGKILLed mid-stream behind a gateway that keeps a ledger (StoreGate on PostgreSQL): each stream it
    was serving resumes on r0, and its ledger row charges the dead replica's device-seconds (estimated from the tokens
    it streamed) at the dead replica's price and r0's at r0's, the shares summing to the row's device-seconds and
    device cost; the gateway's cost metric counts the same. A stream r0 served alone is priced as before, with no
    breakdown. (The victim is a replica of this test's own: the module's three live on.)"""
    (victim,) = start_replicas(1, str(tmp_path_factory.mktemp("victim")), f"--step_delay={STEP_DELAY}")
    prices = Prices({"v": ReplicaPrice(per_chip_hour=40.0, chips=4), "r0": ReplicaPrice(per_chip_hour=1.5, chips=2)})
    store = Store(create_database(postgres_url))

    async def main():
        fleet = [ReplicaSpec(name="v", address=victim.address), ReplicaSpec(name="r0", address=replicas[0].address)]
        router = Router(fleet, RouterConfig(poll_period=0.2, policy="round_robin"))
        await router.start()
        await wait_until(lambda: all(r["state"] == "up" for r in router.snapshot()["replicas"]), 20, "v and r0 up")
        gate = StoreGate(store, keys_required=False, prices=prices)
        gateway = Gateway(router, gate, GatewayConfig(http_port=0, grpc_port=0))
        await gateway.start()
        chunks = [0] * 4
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=60) as client:
                model = (await router.model_info()).model_name

                async def stream(i: int) -> dict:
                    body = {"model": model, "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0}
                    body.update(ignore_eos=True, stream=True, stream_options={"include_usage": True})
                    usage = None
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        async for line in r.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            event = json.loads(line[6:])
                            chunks[i] += bool(event["choices"])
                            usage = event.get("usage") or usage
                    return usage

                tasks = [asyncio.create_task(stream(i)) for i in range(4)]  # round-robin: two on each
                await wait_until(lambda: min(chunks) >= 2, 30, "every stream under way")
                victim.process.send_signal(signal.SIGKILL)
                usages = await asyncio.wait_for(asyncio.gather(*tasks), 90)
            assert [u["completion_tokens"] for u in usages] == [MAX_TOKENS] * 4
            assert gate.ledger.flush(10)
            with store.read() as s:
                rows = s.scalars(sa.select(LedgerRow)).all()
            assert len(rows) == 4
            moved = [r for r in rows if r.replica == "v>r0"]
            assert len(moved) == 2 and [r.replica for r in rows].count("r0") == 2, [r.replica for r in rows]
            for row in moved:
                shares = row.device_seconds_by_replica
                assert set(shares) == {"v", "r0"} and min(shares.values()) > 0, shares
                assert row.device_seconds == pytest.approx(sum(shares.values()))
                assert row.cost_device_by_replica == pytest.approx(
                    {"v": shares["v"] * 4 * 40.0 / 3600, "r0": shares["r0"] * 2 * 1.5 / 3600}
                )
                assert row.cost_device == pytest.approx(sum(row.cost_device_by_replica.values()))
                assert row.cost_device > prices.device_cost("r0", row.device_seconds)  # all at r0's: too cheap
            for row in rows:
                if row.replica == "r0":
                    assert row.device_seconds_by_replica is None and row.cost_device_by_replica is None
                    assert row.cost_device == prices.device_cost("r0", row.device_seconds) > 0
            registry, billed = gateway.metrics.registry, sum(r.cost_device for r in rows)

            def device_cost() -> float | None:
                return registry.get_sample_value("meshserve_gateway_cost_total", {"kind": "device"})

            await wait_until(lambda: device_cost() == pytest.approx(billed), 5, "the device cost metric")
        finally:
            await gateway.stop()  # writes the rest of the ledger, closes the router

    try:
        asyncio.run(main())
    finally:
        victim.stop()
        store.close()


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
