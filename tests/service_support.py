"""Helpers for the service tests: a tiny warmed engine, offline reference runs, and a loopback server with stubs."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import grpc
import jax.numpy as jnp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.config import tiny_config
from engine.engine import Engine, EngineConfig
from engine.model import init_params
from engine.sampling import SamplingParams
from engine.scheduler import Request, RequestOutput, Scheduler
from engine.tokenizer import Tokenizer, make_tiny_tokenizer
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc
from service.server import MeshServeServer, ServerConfig

RPC_TIMEOUT = 30.0
"""Deadline of every RPC a test makes, so a broken server fails a test instead of hanging it."""

TINY_ENGINE = dict(num_slots=4, max_seq_len=128, max_prefill_len=32, decode_steps=4, dtype="float32")


def make_test_engine(**overrides) -> tuple[Engine, Tokenizer]:
    """A tiny random-weight engine (byte-level tokenizer, vocab 256, EOS id 1), warmed up: few shapes, fast."""
    cfg = tiny_config()
    engine = Engine(cfg, init_params(cfg, jnp.float32), EngineConfig(**{**TINY_ENGINE, **overrides}))
    engine.warmup()
    return engine, make_tiny_tokenizer()


@dataclasses.dataclass
class Completion:
    """What one request produced, offline or streamed."""

    text: str
    token_ids: list[int]
    finish_reason: str


def offline_generate(
    engine: Engine, tokenizer: Tokenizer, requests: Sequence[tuple[list[int], SamplingParams]]
) -> list[Completion]:
    """Runs requests through a fresh Scheduler on `engine` (no server may be running on it)."""
    outputs: dict[str, list[RequestOutput]] = {}
    scheduler = Scheduler(engine, tokenizer)
    for i, (prompt, params) in enumerate(requests):
        scheduler.submit(Request(str(i), prompt, params, lambda o: outputs.setdefault(o.request_id, []).append(o)))
    scheduler.run_until_idle(max_steps=10_000)
    result = []
    for i in range(len(requests)):
        outs = outputs[str(i)]
        result.append(
            Completion("".join(o.text for o in outs), [t for o in outs for t in o.token_ids], outs[-1].finish_reason)
        )
    return result


def sampling_options(params: SamplingParams) -> pb.SamplingOptions:
    """The proto twin of `params`, every field set explicitly."""
    options = pb.SamplingOptions(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        max_tokens=params.max_tokens,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        options.seed = params.seed
    if params.logprobs is not None:
        options.logprobs = params.logprobs
    return options


_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_ERROR: "error",
}


def collect(messages: Sequence[pb.GenerateResponse]) -> Completion:
    """Joins a finished stream into one Completion."""
    return Completion(
        "".join(m.text for m in messages),
        [t for m in messages for t in m.token_ids],
        _REASONS.get(messages[-1].finish_reason, "unfinished"),
    )


@dataclasses.dataclass
class Running:
    """A started server and a connected client."""

    server: MeshServeServer
    channel: grpc.Channel
    stub: pb_grpc.MeshServeStub
    health: health_pb2_grpc.HealthStub

    def generate(self, request: pb.GenerateRequest, timeout: float = RPC_TIMEOUT) -> list[pb.GenerateResponse]:
        """All messages of one Generate stream (raises grpc.RpcError on a non-OK status)."""
        return list(self.stub.Generate(request, timeout=timeout))

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT).status

    def load(self) -> pb.Load:
        return self.stub.GetLoad(pb.GetLoadRequest(), timeout=RPC_TIMEOUT)


@contextlib.contextmanager
def running_server(engine: Engine, tokenizer: Tokenizer, *, wait_ready: bool = True, **config) -> Iterator[Running]:
    """Starts a server on a free loopback port (bandwidth fixed, so nothing is measured) and stops it afterwards."""
    config = {"port": 0, "memory_bandwidth_gbps": 20.0, "max_waiting": 64, **config}
    server = MeshServeServer(engine, tokenizer, ServerConfig(**config))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        if wait_ready:
            assert server.wait_until_ready(60), "server did not finish warm-up"
        yield Running(server, channel, pb_grpc.MeshServeStub(channel), health_pb2_grpc.HealthStub(channel))
    finally:
        channel.close()
        server.drain(timeout=0)
        server.stop(grace=0)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Polls `predicate` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def slow_generate(engine: Engine, seconds: float) -> Callable:
    """A replacement for `engine.generate` that sleeps before each dispatch (to keep requests in flight)."""
    original = engine.generate

    def generate(steps=None):
        time.sleep(seconds)
        return original(steps)

    return generate
