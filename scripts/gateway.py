"""Runs the gateway in front of one meshserve replica: the OpenAI HTTP API and the MeshServe gRPC API, one process.

python scripts/gateway.py                                  # replica 127.0.0.1:50051; HTTP :8000, gRPC :50052 (loopback)
python scripts/gateway.py --served_model_name smollm2 --max_body_bytes 1048576

Without --db and --keys_required the gateway runs the open gate: no keys, no limits, nothing recorded. That is only
allowed on loopback: binding another address needs --keys_required (the store's gate, on --db or the store's default
URL).

SIGTERM (or Ctrl-C) stops both fronts from accepting, lets open streams finish for --drain_timeout seconds, settles
every admitted request with the gate, runs the gate's shutdown and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

# Run as a plain script, Python puts scripts/ on the path, not the repository root that holds the packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from gateway.backend import GrpcReplica, TokenVocab
from gateway.open_gate import OpenGate
from gateway.server import Gateway, GatewayConfig, is_loopback

_REPLICA = flags.DEFINE_string("replica", "127.0.0.1:50051", "Address of the meshserve replica (host:port).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address both fronts bind (a non-loopback one needs --keys_required).")
_HTTP_PORT = flags.DEFINE_integer("http_port", 8000, "OpenAI HTTP API port (0 picks a free one; the log says which).")
_GRPC_PORT = flags.DEFINE_integer("grpc_port", 50052, "gRPC front port (0 picks a free one; the log says which).")
_KEYS_REQUIRED = flags.DEFINE_bool(
    "keys_required", False, "Require an API key on every request (must be true when --host is not loopback)."
)
_DB = flags.DEFINE_string(
    "db", "", "The store's URL (keys, limits, ledger); without it and --keys_required the open gate runs."
)
_MAX_BODY_BYTES = flags.DEFINE_integer(
    "max_body_bytes", 4 * 1024 * 1024, "Largest request body (HTTP 413 beyond; gRPC INVALID_ARGUMENT beyond)."
)
_SERVED_MODEL_NAME = flags.DEFINE_string(
    "served_model_name", "", "The model name clients send and see (default: the replica's model name)."
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer",
    "bundled",
    "Where token names for logprobs come from: 'bundled', a meshserve checkpoint dir, a .gguf file or an HF "
    "folder; '' refuses logprobs.",
)
_DRAIN_TIMEOUT = flags.DEFINE_float(
    "drain_timeout", 30.0, "Seconds open streams may take to finish after SIGTERM before they are ended."
)


def _fail(message: str) -> None:
    logging.error("%s", message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _vocab(spec: str) -> TokenVocab | None:
    if not spec:
        return None
    from engine.tokenizer import META_FILE, Tokenizer

    if spec == "bundled":
        from checkpoints.bundled import bundled_gguf_path

        return TokenVocab(Tokenizer.from_gguf_file(bundled_gguf_path()))
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isfile(path):
        return TokenVocab(Tokenizer.from_gguf_file(path))
    if os.path.isfile(os.path.join(path, META_FILE)):
        return TokenVocab(Tokenizer.load(path))
    if os.path.isdir(path):
        return TokenVocab(Tokenizer.from_hf_folder(path))
    raise ValueError(f"--tokenizer {spec}: no such file or directory")


def _gate():
    """The gate this process runs: the store's (keys, limits, ledger) with --db or --keys_required, else the open one.
    Returns (gate, store or None)."""
    if not _DB.value and not _KEYS_REQUIRED.value:
        logging.info("running the open gate: no keys, no limits, nothing recorded (loopback only)")
        return OpenGate(), None
    try:
        from gateway.store import Store, default_url
        from gateway.store_gate import StoreGate
    except ImportError as e:
        _fail(f"--db / --keys_required need the store (gateway/store_gate.py), which cannot be imported: {e}")
    store = Store(_DB.value or default_url())
    logging.info("running the store's gate on %r (keys required: %s)", store, _KEYS_REQUIRED.value)
    return StoreGate(store, keys_required=_KEYS_REQUIRED.value), store


async def _serve(replica: GrpcReplica, gate, config: GatewayConfig) -> None:
    gateway = Gateway(replica, gate, config)  # built in the loop that serves it (grpc.aio binds to it)
    try:
        await gateway.start()
    except (RuntimeError, OSError) as e:
        _fail(f"cannot start the gateway: {e}")
    try:
        info = await replica.model_info()
        logging.info("replica %s serves %s (context %d)", replica.name, info.model_name, info.context_length)
        if replica.vocab is not None and replica.vocab.vocab_size != info.vocab_size:
            logging.warning(
                "--tokenizer has %d tokens but the model %d: logprobs are refused",
                replica.vocab.vocab_size,
                info.vocab_size,
            )
            replica.vocab = None
    except Exception as e:  # the replica may come up later; requests get 503 meanwhile
        logging.warning("replica %s not reachable yet: %s", replica.name, e)
    # The line tests and scripts wait for; it names the ports actually bound (port 0 picks one).
    print(f"gateway listening on {gateway.config.host} http_port={gateway.http_port} grpc_port={gateway.grpc_port}")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.info("shutdown requested: draining (up to %.1f s)", gateway.config.drain_timeout)
    await gateway.stop()
    logging.info("gateway stopped")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _KEYS_REQUIRED.value and not is_loopback(_HOST.value):
        _fail(f"--host {_HOST.value} is not a loopback address: pass --keys_required")
    config = GatewayConfig(
        host=_HOST.value,
        http_port=_HTTP_PORT.value,
        grpc_port=_GRPC_PORT.value,
        served_model_name=_SERVED_MODEL_NAME.value or None,
        max_body_bytes=_MAX_BODY_BYTES.value,
        drain_timeout=_DRAIN_TIMEOUT.value,
        keys_required=_KEYS_REQUIRED.value,
    )
    try:
        config.validate()
        vocab = _vocab(_TOKENIZER.value)
    except Exception as e:
        _fail(str(e))
    gate, store = _gate()
    replica = GrpcReplica(_REPLICA.value, vocab=vocab)
    try:
        asyncio.run(_serve(replica, gate, config))
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    app.run(main)
