"""The gateway's flags and their mapping onto `gateway` objects, shared by `scripts/gateway.py` (a gateway process in
front of a replica) and `scripts/serve.py` (the engine with its gateway in one process, the README's main command).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from absl import flags

from gateway import server as gateway_server
from gateway.backend import GrpcReplica, TokenVocab
from gateway.open_gate import OpenGate
from gateway.openai_api import DEFAULT_MAX_BODY_BYTES
from gateway.server import Gateway, GatewayConfig

_HTTP_PORT = flags.DEFINE_integer("http_port", 8000, "OpenAI HTTP API port (0 picks a free one; the log says which).")
_GRPC_PORT = flags.DEFINE_integer(
    "gateway_grpc_port", 50052, "The gateway's gRPC port: meshserve.v1 with keys and limits (0 picks a free one)."
)
_KEYS_REQUIRED = flags.DEFINE_bool(
    "keys_required",
    False,
    "Require an API key (Authorization: Bearer / authorization metadata) from the store; needed off loopback.",
)
_DB = flags.DEFINE_string(
    "db",
    "",
    "Store URL for keys, limits, policy, the ledger and feedback (sqlite:///... or postgresql+psycopg://...); "
    "empty with --nokeys_required: the open gate (no keys, no limits, nothing recorded).",
)
_PRICES = flags.DEFINE_string(
    "prices",
    "",
    'JSON prices for the ledger: {"replicas": {name or "*": {"per_chip_hour", "chips"}}, "models": {name or "*": '
    '{"prompt_per_million", "completion_per_million", "cached_per_million"}}}.',
)
_MAX_BODY_BYTES = flags.DEFINE_integer(
    "max_body_bytes", DEFAULT_MAX_BODY_BYTES, "Largest request body (HTTP 413 / gRPC INVALID_ARGUMENT beyond)."
)
_SERVED_MODEL_NAME = flags.DEFINE_string(
    "served_model_name", "", "Model name clients send and see (default: the replica's own)."
)
_REPLICAS = flags.DEFINE_string(
    "replicas",
    "",
    "Replicas file (TOML or JSON, see fleet/config.py): the gateway routes over every replica it names (health and "
    "load watched, failover, the gateway queue) and re-reads it on change; empty: the one --replica.",
)
_ROUTING_POLICY = flags.DEFINE_enum(
    "routing_policy",
    "cache_aware",
    ["cache_aware", "least_load", "round_robin"],
    "With --replicas: where requests go (see fleet/policy.py); cache_aware: where the prompt's pages are cached, "
    "bounded by load.",
)
_FLEET_REGION = flags.DEFINE_string(
    "fleet_region",
    "",
    "With --replicas: this gateway's region (its clients prefer replicas there unless a request names its own in "
    "x-meshserve-region, or its key's policy pins one).",
)
_FLEET_QUEUE = flags.DEFINE_integer(
    "fleet_max_queued", 256, "With --replicas: most requests waiting in the gateway for a replica with room."
)
_FLEET_WAIT = flags.DEFINE_float(
    "fleet_max_wait", 10.0, "With --replicas: seconds a request may wait for a replica with room before a 429."
)
_FLEET_STALL = flags.DEFINE_float(
    "fleet_stall_timeout",
    30.0,
    "With --replicas: seconds a started stream may go without a message before it is cut and resumed on another "
    "replica (0: no limit).",
)
_FLEET_MIN_CACHED_SHARE = flags.DEFINE_float(
    "fleet_min_cached_share",
    0.5,
    "With --routing_policy=cache_aware: the share of a prompt's blocks a replica must hold cached before that "
    "outweighs a less loaded replica.",
)
_FLEET_METRICS_PORT = flags.DEFINE_integer(
    "fleet_metrics_port",
    -1,
    "With --replicas: a Prometheus port of its own for the fleet's metrics (0 picks one; -1: none; the gateway's "
    "/metrics serves them anyway).",
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer",
    "bundled",
    "Tokenizer naming tokens in logprobs and counting prompt tokens in the gateway (when it matches the replica's): "
    "'bundled', a GGUF file or a checkpoint folder; empty: logprobs refused, prompts counted by the replica.",
)


def config(host: str, drain_timeout: float) -> GatewayConfig:
    """The gateway's config from the flags (raises ValueError for one that must not run)."""
    cfg = GatewayConfig(
        host=host,
        http_port=_HTTP_PORT.value,
        grpc_port=_GRPC_PORT.value,
        served_model_name=_SERVED_MODEL_NAME.value or None,
        max_body_bytes=_MAX_BODY_BYTES.value,
        drain_timeout=drain_timeout,
        keys_required=_KEYS_REQUIRED.value,
    )
    cfg.validate()
    return cfg


