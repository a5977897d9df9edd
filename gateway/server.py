"""One gateway process: the OpenAI HTTP API (uvicorn) and the gRPC front (grpc.aio) on one event loop, over one
replica and one gate, with a graceful stop: both stop accepting, open streams finish (up to `drain_timeout`), every
admitted request is settled with the gate, then the gate's `shutdown()` (or `close()`) runs if it has one. Both fronts
count into one `GatewayMetrics` (gateway/metrics.py), served at the HTTP port's `GET /metrics`. Over a fleet (a replica
that is an `openai_api.FleetView`, such as `fleet.router.Router`) the HTTP port also serves the fleet's dashboard at
`GET /fleet`, its snapshot at `GET /fleet.json`, and the fleet's metrics inside `GET /metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvicorn

from gateway import flow
from gateway.backend import Replica
from gateway.gate import Gate
from gateway.grpc_front import GrpcFront
from gateway.metrics import GatewayMetrics
from gateway.openai_api import DEFAULT_MAX_BODY_BYTES, FleetView, create_app

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    """What one gateway process serves; `scripts/gateway.py` maps its flags onto this."""

    host: str = "127.0.0.1"
    """Address both fronts bind; 127.0.0.1 keeps the gateway off the network unless asked."""
    http_port: int = 8000
    """OpenAI HTTP API port; 0 picks a free one (see `Gateway.http_port`)."""
    grpc_port: int = 50052
    """gRPC front port; 0 picks a free one (see `Gateway.grpc_port`)."""
    served_model_name: str | None = None
    """The model name clients send and see; None: the replica's own."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest HTTP request body (413 beyond) and gRPC request (INVALID_ARGUMENT beyond)."""
    drain_timeout: float = 30.0
    """Seconds open streams may take to finish after a stop begins before they are ended."""
    keys_required: bool = False
    """Whether the gate must check keys; required when `host` is not a loopback address."""

    def validate(self) -> None:
        """Raises ValueError for a configuration that must not run (an open gateway on the network)."""
        if not self.keys_required and not is_loopback(self.host):
            raise ValueError(f"binding {self.host} (not loopback) requires keys_required")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop a gateway serves on: uvloop's (libuv; each wake-up and socket callback costs a fraction of the
    standard loop's, and a request crosses several: the HTTP read, grpc.aio's completion queue, the SSE writes), or
    asyncio's own where uvloop is not installed (it is a dependency; Windows has none)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the gateway's event loop (`new_event_loop`)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


class _Uvicorn(uvicorn.Server):
    # The gateway owns the signals (one handler stops both fronts); uvicorn's would re-raise them after its shutdown.
    @contextlib.contextmanager
    def capture_signals(self):
        yield


class Gateway:
    """Both fronts over one replica and gate; `start()` and `stop()` run in the event loop that serves them."""

    def __init__(
        self, replica: Replica, gate: Gate, config: GatewayConfig | None = None, *, fleet: FleetView | None = None
    ) -> None:
        """`fleet`: whose view the HTTP front serves (/fleet, /fleet.json, its metrics in /metrics); default the
        replica itself when it is a `FleetView` (a fleet router), else none."""
        self.config = config = config or GatewayConfig()
        config.validate()
        self.replica, self.gate = replica, gate
        if fleet is None and isinstance(replica, FleetView):
            fleet = replica
        self.fleet = fleet
        self.metrics = GatewayMetrics(gate)
        """The gateway's own metrics, one registry for both fronts (served at the HTTP front's /metrics)."""
        self.app = create_app(
            replica,
            gate,
            served_model_name=config.served_model_name,
            max_body_bytes=config.max_body_bytes,
            metrics=self.metrics,
            fleet=fleet,
        )
        self.grpc = GrpcFront(
            replica,
            gate,
            host=config.host,
            port=config.grpc_port,
            served_model_name=config.served_model_name,
            max_request_bytes=config.max_body_bytes,
            metrics=self.metrics,
        )
        self._http = _Uvicorn(
            uvicorn.Config(
                self.app,
                http="httptools",  # the C parser (pyproject); h11, uvicorn's fallback, costs ~1 ms more per request
                lifespan="off",
                log_config=None,
                timeout_graceful_shutdown=max(int(config.drain_timeout), 1),
            )
        )
        self._http_task: asyncio.Task | None = None
        self.http_port = 0
        self.grpc_port = 0
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        """Binds both ports and starts serving (RuntimeError / OSError when a port cannot be bound)."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        # Naming the protocol matters: asyncio turns Nagle's algorithm off only on accepted sockets whose proto is
        # IPPROTO_TCP (0 does not count), and with Nagle on, a response written in parts (headers then body, SSE
        # events) waits ~40 ms for the client's delayed ACK. TCP_NODELAY on the listening socket is inherited too.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.http_port))
        sock.set_inheritable(True)
        self.http_port = sock.getsockname()[1]
        self.grpc_port = await self.grpc.start()
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]), name="gateway-http")
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises why it stopped
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        log.info(
            "gateway: HTTP on %s:%d, gRPC on %s:%d", self.config.host, self.http_port, self.config.host, self.grpc_port
        )

    async def stop(self) -> None:
        """Stops accepting on both fronts, lets open streams finish for up to `drain_timeout`, settles every admitted
        request, then shuts the gate down (its `shutdown` or `close`, if it has one) and closes the replica.
        Idempotent."""
        if self.stopped.is_set():
            return
        grace = self.config.drain_timeout
        self._http.should_exit = True
        await asyncio.gather(self.grpc.stop(grace), self._http_task or asyncio.sleep(0), return_exceptions=True)
        await flow.Run.wait_all(timeout=grace + 5.0)
        # the Gate protocol has no shutdown: call the gate's own if it has one (StoreGate: close, writes the ledger)
        shutdown = getattr(self.gate, "shutdown", None) or getattr(self.gate, "close", None)
        if callable(shutdown):
            try:
                await asyncio.to_thread(shutdown)
            except Exception:
                log.exception("gate shutdown failed")
        await self.replica.close()
        self.stopped.set()
