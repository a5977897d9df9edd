"""scripts/serve.py as a two-process job (2 x 4 CPU devices, jax.distributed on 127.0.0.1, gloo): process 0 serves
gRPC and broadcasts plans, process 1 replays them; streamed tokens equal one process's offline output, and SIGTERM to
the leader drains it and stops the follower, both exiting 0. Every wait is bounded; leftover processes are killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc
from tests import multihost_child as child
from tests.test_multihost import checkpoint, free_port, single_process_tokens  # noqa: F401 (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 240


def _serve_cmd(pid: int, coordinator: int, grpc_port: int, ckpt: str) -> list[str]:
    e = child.ENGINE
    return [
        sys.executable,
        os.path.join(REPO, "scripts", "serve.py"),
        f"--checkpoint={ckpt}",
        f"--num_slots={e.num_slots}",
        f"--max_seq_len={e.max_seq_len}",
        f"--max_prefill_len={e.max_prefill_len}",
        f"--page_size={e.page_size}",
        f"--decode_steps={e.decode_steps}",
        "--dtype=float32",
        "--mesh=data:2,tensor:4",
        f"--coordinator_address=127.0.0.1:{coordinator}",
        "--num_processes=2",
        f"--process_id={pid}",
        f"--port={grpc_port}",
        "--metrics_port=-1",
        "--http_port=-1",
        "--compilation_cache=",
        "--drain_timeout=20",
    ]


@pytest.mark.timeout(420)
def test_two_process_server_streams_single_process_tokens(checkpoint, single_process_tokens, tmp_path):  # noqa: F811
    coordinator, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    procs, logs = [], []
    try:
        for pid in (0, 1):
            log = open(tmp_path / f"serve-{pid}.log", "w")  # noqa: SIM115 (closed in finally)
            logs.append(log)
            cmd = _serve_cmd(pid, coordinator, grpc_port, checkpoint)
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT_S)
        stub = pb_grpc.MeshServeStub(channel)
        got = []
        for prompt in child.PROMPTS:
            request = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt),
                sampling=pb.SamplingOptions(max_tokens=child.MAX_TOKENS, ignore_eos=True),
            )
            # UNAVAILABLE while warming up: retry until the leader serves
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    stream = list(stub.Generate(request, timeout=60))
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)
            got.append([t for msg in stream for t in msg.token_ids])
        channel.close()
        assert got == single_process_tokens

        procs[0].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
        assert codes == [0, 0], [(tmp_path / f"serve-{i}.log").read_text()[-3000:] for i in (0, 1)]
        assert "follower: leader stopped" in (tmp_path / "serve-1.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
