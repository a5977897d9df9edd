"""W4 through the gateway over a fleet of real replicas: the routing policies side by side.

Replica processes on loopback (random-weight model, byte-level tokenizer, a small KV pool each: no replica holds
every conversation, so where a turn goes decides what it finds cached) and, per run, a gateway over a
`fleet.router.Router` with one policy; W4 (`bench.multiturn.run_chat`) runs over the gateway's OpenAI API. `compare`
runs the policies in a given order, each run over fresh replicas (neither inherits the other's prefix cache) or all
over one set with the system prompts tagged per run (`tagged`: quicker, what the test does).

Reported per policy, pooled over its runs: hit rate (usage cached_tokens / prompt tokens), prompt tokens computed
vs the ideal, TTFT p50 / p99 overall and by turn, output tokens/s, requests routed to each replica, failures.

    python -m bench.fleet_w4 --users 36 --turns 8 --kv_pages 512 --order round_robin,cache_aware,cache_aware,round_robin
    python -m bench.fleet_w4 replica --kv_pages 384        # one replica (a comparison starts one per process)

A replica prints `replica listening on 127.0.0.1:<port>` once warm and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import multiturn as mt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 180.0
"""Seconds a replica may take to start and warm up (compiling, when the persistent cache is cold)."""
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), "meshserve-fleet-w4-jax-cache")
"""Persistent compilation caches, one per replica config: warm, three replicas start in ~10 s instead of ~60."""
POLICIES = ("round_robin", "cache_aware")

SYSTEM_PROMPTS = (
    "You are Sous, the cooking assistant of the FreshCrate recipe app. Give metric and US units and name allergens.",
    "You are the support assistant of Northwind Fiber, a home internet provider. Walk through one check at a time.",
    "You are Pip, a patient Python tutor on CodePath. Explain in plain words first, then show short examples.",
)
"""Three applications' system prompts of 104-110 bytes (byte-level tokens: W4's ~100 tokens)."""


def chat_spec(**overrides: Any) -> mt.ChatSpec:
    """W4 with this module's system prompts (and `overrides`): messages of 10-40 tokens, as W4 says."""
    return mt.ChatSpec(**{"message_tokens": (10, 40), "system_prompts": SYSTEM_PROMPTS, **overrides})


