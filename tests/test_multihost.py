"""Two processes x 4 CPU devices joined with jax.distributed on 127.0.0.1 (gloo): an offline batch job and a served
run (leader scheduler broadcasting plans, follower replaying them) give the same tokens as one process, and a dead
follower makes the leader fail fast instead of hanging. The processes are `tests/multihost_child.py`; every wait is
bounded by a timeout, and a process still running at the end of a test is killed by its pid.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from checkpoints.orbax_io import save_checkpoint
from engine.config import tiny_config
from engine.load import load_engine
from engine.model import init_params, stack_layers
from engine.offline import OfflineItem, run_offline
from engine.scheduler import Scheduler
from engine.tokenizer import make_tiny_tokenizer
from tests import multihost_child as child

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_TIMEOUT_S = 240
# heartbeat timeout (5 s) + detection and abort; far below the time a hang would take to hit JOB_TIMEOUT_S
FAIL_FAST_S = 45


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    cfg = tiny_config(num_heads=8, num_kv_heads=4)  # heads divide the 4-way tensor axis
    directory = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_checkpoint(directory, cfg, stack_layers(init_params(cfg, jnp.float32), cfg.num_layers), make_tiny_tokenizer())
    return directory


@pytest.fixture(scope="module")
def single_process_tokens(checkpoint) -> list[list[int]]:
    engine, tokenizer = load_engine(checkpoint, child.ENGINE)
    items = [OfflineItem(str(i), child.params(), token_ids=p) for i, p in enumerate(child.PROMPTS)]
    return [r.token_ids for r in run_offline(Scheduler(engine, tokenizer), items)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_job(mode: str, checkpoint: str, tmp_path) -> list[tuple[subprocess.Popen, str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    procs = []
    for pid in (0, 1):
        out = str(tmp_path / f"{mode}-{pid}.json")
        cmd = [sys.executable, os.path.join(REPO, "tests", "multihost_child.py"), "--mode", mode]
        cmd += ["--process_id", str(pid), "--port", str(port), "--checkpoint", checkpoint, "--out", out]
        with open(tmp_path / f"{mode}-{pid}.log", "w") as log:  # the child keeps its own copy of the descriptor
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), out))
    return procs


def wait_all(procs, timeout: float) -> list[int]:
    """Return codes; any process still running at the deadline is killed (and the test fails)."""
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return codes


def log_of(tmp_path, mode: str, pid: int) -> str:
    with open(tmp_path / f"{mode}-{pid}.log") as f:
        return f.read()


def test_offline_job_on_two_processes_matches_one(checkpoint, single_process_tokens, tmp_path):
    procs = start_job("offline", checkpoint, tmp_path)
    codes = wait_all(procs, JOB_TIMEOUT_S)
    assert codes == [0, 0], log_of(tmp_path, "offline", 0)[-3000:] + log_of(tmp_path, "offline", 1)[-3000:]
    for _, out in procs:
        with open(out) as f:
            result = json.load(f)
        assert result["tokens"] == single_process_tokens
        assert result["spec"] == "P('tensor', None, None)"  # wq [N, H, D] split over the 4-way tensor axis


def test_served_requests_on_two_processes_match_one(checkpoint, single_process_tokens, tmp_path):
    procs = start_job("serve", checkpoint, tmp_path)
    codes = wait_all(procs, JOB_TIMEOUT_S)
    assert codes == [0, 0], log_of(tmp_path, "serve", 0)[-3000:] + log_of(tmp_path, "serve", 1)[-3000:]
    with open(procs[0][1]) as f:
        assert json.load(f)["tokens"] == single_process_tokens


def test_dead_follower_makes_the_leader_fail_fast(checkpoint, tmp_path):
    procs = start_job("kill_follower", checkpoint, tmp_path)
    (leader, _), (follower, _) = procs
    try:
        assert follower.wait(timeout=JOB_TIMEOUT_S) == -9
        died = time.monotonic()
        code = leader.wait(timeout=FAIL_FAST_S)
    finally:
        wait_all(procs, 0.1)
    assert code != 0
    assert time.monotonic() - died < FAIL_FAST_S
    log = log_of(tmp_path, "kill_follower", 0)
    assert "detected fatal errors" in log and "stopped sending heartbeats" in log, log[-3000:]
