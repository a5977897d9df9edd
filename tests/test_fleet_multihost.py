"""A multi-host replica in the fleet: `scripts/serve.py` as a two-process jax.distributed job (one CPU device each,
gloo collectives on 127.0.0.1, the tiny model's heads split over both processes by a `tensor:2` mesh) is ONE replica
to the router, beside an ordinary single-process replica (tests/fleet_support.py) with the same random weights.

The fleet config names process 0's gRPC address only (the followers serve nothing); the router's snapshot holds one
entry for the job, with the slots and health process 0 reports, and its cost counts both hosts' chips. Requests the
router sends to the job stream exactly the greedy tokens the single-process replica streams. SIGTERM to process 0
drains the job (its followers exit with it): the router stops sending to it, the streams under way finish, and the
fleet keeps serving on the other replica. Every wait is bounded; every process is killed by its pid at the end.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import jax.numpy as jnp
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from checkpoints.orbax_io import save_checkpoint
from engine.config import tiny_config
from engine.model import init_params, stack_layers
from engine.tokenizer import make_tiny_tokenizer
from fleet.router import Router, RouterConfig
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc
from tests.fleet_support import COMPILE_CACHE, ROOT, start_replicas
from tests.service_support import TINY_ENGINE
from tests.test_multihost import free_port

START_TIMEOUT_S = 150.0
RPC_TIMEOUT_S = 30.0
PAGE_SIZE = 64  # EngineConfig's default, which tests.fleet_support's replica runs with
SHORT, LONG = 24, 80  # max_tokens; prompt + LONG fits the 128-token context
PROMPTS = [f"host {i} asks the fleet: where?" for i in range(8)]
assert all(len(p) + LONG < TINY_ENGINE["max_seq_len"] for p in PROMPTS)


def _serve_cmd(pid: int, coordinator: int, grpc_port: int, checkpoint: str) -> list[str]:
    """Process `pid` of the two-process replica, with the engine shapes of tests.fleet_support's replica."""
    e = TINY_ENGINE
    return [
        sys.executable,
        os.path.join(ROOT, "scripts", "serve.py"),
        f"--checkpoint={checkpoint}",
        f"--num_slots={e['num_slots']}",
        f"--max_seq_len={e['max_seq_len']}",
        f"--max_prefill_len={e['max_prefill_len']}",
        f"--decode_steps={e['decode_steps']}",
        f"--page_size={PAGE_SIZE}",
        f"--dtype={e['dtype']}",
        "--mesh=data:1,tensor:2",  # one device per process: the heads are split across the two processes
        f"--coordinator_address=127.0.0.1:{coordinator}",
        "--num_processes=2",
        f"--process_id={pid}",
        f"--port={grpc_port}",
        "--metrics_port=-1",
        "--http_port=-1",
        "--memory_bandwidth_gbps=20",
        f"--compilation_cache={COMPILE_CACHE}",
        "--drain_timeout=30",
    ]


