"""Runs the gateway in front of one meshserve replica, or a fleet of them: the OpenAI HTTP API and the MeshServe gRPC
API, one process.

python scripts/gateway.py                                  # replica 127.0.0.1:50051; HTTP :8000, gRPC :50052 (loopback)
python scripts/gateway.py --served_model_name smollm2 --max_body_bytes 1048576
python scripts/gateway.py --replicas fleet.toml --routing_policy cache_aware

With --replicas the gateway serves over the fleet router (fleet/router.py): every replica of the file, watched
(health and load every 0.5 s), routed by --routing_policy, failed over and resumed, a full fleet queued then refused
with 429; the file is re-read when it changes. The HTTP port then also serves the fleet's dashboard at /fleet (its
JSON at /fleet.json) and the fleet's Prometheus series with the gateway's at /metrics; --fleet_metrics_port serves
the fleet's series alone on a port of their own as well. Behind the store's gate /fleet and /fleet.json need a key
with the operator role (the `operator` field of its or its user's policy): a browser signs in with a form at /fleet
(the key is kept in an HttpOnly cookie), a script sends `Authorization: Bearer <key>` (gateway/openai_api.py).

The gateway counts prompt tokens itself with --tokenizer once it has checked, on probe texts, that it tokenizes as
the replica does; otherwise (another model, no tokenizer) it asks the replica's Tokenize for every request.

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

import gateway_flags
from fleet.router import Router
from gateway import server as gateway_server
from gateway.backend import GrpcReplica
from gateway.server import Gateway, GatewayConfig, is_loopback

_REPLICA = flags.DEFINE_string("replica", "127.0.0.1:50051", "Address of the meshserve replica (host:port).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address both fronts bind (a non-loopback one needs --keys_required).")
flags.DEFINE_alias("grpc_port", "gateway_grpc_port")
_DRAIN_TIMEOUT = flags.DEFINE_float(
    "drain_timeout", 30.0, "Seconds open streams may take to finish after SIGTERM before they are ended."
)


def _fail(message: str) -> None:
    logging.error("%s", message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


async def _serve(replica, gate, config: GatewayConfig) -> None:
    gateway = Gateway(replica, gate, config)  # built in the loop that serves it (grpc.aio binds to it)
    try:
        await gateway.start()
    except (RuntimeError, OSError) as e:
        _fail(f"cannot start the gateway: {e}")
    if isinstance(replica, Router):
        await replica.start()  # watches every replica from now on (one probe round first)
        try:
            port = gateway_flags.serve_fleet_metrics(replica, config.host)
        except OSError as e:
            _fail(f"cannot serve the fleet metrics: {e}")
        if port is not None:
            print(f"fleet metrics on port {port}", flush=True)
        print(f"fleet dashboard at http://{config.host}:{gateway.http_port}/fleet", flush=True)
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
    if not flags.FLAGS.keys_required and not is_loopback(_HOST.value):
        _fail(f"--host {_HOST.value} is not a loopback address: pass --keys_required")
    try:
        config = gateway_flags.config(_HOST.value, _DRAIN_TIMEOUT.value)
        vocab = gateway_flags.vocab()
        gate, store = gateway_flags.gate()
    except Exception as e:
        _fail(str(e))
    try:
        replica = gateway_flags.router(vocab) or GrpcReplica(_REPLICA.value, vocab=vocab)
    except ValueError as e:  # a bad replicas file: one line naming the field
        _fail(str(e))
    try:
        gateway_server.run(_serve(replica, gate, config))
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    app.run(main)
