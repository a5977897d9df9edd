"""The gateway's front doors over the fleet router and two real tiny-model replicas (tests/fleet_support.py), one in
region "a" and one in region "b", the router's own region "a":

- A gRPC request past twice `max_request_bytes` (and under `TRANSPORT_BYTES_FACTOR` times it) reaches the gateway's
  handler and is INVALID_ARGUMENT naming the limit, not gRPC's bare RESOURCE_EXHAUSTED (which clients retry
  forever); the front serves the next request. (HTTP's 413 for an oversized body: test_gateway_openai.py and
  test_gateway_e2e.py.)
- The caller's region, `x-meshserve-region` as an HTTP header or gRPC metadata, routes to the replica there (seen in
  the router's per-replica `routed` counts at /fleet.json); without one the router's own region is used; a region
  with no replica spills to one that has room; a malformed one is 400 / INVALID_ARGUMENT naming the header, and
  nothing is routed. A key's policy region wins over the header.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import httpx
import pytest

from fleet.config import ReplicaSpec
from fleet.router import Router, RouterConfig
from gateway import policy
from gateway.flow import REGION_HEADER
from gateway.gate import ChatTurn, PreparedRequest
from gateway.open_gate import OpenGate
from gateway.openai_api import DEFAULT_MAX_BODY_BYTES
from gateway.server import Gateway, GatewayConfig
from gateway.store import Store
from gateway.store_gate import StoreGate
from protos.meshserve.v1 import TRANSPORT_BYTES_FACTOR
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc
from tests.fleet_support import Child, start_replicas, wait_until

TIMEOUT = 60.0  # of every request: a broken gateway fails the test instead of hanging it
MAX_TOKENS = 4
REGIONS = ("a", "b")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> list[Child]:
    children = start_replicas(len(REGIONS), str(tmp_path_factory.mktemp("regions")))
    yield children
    for child in children:
        child.stop()


@contextlib.asynccontextmanager
async def fleet_gateway(children: list[Child], gate=None) -> AsyncIterator[Gateway]:
    """A gateway (HTTP and gRPC on free loopback ports) over a router whose own region is "a", once both replicas
    are up."""
    specs = [ReplicaSpec(name=f"r{i}", address=c.address, region=REGIONS[i]) for i, c in enumerate(children)]
    router = Router(specs, RouterConfig(poll_period=0.2, region="a"))
    await router.start()
    gateway = Gateway(router, gate or OpenGate(), GatewayConfig(http_port=0, grpc_port=0, drain_timeout=5.0))
    try:  # the gateway owns the router: its stop closes it
        await gateway.start()
        await wait_until(lambda: all(r["state"] == "up" for r in router.snapshot()["replicas"]), 20, "replicas up")
        yield gateway
    finally:
        await gateway.stop()


async def routed(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> dict[str, int]:
    """Requests the router has sent to each region's replica, from /fleet.json."""
    r = await client.get("/fleet.json", headers=headers)
    assert r.status_code == 200, r.text
    return {replica["region"]: replica["routed"] for replica in r.json()["replicas"]}