def http_enabled() -> bool:
    return _HTTP_PORT.value >= 0


def vocab(spec: str | None = None) -> TokenVocab | None:
    """The tokenizer naming tokens in logprobs (see --tokenizer); None when disabled."""
    spec = _TOKENIZER.value if spec is None else spec
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


def gate():
    """The gate this process runs, and its store (None for the open gate): the store's gate (keys, limits, policy,
    ledger, feedback) with --db or --keys_required, else the open one."""
    if not _DB.value and not _KEYS_REQUIRED.value:
        logging.info("running the open gate: no keys, no limits, nothing recorded (loopback only)")
        return OpenGate(), None
    from gateway.ledger import Prices
    from gateway.store import Store, default_url
    from gateway.store_gate import StoreGate

    prices = Prices.from_json(_PRICES.value) if _PRICES.value else None
    store = Store(_DB.value or default_url())
    logging.info("running the store's gate on %r (keys required: %s)", store, _KEYS_REQUIRED.value)
    return StoreGate(store, keys_required=_KEYS_REQUIRED.value, prices=prices), store


def router(tokens: TokenVocab | None):
    """The fleet router the flags ask for (--replicas), or None for a single replica. Raises ConfigError (one line
    naming the file and the field) for a bad replicas file."""
    if not _REPLICAS.value:
        return None
    from fleet.admission import AdmissionConfig
    from fleet.policy import RoutingConfig
    from fleet.router import Router, RouterConfig

    config = RouterConfig(
        policy=_ROUTING_POLICY.value,
        region=_FLEET_REGION.value,
        admission=AdmissionConfig(max_queued=_FLEET_QUEUE.value, max_wait=_FLEET_WAIT.value),
        routing=RoutingConfig(min_cached_share=_FLEET_MIN_CACHED_SHARE.value),
        stall_timeout=_FLEET_STALL.value or None,
    )
    return Router(os.path.abspath(os.path.expanduser(_REPLICAS.value)), config, vocab=tokens)


def serve_fleet_metrics(fleet, host: str) -> int | None:
    """Serves the router's Prometheus registry on --fleet_metrics_port; returns the port (None: disabled)."""
    if _FLEET_METRICS_PORT.value < 0:
        return None
    from prometheus_client import start_http_server

    server, _ = start_http_server(_FLEET_METRICS_PORT.value, addr=host, registry=fleet.metrics.registry)
    return server.server_port


class GatewayThread:
    """A gateway serving on its own event loop in a background thread (beside an engine server in one process)."""

    def __init__(self, replica_address: str, cfg: GatewayConfig, tokens: TokenVocab | None) -> None:
        self._address, self._config, self._vocab = replica_address, cfg, tokens
        self._gate, self._store = gate()
        self._loop = gateway_server.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.gateway: Gateway | None = None
        self._thread = threading.Thread(target=self._run, name="meshserve-gateway", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.gateway = Gateway(GrpcReplica(self._address, vocab=self._vocab), self._gate, self._config)
            self._loop.run_until_complete(self.gateway.start())
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_until_complete(self.gateway.stopped.wait())

    def start(self) -> tuple[int, int]:
        """Starts serving; returns (HTTP port, gRPC port). Raises what kept the gateway from starting."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.gateway.http_port, self.gateway.grpc_port

    def stop(self) -> None:
        """Drains and stops the gateway (streams finish, every request is settled, the ledger written)."""
        if self.gateway is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.gateway.stop(), self._loop).result()
            self._thread.join()
        if self._store is not None:
            self._store.close()