@dataclasses.dataclass(frozen=True)
class ReplicaConfig:
    """One replica's engine: a random-weight model with a small KV pool."""

    model: str = "tiny"
    """Random model (`bench.runner.RANDOM_MODELS`)."""
    num_slots: int = 8
    """Requests decoded together."""
    max_seq_len: int = 1024
    """Context per slot (prompt + reply): room for 7 turns of W4 in byte-level tokens."""
    page_size: int = 16
    """KV page (and prefix-cache block) length."""
    kv_pages: int = 384
    """KV pool pages (one is the sink): what running requests hold and the prefix cache keeps. 384 x 16 tokens hold
    a third of 24 seven-turn conversations (~600 tokens each at the end), not all of them."""
    max_prefill_len: int = 256
    """Largest prefill bucket."""
    decode_steps: int = 4
    """Decode steps per dispatch."""

    def args(self) -> list[str]:
        return [f"--{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]


# ----- replicas -----------------------------------------------------------------------------------------------------


def replica_main(argv: Sequence[str]) -> None:
    """One replica: builds the engine `ReplicaConfig` names, serves it on a free loopback port, stops on SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_w4 replica")
    for f in dataclasses.fields(ReplicaConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    config = ReplicaConfig(**vars(parser.parse_args(argv)))

    import jax.numpy as jnp

    from bench.runner import RANDOM_MODELS
    from engine.engine import Engine, EngineConfig
    from engine.model import init_params
    from engine.tokenizer import make_tiny_tokenizer
    from service.server import MeshServeServer, ServerConfig

    cfg = RANDOM_MODELS[config.model]()
    # random weights were never trained on any context: let the positions reach max_seq_len (the tiny model says 512)
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, config.max_seq_len))
    engine_config = EngineConfig(
        num_slots=config.num_slots,
        max_seq_len=config.max_seq_len,
        max_prefill_len=config.max_prefill_len,
        page_size=config.page_size,
        kv_pages=config.kv_pages,
        decode_steps=config.decode_steps,
        dtype="float32",
    )
    engine = Engine(cfg, init_params(cfg, jnp.float32), engine_config)  # seed 0: every replica the same weights
    engine.warmup()
    server = MeshServeServer(
        engine, make_tiny_tokenizer(max(cfg.vocab_size, 256)), ServerConfig(port=0, memory_bandwidth_gbps=20.0)
    )
    server.start()
    if not server.wait_until_ready(120):
        sys.exit("warm-up did not finish")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"replica listening on 127.0.0.1:{server.port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()


@dataclasses.dataclass
class Replica:
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


def start_replicas(n: int, config: ReplicaConfig, log_dir: str) -> list[Replica]:
    """Starts `n` replica processes and waits (bounded) until each is warm; kills them all on failure. The first
    fills the persistent compilation cache alone when it is empty, so the others load their shapes from it."""
    cache = os.path.join(COMPILE_CACHE, "-".join(config.args()).replace("--", "").replace("=", ""))
    if n > 1 and not (os.path.isdir(cache) and os.listdir(cache)):
        first = start_replicas(1, config, log_dir)
        try:
            return first + start_replicas(n - 1, config, log_dir)
        except BaseException:
            first[0].stop()
            raise
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": cache,  # one per config: the pool's size is in every shape
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    env.pop("XLA_FLAGS", None)  # one CPU device each
    started = []
    for _ in range(n):
        fd, path = tempfile.mkstemp(prefix="replica-", suffix=".log", dir=log_dir)
        with os.fdopen(fd, "w") as log:  # the child keeps its own copy of the descriptor
            cmd = [sys.executable, "-m", "bench.fleet_w4", "replica", *config.args()]
            process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        started.append((process, path))
    replicas: list[Replica] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        for process, path in started:
            replicas.append(Replica(process, _wait_port(process, deadline, path), path))
    except BaseException:
        for process, _ in started:
            process.kill()
            process.wait(10)
        raise
    return replicas


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


# ----- one policy ---------------------------------------------------------------------------------------------------


def run_policy(policy: str, addresses: Sequence[str], spec: mt.ChatSpec, *, timeout: float = 300.0) -> dict[str, Any]:
    """W4 over the OpenAI API of a gateway whose router spreads over `addresses` with `policy`: the W4 report
    (`bench.multiturn.chat_report`) plus the router's snapshot after the run under "fleet"."""
    from bench.gateway_load import GatewayThread
    from engine.tokenizer import make_tiny_tokenizer
    from fleet.config import ReplicaSpec
    from fleet.router import Router, RouterConfig
    from gateway.open_gate import OpenGate

    specs = [ReplicaSpec(name=f"r{i}", address=a) for i, a in enumerate(addresses)]
    made: list[tuple[Router, asyncio.AbstractEventLoop]] = []

    def make_router() -> Router:
        router = Router(specs, RouterConfig(policy=policy, poll_period=0.2))
        made.append((router, asyncio.get_event_loop()))  # called in the gateway's thread, its loop set
        return router

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, made[0][1]).result(30)

    async def snapshot() -> dict[str, Any]:
        return made[0][0].snapshot()

    async def all_up() -> bool:
        router = made[0][0]
        await router.start()  # probes each replica once: a SERVING one is in the fleet at once
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(r["state"] == "up" for r in router.snapshot()["replicas"]):
                return True
            await asyncio.sleep(0.05)
        return False

    with GatewayThread(make_router, OpenGate()) as gateway:
        if not on_loop(all_up()):
            raise RuntimeError(f"the replicas did not all come up: {on_loop(snapshot())['replicas']}")
        run = mt.run_chat(gateway.base_url, make_tiny_tokenizer(), spec, timeout=timeout, api="openai")
        fleet = on_loop(snapshot())
    return {"policy": policy, **mt.chat_report(run), "fleet": fleet}


def tagged(spec: mt.ChatSpec, run: int) -> mt.ChatSpec:
    """`spec` with every system prompt starting "[run <run>] ": the same users, messages and lengths, but no prompt
    of one run shares a cached page with another's (the tag lies in the first page), so runs over the same replicas
    start from equal footing - a pool holding only other runs' evictable pages is a pool at steady state."""
    return dataclasses.replace(spec, system_prompts=tuple(f"[run {run}] {s}" for s in spec.system_prompts))