def newly(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {region: after[region] - before[region] for region in after if after[region] != before[region]}


def generate_request(text: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, sampling=pb.SamplingOptions(temperature=0.0, max_tokens=MAX_TOKENS))


async def stream(stub: pb_grpc.MeshServeStub, request: pb.GenerateRequest, metadata=()) -> list[pb.GenerateResponse]:
    return [m async for m in stub.Generate(request, metadata=metadata, timeout=TIMEOUT)]


def test_a_grpc_request_past_twice_the_limit_is_told_the_limit_and_the_front_serves_on(replicas):
    async def main():
        async with fleet_gateway(replicas) as gateway:
            limit = gateway.config.max_body_bytes
            assert limit == DEFAULT_MAX_BODY_BYTES
            huge = generate_request("x" * (9 << 20))
            assert 2 * limit < huge.ByteSize() < TRANSPORT_BYTES_FACTOR * limit
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                stub = pb_grpc.MeshServeStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stream(stub, huge)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
                assert f"the request is {huge.ByteSize()} bytes" in err.value.details()
                assert f"the limit is {limit} bytes (max_request_bytes)" in err.value.details()
                messages = await stream(stub, generate_request("a normal request after a huge one"))
                assert messages[-1].usage.completion_tokens == MAX_TOKENS

    asyncio.run(main())


def test_the_callers_region_routes_over_http_and_grpc(replicas):
    async def main():
        async with (
            fleet_gateway(replicas) as gateway,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=TIMEOUT) as client,
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
        ):
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            stub = pb_grpc.MeshServeStub(channel)

            async def over_http(region: str | None) -> dict[str, int]:
                before = await routed(client)
                body = {"model": model, "prompt": f"from {region}: hello", "max_tokens": MAX_TOKENS, "temperature": 0}
                headers = {} if region is None else {REGION_HEADER: region}
                r = await client.post("/v1/completions", json=body, headers=headers)
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
                return newly(before, await routed(client))

            async def over_grpc(region: str | None) -> dict[str, int]:
                before = await routed(client)
                metadata = () if region is None else ((REGION_HEADER, region),)
                messages = await stream(stub, generate_request(f"from {region}: hello"), metadata)
                assert messages[-1].usage.completion_tokens == MAX_TOKENS
                return newly(before, await routed(client))

            for send in (over_http, over_grpc):
                assert await send("b") == {"b": 1}, send.__name__  # the caller's region over the router's own
                assert await send("a") == {"a": 1}, send.__name__
                assert await send(None) == {"a": 1}, send.__name__  # none: the router's own region
                spilled = await send("zz")  # no replica there: served where there is room
                assert sum(spilled.values()) == 1, (send.__name__, spilled)

            for bad in ("eu west", "x" * 65, "a/b"):
                before = await routed(client)
                body = {"model": model, "prompt": "hello", "max_tokens": MAX_TOKENS}
                r = await client.post("/v1/completions", json=body, headers={REGION_HEADER: bad})
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["param"] == REGION_HEADER and REGION_HEADER in error["message"], error
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stream(stub, generate_request("hello"), ((REGION_HEADER, bad),))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
                assert REGION_HEADER in err.value.details()
                assert newly(before, await routed(client)) == {}

    asyncio.run(main())


def test_a_keys_policy_region_wins_over_its_header(replicas, tmp_path):
    store = Store(f"sqlite:///{tmp_path}/gateway.db")
    gate = StoreGate(store)
    gate.keys.create_user("batch")
    pinned = gate.keys.create_key("batch", "pinned")
    gate.policies.set("key", pinned.info.id, "test", {"region": "b", "operator": True})
    auth = {"authorization": f"Bearer {pinned.secret}"}

    async def main():
        async with (
            fleet_gateway(replicas, gate) as gateway,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=TIMEOUT) as client,
        ):
            model = (await client.get("/v1/models", headers=auth)).json()["data"][0]["id"]
            for region in ("a", None):
                before = await routed(client, auth)
                headers = auth if region is None else {**auth, REGION_HEADER: region}
                body = {"model": model, "prompt": "a batch job", "max_tokens": MAX_TOKENS}
                r = await client.post("/v1/completions", json=body, headers=headers)
                assert r.status_code == 200, r.text
                assert newly(before, await routed(client, auth)) == {"b": 1}, region

    try:
        asyncio.run(main())
    finally:
        store.close()


def test_the_policy_region_is_validated_and_applied_over_the_callers():
    request = PreparedRequest(model="m", messages=[ChatTurn("user", "hi")], prompt=None, sampling={}, region="a")
    assert policy.apply_policy(policy.Policy(), request).region == "a"
    assert policy.apply_policy(policy.Policy(region="eu-west.2"), request).region == "eu-west.2"
    for bad in ("", "eu west", "x" * 65):
        with pytest.raises(ValueError, match="region"):
            policy.Policy(region=bad)
