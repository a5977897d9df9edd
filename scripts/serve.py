"""Starts the MeshServe gRPC server (health, reflection, Prometheus metrics) on one model, and the gateway in front
of it in the same process: the OpenAI HTTP API and the gRPC API with keys, limits, policy and the ledger.

python scripts/serve.py               # bundled SmolLM2-135M: OpenAI API on 127.0.0.1:8000, gateway gRPC :50052,
                                      # the engine's own gRPC :50051 (replicas, the router), metrics :9090
python scripts/serve.py --keys_required --db sqlite:////var/lib/meshserve/gateway.db   # keys from the store
python scripts/serve.py --http_port=-1                    # the engine alone (a fleet replica)
python scripts/serve.py --checkpoint /ckpt --num_slots 32 --max_seq_len 4096 --prefill_token_budget 512
python scripts/serve.py --mesh data:2,tensor:4 --coordinator_address 10.0.0.1:1234 --num_processes 2 --process_id 0

Multi-host: every process runs this script; process 0 owns the gRPC front and the scheduler and broadcasts each
step's plan, the others replay the plans on their shards (on TPU pods, --num_processes 0 reads the environment).

Health is NOT_SERVING until every shape is compiled, then SERVING. SIGTERM (or Ctrl-C) drains: the gateway stops
accepting and its streams finish, then the engine's: new requests get UNAVAILABLE, running ones may finish for
--drain_timeout seconds, the rest are ended; the ledger is written; the process then exits 0. On loopback keys are
optional (the open gate: no keys, no limits, nothing recorded); --keys_required (needed to bind another address)
checks them against the store (--db, default SQLite in the cache directory; keys: scripts/admin.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

# Run as a plain script, Python puts scripts/ on the path, not the repository root that holds the packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
from absl import app, flags

import engine_flags
import gateway_flags
from checkpoints.errors import CheckpointError
from engine import multihost
from service.server import MeshServeServer, ServerConfig

# Start-up time (the meshserve_startup_seconds gauge) counts from here: load, conversion, compilation.
_STARTED_AT = time.monotonic()

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 to serve the network).")
_PORT = flags.DEFINE_integer("port", 50051, "gRPC port (0 picks a free one; the log says which).")
_METRICS_PORT = flags.DEFINE_integer("metrics_port", 9090, "Prometheus metrics HTTP port (-1 disables).")
_MAX_WAITING = flags.DEFINE_integer(
    "max_waiting", 256, "Bound of the waiting queue; beyond it requests get RESOURCE_EXHAUSTED with a retry hint."
)
_FREE_SLOT_DECODE_STEPS = flags.DEFINE_integer(
    "free_slot_decode_steps",
    1,
    "Decode steps per dispatch while a slot is free (an arriving request waits at most this many steps for its "
    "prefill); 0: always --decode_steps.",
)
_PREFILL_TOKEN_BUDGET = flags.DEFINE_integer(
    "prefill_token_budget",
    256,
    "Most prompt tokens read between two decode dispatches while requests decode (long prompts are read in chunks "
    "of this many: the running streams' inter-token latency stays bounded); 0: every admitted prompt at once.",
)
_DRAIN_TIMEOUT = flags.DEFINE_float(
    "drain_timeout", 30.0, "Seconds running requests may take to finish after SIGTERM before they are ended."
)
_STALL_TIMEOUT = flags.DEFINE_float(
    "stall_timeout", 60.0, "Seconds without engine-loop progress before health reports NOT_SERVING."
)
_BANDWIDTH = flags.DEFINE_float(
    "memory_bandwidth_gbps",
    None,
    "Memory bandwidth in GB/s for the bandwidth-utilization gauge (default: measured once at start-up).",
)


_fail = engine_flags.fail


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if _MAX_WAITING.value < 1 or engine_flags.prefills_per_step() < 1:
        _fail("--max_waiting and --prefills_per_step must be >= 1")
    if _DRAIN_TIMEOUT.value < 0 or _STALL_TIMEOUT.value <= 0:
        _fail("--drain_timeout must be >= 0 and --stall_timeout > 0")
    if _BANDWIDTH.value is not None and _BANDWIDTH.value <= 0:
        _fail(f"--memory_bandwidth_gbps must be > 0, got {_BANDWIDTH.value}")
    try:
        engine, tokenizer = engine_flags.load()
    except (CheckpointError, ValueError, OSError) as e:  # CapacityError is a ValueError
        _fail(str(e))
    if not 0 <= _FREE_SLOT_DECODE_STEPS.value <= engine.config.decode_steps:
        _fail(f"--free_slot_decode_steps must be in [0, {engine.config.decode_steps}] (--decode_steps)")
    logging.info("%s", engine.describe_sharding().describe())
    if not multihost.is_leader():
        # followers hold their shards and replay the leader's plans; the gRPC front lives on process 0 only
        engine.warmup()
        steps = multihost.run_follower(engine)
        logging.info("follower: leader stopped after %d plans; exiting", steps)
        return
    broadcaster = multihost.PlanBroadcaster() if jax.process_count() > 1 else None
    config = ServerConfig(
        host=_HOST.value,
        port=_PORT.value,
        metrics_port=None if _METRICS_PORT.value < 0 else _METRICS_PORT.value,
        max_waiting=_MAX_WAITING.value,
        prefills_per_step=engine_flags.prefills_per_step(),
        free_slot_decode_steps=_FREE_SLOT_DECODE_STEPS.value or None,
        prefill_token_budget=_PREFILL_TOKEN_BUDGET.value or None,
        drain_timeout=_DRAIN_TIMEOUT.value,
        stall_timeout=_STALL_TIMEOUT.value,
        memory_bandwidth_gbps=_BANDWIDTH.value,
    )
    server = MeshServeServer(
        engine,
        tokenizer,
        config,
        started_at=_STARTED_AT,
        plan_hook=broadcaster,
        on_loop_exit=None if broadcaster is None else broadcaster.stop,
    )
    try:
        server.start()
    except (RuntimeError, OSError) as e:
        _fail(str(e))
    # The log line tests and scripts wait for; it names the ports actually bound (port 0 picks one).
    print(f"meshserve listening on {config.host}:{server.port} metrics_port={server.metrics_port}", flush=True)
    front = None
    if gateway_flags.http_enabled():
        try:
            gw_config = gateway_flags.config(_HOST.value, _DRAIN_TIMEOUT.value)
            front = gateway_flags.GatewayThread(f"127.0.0.1:{server.port}", gw_config, gateway_flags.vocab())
            http_port, grpc_port = front.start()
        except Exception as e:
            server.stop()
            _fail(f"cannot start the gateway: {e}")
        print(f"gateway listening on {_HOST.value} http_port={http_port} grpc_port={grpc_port}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    logging.info("shutdown requested: draining (up to %.1f s)", config.drain_timeout)
    # both drain at once: the gateway stops accepting and waits for its streams, which the draining engine (health
    # NOT_SERVING, new requests UNAVAILABLE) finishes like its own
    gateway_stop = threading.Thread(target=front.stop, name="gateway-stop") if front is not None else None
    if gateway_stop is not None:
        gateway_stop.start()
    ended = server.drain()
    if gateway_stop is not None:
        gateway_stop.join()
    server.stop()
    logging.info("drained; %d request(s) ended by the drain timeout; exiting", ended)


if __name__ == "__main__":
    # A server shares its cores with its own request threads and the gateway: the kernels' helper threads do not spin
    # between calls here unless asked (on the 2-core Zen 5 VM spinning cost TTFT through the gateway 3-4 ms, 49.6 and
    # 48.5 -> 54.2 and 51.1 ms p50, for +3.4% batch-1 decode).
    flags.FLAGS.set_default("kernel_spin_us", 0)
    app.run(main)
