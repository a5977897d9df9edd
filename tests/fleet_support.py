"""Fleet test replicas: a tiny-model meshserve server in a process of its own (so a test can SIGKILL or SIGTERM it),
and helpers to start several.

    python -m tests.fleet_support --step_delay 0.02 [--drain_timeout 30] [--num_slots 4] [--max_waiting 64]

prints `replica listening on 127.0.0.1:<port>` once warm (health SERVING), drains on SIGTERM and exits 0. Every
replica has the same random weights (seed 0) and byte-level tokenizer, so greedy output is the same on each.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 180.0
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), "meshserve-fleet-test-jax-cache")


@dataclasses.dataclass
class Child:
    """A replica process and its port."""

    process: subprocess.Popen
    port: int
    log_path: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


async def wait_until(predicate, timeout: float, what: str, poll: float = 0.05) -> None:
    """Polls `predicate` until it holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(poll)


def start_replicas(n: int, log_dir: str, *args: str) -> list[Child]:
    """Starts `n` replica processes and waits (bounded) until each is warm; kills them all on failure. They start
    together once the compilation cache holds the tiny model's shapes; before that one goes first and fills it."""
    return start_each(log_dir, *[args] * n)


def start_each(log_dir: str, *arg_lists: Sequence[str]) -> list[Child]:
    """Starts one replica process per argument list (e.g. one with `--max_waiting 1` beside one with more), as
    `start_replicas` starts its `n`: together once the compilation cache is warm, bounded, all killed on failure."""
    n = len(arg_lists)
    if n > 1 and not (os.path.isdir(COMPILE_CACHE) and os.listdir(COMPILE_CACHE)):
        first = start_each(log_dir, arg_lists[0])
        try:
            return first + start_each(log_dir, *arg_lists[1:])
        except BaseException:
            first[0].stop()
            raise
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        # the replicas compile the same tiny shapes: a shared persistent cache turns ~45 s of compiling into ~5
        "JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    env.pop("XLA_FLAGS", None)  # one CPU device each
    procs = []
    for args in arg_lists:
        path = tempfile.mktemp(prefix="replica-", suffix=".log", dir=log_dir)
        log = open(path, "w")  # noqa: SIM115 (the child owns it; closed when the parent exits)
        cmd = [sys.executable, "-m", "tests.fleet_support", *args]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True), path))
    children: list[Child] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        for process, path in procs:
            port = _wait_port(process, deadline, path)
            children.append(Child(process, port, path))
    except BaseException:
        for process, _ in procs:
            process.kill()
        raise
    return children


def _wait_port(process: subprocess.Popen, deadline: float, path: str) -> int:
    found: list[int] = []

    def read() -> None:
        for line in process.stdout:
            m = re.match(r"replica listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                found.append(int(m.group(1)))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(max(deadline - time.monotonic(), 0.1))
    if not found:
        with open(path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"replica did not start (exit {process.poll()}): {tail}")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step_delay", type=float, default=0.0, help="seconds slept before each decode dispatch")
    parser.add_argument("--drain_timeout", type=float, default=30.0)
    parser.add_argument("--num_slots", type=int, default=4)
    parser.add_argument("--max_waiting", type=int, default=64, help="bound of its waiting queue (RESOURCE_EXHAUSTED)")
    args = parser.parse_args()

    from service.server import MeshServeServer, ServerConfig
    from tests.service_support import make_test_engine, slow_generate

    engine, tokenizer = make_test_engine(num_slots=args.num_slots)
    if args.step_delay > 0:
        engine.generate = slow_generate(engine, args.step_delay)
    config = ServerConfig(
        port=0, memory_bandwidth_gbps=20.0, max_waiting=args.max_waiting, drain_timeout=args.drain_timeout
    )
    server = MeshServeServer(engine, tokenizer, config)
    server.start()
    if not server.wait_until_ready(60):
        sys.exit("warm-up did not finish")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"replica listening on 127.0.0.1:{server.port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.drain()
    server.stop()


if __name__ == "__main__":
    main()