def compare(
    spec: mt.ChatSpec,
    config: ReplicaConfig,
    *,
    replicas: int = 3,
    order: Sequence[str] = POLICIES,
    fresh: bool = True,
    log_dir: str | None = None,
) -> list[dict[str, Any]]:
    """`run_policy` for each policy of `order` in turn (a policy may come more than once); the reports in run order.
    `fresh`: each run over `replicas` fresh replica processes, with `spec` as it is; else every run over the same
    replicas, run i with `tagged(spec, i)` (quicker: the replicas start once)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="fleet-w4-") as tmp:
        fleet: list[Replica] = []
        try:
            for i, policy in enumerate(order):
                if fresh or not fleet:
                    for r in fleet:
                        r.stop()
                    fleet = start_replicas(replicas, config, log_dir or tmp)
                out.append(run_policy(policy, [r.address for r in fleet], spec if fresh else tagged(spec, i)))
        finally:
            for r in fleet:
                r.stop()
    return out


# ----- figures ------------------------------------------------------------------------------------------------------


def figures(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The comparison's figures of one policy, pooled over its runs' reports (token counts summed, percentiles over
    every request)."""
    ok = [q for r in reports for q in r["requests"] if q["status"] == "OK" and q["error"] is None]
    prompt = sum(q["prompt_tokens"] or 0 for q in ok)
    cached = sum(q["cached_tokens"] or 0 for q in ok)
    ideal = sum(q["ideal_tokens"] or 0 for q in ok)
    turns = max(r["spec"]["turns"] for r in reports)
    by_turn = []
    for t in range(1, turns + 1):
        rows = [q for q in ok if q["turn"] == t]
        p, c = sum(q["prompt_tokens"] or 0 for q in rows), sum(q["cached_tokens"] or 0 for q in rows)
        by_turn.append({"turn": t, "hit_rate": _ratio(c, p), "ttft_ms": _ms(q["ttft"] for q in rows)})
    routed: dict[str, int] = {}
    for r in reports:
        for replica in r["fleet"]["replicas"]:
            routed[replica["name"]] = routed.get(replica["name"], 0) + replica["routed"]
    output = sum(q["output_tokens"] for q in ok)
    return {
        "policy": reports[0]["policy"],
        "runs": len(reports),
        "requests": sum(len(r["requests"]) for r in reports),
        "completed": len(ok),
        "failures": [f for r in reports for f in r["failures"]],
        "skipped": sum(len(r["skipped"]) for r in reports),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "computed_tokens": prompt - cached,
        "ideal_tokens": ideal,
        "computed_over_ideal": _ratio(prompt - cached, ideal),
        "hit_rate": _ratio(cached, prompt),
        "ideal_hit_rate": _ratio(prompt - ideal, prompt),
        "ttft_ms": _ms(q["ttft"] for q in ok),
        "by_turn": by_turn,
        "output_tokens_per_s": _ratio(output, sum(r["overall"]["duration_s"] for r in reports)),
        "routed": routed,
    }


def by_policy(reports: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`figures` of each policy among `reports`, in order of first appearance."""
    policies = dict.fromkeys(r["policy"] for r in reports)
    return {p: figures([r for r in reports if r["policy"] == p]) for p in policies}


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def _ms(seconds: Any) -> dict[str, float]:
    values = [s * 1e3 for s in seconds if s is not None]
    if not values:
        return {"p50": math.nan, "p99": math.nan}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def table(figs: dict[str, dict[str, Any]]) -> list[str]:
    """The comparison as markdown lines: one row per policy, then TTFT and hit rate by turn."""
    lines = [
        "| policy | runs | ok / sent | hit rate | computed / ideal prompt tokens | TTFT p50 / p99 ms | output tok/s "
        "| requests per replica |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figs.values():
        lines.append(
            f"| {f['policy']} | {f['runs']} | {f['completed']} / {f['requests']} | {f['hit_rate']:.1%} | "
            f"{f['computed_tokens']} / {f['ideal_tokens']} ({f['computed_over_ideal']:.2f}x) | "
            f"{f['ttft_ms']['p50']:.0f} / {f['ttft_ms']['p99']:.0f} | {f['output_tokens_per_s']:.0f} | "
            f"{' / '.join(str(n) for n in f['routed'].values())} |"
        )
    turns = max((len(f["by_turn"]) for f in figs.values()), default=0)
    lines += ["", "| TTFT p50 / p99 ms, hit rate | " + " | ".join(f"turn {t}" for t in range(1, turns + 1)) + " |"]
    lines.append("|---|" + "---|" * turns)
    for f in figs.values():
        cells = [f"{b['ttft_ms']['p50']:.0f} / {b['ttft_ms']['p99']:.0f}, {b['hit_rate']:.0%}" for b in f["by_turn"]]
        lines.append(f"| {f['policy']} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str]) -> None:
    if argv and argv[0] == "replica":
        replica_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_w4", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=24)
    parser.add_argument("--turns", type=int, default=7)
    parser.add_argument("--max_tokens", type=int, default=24, help="most new tokens of a reply")
    parser.add_argument("--stagger_s", type=float, default=0.05)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--order", default=",".join(POLICIES), help="policies in run order (may repeat)")
    parser.add_argument("--shared", action="store_true", help="one set of replicas for every run (tagged prompts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json_out", default="")
    for f in dataclasses.fields(ReplicaConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    a = parser.parse_args(argv)
    config = ReplicaConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(ReplicaConfig)})
    spec = chat_spec(users=a.users, turns=a.turns, stagger_s=a.stagger_s, max_tokens=a.max_tokens, seed=a.seed)
    reports = compare(spec, config, replicas=a.replicas, order=a.order.split(","), fresh=not a.shared)
    figs = by_policy(reports)
    print(f"W4 over {a.replicas} replicas ({config}), {spec.users} users x {spec.turns} turns")
    print("\n".join(table(figs)))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"replica": dataclasses.asdict(config), "spec": dataclasses.asdict(spec), "policies": figs}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
