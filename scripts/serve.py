"""Starts the MeshServe gRPC server (health, reflection, Prometheus metrics) on one model.

python scripts/serve.py                                   # bundled SmolLM2-135M on 127.0.0.1:50051, metrics :9090
python scripts/serve.py --checkpoint /ckpt --num_slots 32 --max_seq_len 4096 --prefills_per_step 2

Health is NOT_SERVING until every shape is compiled, then SERVING. SIGTERM (or Ctrl-C) drains: new requests get
UNAVAILABLE, running ones may finish for --drain_timeout seconds, the rest are ended; the process then exits 0.
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

from absl import app, flags

from checkpoints.errors import CheckpointError
from engine.engine import EngineConfig, default_dtype
from engine.load import load_engine
from service.server import MeshServeServer, ServerConfig

# Start-up time (the meshserve_startup_seconds gauge) counts from here: load, conversion, compilation.
_STARTED_AT = time.monotonic()

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 to serve the network).")
_PORT = flags.DEFINE_integer("port", 50051, "gRPC port (0 picks a free one; the log says which).")
_METRICS_PORT = flags.DEFINE_integer("metrics_port", 9090, "Prometheus metrics HTTP port (-1 disables).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "bundled", "'bundled' (SmolLM2-135M-Instruct), an orbax checkpoint dir, a .gguf or an HF folder."
)
_NUM_SLOTS = flags.DEFINE_integer("num_slots", 8, "Requests decoded together (the decode batch).")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 2048, "Context per request: prompt + max_tokens.")
_MAX_PREFILL_LEN = flags.DEFINE_integer("max_prefill_len", 1024, "Longest prompt in tokens.")
_DECODE_STEPS = flags.DEFINE_integer(
    "decode_steps", 8, "Tokens per decode dispatch: more amortizes host overhead, fewer frees finished slots sooner."
)
_PREFILLS_PER_STEP = flags.DEFINE_integer(
    "prefills_per_step",
    4,
    "The TTFT / throughput knob: most new requests prefilled between two decode dispatches. Higher admits a burst "
    "sooner (lower TTFT, slots fill faster) but pauses the requests already decoding longer (higher inter-token "
    "latency); lower protects inter-token latency. Neither starves: each step admits at least one waiting request "
    "when a slot is free, and decodes whenever a slot is active.",
)
_MAX_WAITING = flags.DEFINE_integer(
    "max_waiting", 256, "Bound of the waiting queue; beyond it requests get RESOURCE_EXHAUSTED with a retry hint."
)
_DRAIN_TIMEOUT = flags.DEFINE_float(
    "drain_timeout", 30.0, "Seconds running requests may take to finish after SIGTERM before they are ended."
)
_STALL_TIMEOUT = flags.DEFINE_float(
    "stall_timeout", 60.0, "Seconds without engine-loop progress before health reports NOT_SERVING."
)
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "Weights/activations/cache dtype (default: float32 on CPU, else bf16)."
)
_BANDWIDTH = flags.DEFINE_float(
    "memory_bandwidth_gbps",
    None,
    "Memory bandwidth in GB/s for the bandwidth-utilization gauge (default: measured once at start-up).",
)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, flag in (("max_waiting", _MAX_WAITING), ("prefills_per_step", _PREFILLS_PER_STEP)):
        if flag.value < 1:
            _fail(f"--{name} must be >= 1, got {flag.value}")
    if _DRAIN_TIMEOUT.value < 0 or _STALL_TIMEOUT.value <= 0:
        _fail("--drain_timeout must be >= 0 and --stall_timeout > 0")
    if _BANDWIDTH.value is not None and _BANDWIDTH.value <= 0:
        _fail(f"--memory_bandwidth_gbps must be > 0, got {_BANDWIDTH.value}")
    try:
        engine_config = EngineConfig(
            num_slots=_NUM_SLOTS.value,
            max_seq_len=_MAX_SEQ_LEN.value,
            max_prefill_len=_MAX_PREFILL_LEN.value,
            decode_steps=_DECODE_STEPS.value,
            dtype=_DTYPE.value or default_dtype(),
        )
        engine, tokenizer = load_engine(None if _CHECKPOINT.value == "bundled" else _CHECKPOINT.value, engine_config)
    except (CheckpointError, ValueError) as e:  # CapacityError is a ValueError
        _fail(str(e))
    config = ServerConfig(
        host=_HOST.value,
        port=_PORT.value,
        metrics_port=None if _METRICS_PORT.value < 0 else _METRICS_PORT.value,
        max_waiting=_MAX_WAITING.value,
        prefills_per_step=_PREFILLS_PER_STEP.value,
        drain_timeout=_DRAIN_TIMEOUT.value,
        stall_timeout=_STALL_TIMEOUT.value,
        memory_bandwidth_gbps=_BANDWIDTH.value,
    )
    server = MeshServeServer(engine, tokenizer, config, started_at=_STARTED_AT)
    try:
        server.start()
    except (RuntimeError, OSError) as e:
        _fail(str(e))
    # The log line tests and scripts wait for; it names the ports actually bound (port 0 picks one).
    print(f"meshserve listening on {config.host}:{server.port} metrics_port={server.metrics_port}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    logging.info("shutdown requested: draining (up to %.1f s)", config.drain_timeout)
    ended = server.drain()
    server.stop()
    logging.info("drained; %d request(s) ended by the drain timeout; exiting", ended)


if __name__ == "__main__":
    app.run(main)
