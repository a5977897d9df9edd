"""The gateway's gRPC front door: the `meshserve.v1.MeshServe` API itself (grpc.aio), forwarded to the replica under the
same gate as the HTTP API - the key from `authorization: Bearer <key>` metadata, then prepare, count, admit, run and
finish exactly once (see gateway/flow.py), also when the client cancels mid-stream.

Differences from talking to a replica directly:
- A refusal maps the gate's status onto a gRPC code: 400 / 413 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 403
  PERMISSION_DENIED, 429 RESOURCE_EXHAUSTED with `retry-after` (seconds) and `grpc-retry-pushback-ms` trailing
  metadata, 503 UNAVAILABLE (the replica's full queue stays RESOURCE_EXHAUSTED, with its hint).
- A request above `max_request_bytes` is INVALID_ARGUMENT naming the limit, up to `TRANSPORT_BYTES_FACTOR` times the
  limit (as on a replica); only beyond that does gRPC itself refuse it (RESOURCE_EXHAUSTED).
- The caller's region is the `x-meshserve-region` metadata, as the HTTP header (see gateway/flow.py): a fleet serves
  it in that region first; a value that is not a region's name is INVALID_ARGUMENT.
- Prompts given as token ids are refused (the gate's policy reads text); `priority` keeps the proto's meaning (lower
  runs first).
- The first response echoes the client's request_id; the gateway's own id (the one `Feedback` and `/v1/feedback`
  refer to) is the `x-request-id` initial metadata. GetModelInfo names the served model.
- `Feedback` is the gateway's own (a replica answers UNIMPLEMENTED): the gate's `feedback`, as `POST /v1/feedback`;
  only the key that made the request may rate it (NOT_FOUND for any other, as for an unknown id).
- Every RPC is counted in the gateway's metrics (gateway/metrics.py) by method and status code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway import flow
from gateway.backend import Replica
from gateway.gate import ChatTurn, Gate, GateError, PreparedRequest, Principal
from gateway.metrics import GatewayMetrics
from gateway.openai_api import ticket_id
from protos.meshserve.v1 import TRANSPORT_BYTES_FACTOR
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MeshServe"].full_name
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""Largest serialized request accepted by default (INVALID_ARGUMENT beyond)."""
MAX_REQUEST_ID_CHARS = 200
MAX_STARS = 5

T = TypeVar("T")

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_of(error: GateError) -> grpc.StatusCode:
    """The gRPC code a front-door refusal becomes."""
    if error.code == "overloaded":  # the replica's own queue is full: what the replica said
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if error.status in _CODES:
        return _CODES[error.status]
    return grpc.StatusCode.INVALID_ARGUMENT if error.status < 500 else grpc.StatusCode.UNAVAILABLE


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    """The first value of the invocation metadata `name` (lower case), or None."""
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return str(value)
    return None