def _greedy(prompt: str, max_tokens: int) -> pb.GenerateRequest:
    options = pb.SamplingOptions(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return pb.GenerateRequest(text=prompt, sampling=options)


def _ids(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]


def _text(messages) -> str:
    return "".join(m.text for m in messages)


def _wait_serving(address: str, procs: list[subprocess.Popen], logs: list[str], timeout: float) -> None:
    """Until `address` answers health SERVING (warm-up done); fails at once when a process of the job exits."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            for p, log in zip(procs, logs, strict=True):
                if p.poll() is not None:
                    with open(log) as f:
                        raise AssertionError(f"a process of the job exited ({p.returncode}): {f.read()[-3000:]}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"{address} not SERVING after {timeout} s"
            time.sleep(0.5)


async def _run(stream, timeout: float = 60.0) -> list[pb.GenerateResponse]:
    async def read():
        return [m async for m in stream]

    try:
        return await asyncio.wait_for(read(), timeout)
    finally:
        stream.cancel()


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(300)
def test_multihost_replica_is_one_replica_of_the_fleet(tmp_path):
    cfg = tiny_config()  # the model tests.fleet_support's replica builds, with init_params' seed 0
    checkpoint = str(tmp_path / "tiny")
    save_checkpoint(checkpoint, cfg, stack_layers(init_params(cfg, jnp.float32), cfg.num_layers), make_tiny_tokenizer())

    coordinator, leader_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    logs = [str(tmp_path / f"host-{pid}.log") for pid in (0, 1)]
    hosts: list[subprocess.Popen] = []
    single = []
    try:
        for pid in (0, 1):
            with open(logs[pid], "w") as log:  # the child keeps its own copy of the descriptor
                cmd = _serve_cmd(pid, coordinator, leader_port, checkpoint)
                hosts.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        single = start_replicas(1, str(tmp_path))  # compiles while the job starts
        leader = f"127.0.0.1:{leader_port}"
        _wait_serving(leader, hosts, logs, START_TIMEOUT_S)

        # the job, asked directly: one engine over both processes' devices, answering on process 0 only
        with grpc.insecure_channel(leader) as channel:
            stub = pb_grpc.MeshServeStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S)
            load = stub.GetLoad(pb.GetLoadRequest(), timeout=RPC_TIMEOUT_S)
        assert {a.name: a.size for a in info.mesh} == {"data": 1, "tensor": 2} and info.platform == "cpu"
        assert info.num_slots == load.slots_total == TINY_ENGINE["num_slots"] and load.kv_pages_total > 0
        with open(logs[1]) as f:
            assert "meshserve listening" not in f.read()  # the follower serves nothing

        # the reference: greedy streams of the single-process replica, asked directly
        with grpc.insecure_channel(single[0].address) as channel:
            stub = pb_grpc.MeshServeStub(channel)
            reference = {}
            for p in PROMPTS:
                messages = list(stub.Generate(_greedy(p, LONG), timeout=RPC_TIMEOUT_S))
                reference[p] = (_ids(messages), _text(messages))
        assert all(len(ids) == LONG for ids, _ in reference.values())

        fleet = tmp_path / "fleet.toml"
        fleet.write_text(
            "[[replicas]]\n"
            'name = "mh"\n'
            f'address = "{leader}"\n'
            'region = "a"\n'
            'pool = "cpu-2x1"\n'
            "price_per_chip_hour = 1.5\n"
            "chips = 2\n"
            "\n"
            "[[replicas]]\n"
            'name = "single"\n'
            f'address = "{single[0].address}"\n'
            'region = "b"\n'
            "price_per_chip_hour = 1.5\n"
        )
        # the router's own region is "a": requests go to the multi-host replica while it has room
        asyncio.run(_fleet(str(fleet), leader, load, reference, hosts))

        codes = [p.wait(timeout=60) for p in hosts]
        assert codes == [0, 0], [pathlib.Path(log).read_text()[-3000:] for log in logs]
        with open(logs[1]) as f:
            assert "follower: leader stopped" in f.read()
    finally:
        for p in hosts:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for child in single:
            child.stop()


async def _fleet(path: str, leader: str, load: pb.Load, reference: dict, hosts: list[subprocess.Popen]) -> None:
    """The router over the replicas file `path`; `load` is what process 0 reported when asked directly."""
    router = Router(path, RouterConfig(poll_period=0.2, probe_timeout=2.0, region="a"))
    await router.start()
    try:
        await _until(lambda: all(r["state"] == "up" for r in router.snapshot()["replicas"]), 20, "both replicas up")

        # one replica: one entry, process 0's address, the slots process 0 reports (not one set per process)
        snap = router.snapshot()
        assert [(r["name"], r["region"]) for r in snap["replicas"]] == [("mh", "a"), ("single", "b")]
        mh = snap["replicas"][0]
        assert mh["address"] == leader
        assert (mh["slots"], mh["kv_pages_total"], mh["reason"]) == (load.slots_total, load.kv_pages_total, "")
        assert mh["cost_per_hour"] == pytest.approx(2 * 1.5)  # both hosts' chips
        assert snap["regions"]["a"]["replicas"] == 1 and snap["regions"]["a"]["up"] == 1
        info = await router.model_info()
        assert info.num_slots == 2 * TINY_ENGINE["num_slots"]  # the job's 4 slots + the single replica's 4
        assert (await router.load()).slots_total == 2 * TINY_ENGINE["num_slots"]

        # routed to the job: the single-process replica's greedy tokens
        streams = [router.generate(_greedy(p, SHORT)) for p in PROMPTS[:4]]
        results = await asyncio.gather(*(_run(s) for s in streams))
        for p, s, messages in zip(PROMPTS[:4], streams, results, strict=True):
            assert s.replica == "mh"
            ids, _ = reference[p]
            assert _ids(messages) == ids[:SHORT]  # greedy: the first SHORT of the LONG reference
            assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert router.snapshot()["replicas"][0]["routed"] == 4

        # drain the job while it streams: SIGTERM to process 0 only
        long = [router.generate(_greedy(p, LONG)) for p in PROMPTS[4:8]]
        got: list[list[pb.GenerateResponse]] = [[] for _ in long]

        async def read(i: int) -> None:
            async for message in long[i]:
                got[i].append(message)

        tasks = [asyncio.create_task(read(i)) for i in range(len(long))]
        await _until(lambda: all(got), 30, "the long streams under way")
        assert all(s.replica == "mh" for s in long)
        hosts[0].send_signal(signal.SIGTERM)
        await _until(lambda: router.snapshot()["replicas"][0]["state"] != "up", 15, "the router to see the drain")
        routed = router.snapshot()["replicas"][0]["routed"]

        # the fleet keeps serving on the other replica, with the same tokens
        after = [router.generate(_greedy(p, SHORT)) for p in PROMPTS[:4]]
        for p, s, messages in zip(PROMPTS[:4], after, await asyncio.gather(*(_run(s) for s in after)), strict=True):
            assert s.replica == "single" and _ids(messages) == reference[p][0][:SHORT]
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        for p, s, messages in zip(PROMPTS[4:8], long, got, strict=True):
            assert (_ids(messages), _text(messages)) == reference[p]
            assert s.replica == "mh"  # finished where it started: the drain let it
        # the job left: process 0 stops answering, the router ejects it, nothing more was sent to it
        await asyncio.to_thread(hosts[0].wait, 60)
        await _until(lambda: router.snapshot()["replicas"][0]["state"] == "ejected", 15, "the job ejected")
        assert router.snapshot()["replicas"][0]["routed"] == routed
        last = router.generate(_greedy(PROMPTS[0], SHORT))
        assert _ids(await _run(last)) == reference[PROMPTS[0]][0][:SHORT] and last.replica == "single"
        assert (await router.load()).slots_total == TINY_ENGINE["num_slots"]
    finally:
        await router.close()