def _secret(context: grpc.aio.ServicerContext) -> str | None:
    value = _metadata(context, "authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _client_address(context: grpc.aio.ServicerContext) -> str | None:
    peer = context.peer() or ""  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer or None


class GatewayServicer(pb_grpc.MeshServeServicer):
    """MeshServe, forwarded to one replica through the gate."""

    def __init__(
        self,
        replica: Replica,
        gate: Gate,
        *,
        served_model_name: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.replica, self.gate = replica, gate
        self.served_model_name = served_model_name
        self.max_request_bytes = max_request_bytes
        self.metrics = metrics or GatewayMetrics(gate)

    async def _abort(self, context: grpc.aio.ServicerContext, error: GateError) -> None:
        trailing = ()
        if error.retry_after is not None:
            seconds = max(error.retry_after, 0.0)
            trailing = (
                ("retry-after", str(max(1, math.ceil(seconds)))),
                ("grpc-retry-pushback-ms", str(int(seconds * 1000))),
            )
        await context.abort(status_of(error), error.message, trailing_metadata=trailing)

    async def _authenticate(self, request, context: grpc.aio.ServicerContext) -> Principal:
        size = request.ByteSize()
        if size > self.max_request_bytes:
            raise GateError(
                413,
                f"the request is {size} bytes; the limit is {self.max_request_bytes} bytes (max_request_bytes)",
                code="request_too_large",
            )
        return await flow.gate_call(self.gate, "authenticate", _secret(context), _client_address(context))

    async def _served_model(self) -> str:
        return self.served_model_name or (await self.replica.model_info()).model_name

    async def _prepared(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> PreparedRequest:
        kind = request.WhichOneof("input")
        messages = prompt = None
        if kind == "text":
            if not request.text:
                raise GateError(400, "text is empty; send a non-empty prompt", param="prompt")
            prompt = request.text
        elif kind == "chat":
            if not request.chat.messages:
                raise GateError(400, "chat.messages is empty; send at least one message", param="messages")
            messages = [ChatTurn(m.role, m.content) for m in request.chat.messages]
        elif kind == "token_ids":
            raise GateError(400, "token_ids prompts are not accepted by the gateway; send text or chat", param="input")
        else:
            raise GateError(400, "input is empty: set one of text or chat", param="input")
        options = request.sampling
        sampling = {f.name: v for f, v in options.ListFields()}
        for repeated in ("stop", "stop_token_ids"):
            if repeated in sampling:
                sampling[repeated] = list(sampling[repeated])
        return PreparedRequest(
            model=await self._served_model(),
            messages=messages,
            prompt=prompt,
            sampling=sampling,
            priority=-request.priority,  # the gate's priority runs higher first
            client_address=_client_address(context),
            region=flow.region_of(_metadata(context, flow.REGION_HEADER)),
        )

    async def _unary(
        self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]
    ) -> T | None:
        """Runs one unary RPC's `work`, answering a GateError with its status; counts the RPC by its status."""
        started, code = time.monotonic(), grpc.StatusCode.OK
        try:
            return await work()
        except GateError as e:
            code = status_of(e)
            await self._abort(context, e)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.UNKNOWN  # what grpc answers for an exception escaping a handler
            raise
        finally:
            self.metrics.answered("grpc", method, code.name, time.monotonic() - started)
        return None

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        received, code = time.monotonic(), grpc.StatusCode.OK
        run: flow.Run | None = None
        try:
            try:
                principal = await self._authenticate(request, context)
                prepared = await self._prepared(request, context)
                run = await flow.admit(
                    self.gate, self.replica, principal, prepared, served_model=None, received_at=received
                )
                self.metrics.running("grpc", run)
                await context.send_initial_metadata((("x-request-id", run.ticket.request_id),))
                await run.wait_started()
            except GateError as e:
                self.metrics.refusal("grpc", e)
                raise
            self.metrics.started("grpc")
            async for _, message in run.events():
                if message.request_id:
                    message.request_id = request.request_id or run.ticket.request_id
                yield message
        except GateError as e:
            code = status_of(e)
            await self._abort(context, e)
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED  # the client went away
            raise
        except Exception:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            if run is not None:
                run.cancel()  # the client went away (the handler is cancelled), or a no-op after the end
            self.metrics.answered("grpc", "Generate", code.name, time.monotonic() - received)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        async def work() -> pb.TokenizeResponse:
            await self._authenticate(request, context)
            return await self.replica.tokenize(request)

        return await self._unary("Tokenize", context, work)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async def work() -> pb.ModelInfo:
            await self._authenticate(request, context)
            info = pb.ModelInfo()
            info.CopyFrom(await self.replica.model_info())
            info.model_name = await self._served_model()
            return info

        return await self._unary("GetModelInfo", context, work)

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.Load:
        async def work() -> pb.Load:
            await self._authenticate(request, context)
            return await self.replica.load()

        return await self._unary("GetLoad", context, work)

    async def Feedback(self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext) -> pb.FeedbackResponse:
        """Rates an earlier request of the calling key through the gate (see the module docstring)."""

        async def work() -> pb.FeedbackResponse:
            principal = await self._authenticate(request, context)
            if not request.request_id:
                raise GateError(400, "request_id is empty; send the id of the rated request", param="request_id")
            if len(request.request_id) > MAX_REQUEST_ID_CHARS:
                raise GateError(
                    400,
                    f"request_id has {len(request.request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}",
                    param="request_id",
                )
            kind = request.WhichOneof("rating")
            if kind is None:
                raise GateError(400, "rating is missing: set thumbs_up or stars", param="rating")
            if kind == "stars" and not 1 <= request.stars <= MAX_STARS:
                raise GateError(400, f"stars must be in [1, {MAX_STARS}], got {request.stars}", param="stars")
            rating = request.thumbs_up if kind == "thumbs_up" else request.stars
            await asyncio.to_thread(
                self.gate.feedback,
                principal,
                ticket_id(request.request_id),
                rating,
                request.comment or None,
                list(request.tags),
            )
            return pb.FeedbackResponse(status="recorded")

        return await self._unary("Feedback", context, work)


class GrpcFront:
    """The gateway's grpc.aio server: MeshServe (forwarded), health and reflection."""

    def __init__(
        self,
        replica: Replica,
        gate: Gate,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        served_model_name: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.address = f"{host}:{port}"
        self.servicer = GatewayServicer(
            replica, gate, served_model_name=served_model_name, max_request_bytes=max_request_bytes, metrics=metrics
        )
        self.health = health.aio.HealthServicer()
        # gRPC's own size limit sits well above ours, as the engine's server's does, so an oversized request still
        # reaches the handler and gets the INVALID_ARGUMENT that names the limit (see TRANSPORT_BYTES_FACTOR)
        receive_limit = TRANSPORT_BYTES_FACTOR * max_request_bytes
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", receive_limit)])
        pb_grpc.add_MeshServeServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = 0

    async def start(self) -> int:
        """Binds and starts serving; returns the port (RuntimeError when it cannot bind)."""
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind the gateway's gRPC front to {self.address} (in use?)")
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float) -> None:
        """Refuses new RPCs at once and gives open ones `grace` seconds to finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
