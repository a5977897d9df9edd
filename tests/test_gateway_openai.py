"""The gateway's front doors. Fast: the OpenAI app over a stub replica (schema, validation, error mapping, the gate's
flow). Slow: the official `openai` client (sync, async, streaming) and a gRPC client against a real uvicorn + gRPC
gateway on 127.0.0.1 in front of a real meshserve server on SmolLM2 - parity of streamed and whole greedy text,
usage and cached tokens, logprobs, stop, n, errors as the client raises them, and a client going away mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator

import grpc
import grpc.aio
import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from gateway import flow
from gateway.backend import GrpcReplica, TokenVocab, field_of, rpc_error
from gateway.gate import ChatTurn, GateError, Outcome, PreparedRequest, Principal, Ticket
from gateway.grpc_front import GrpcFront
from gateway.open_gate import ANONYMOUS, OpenGate
from gateway.openai_api import create_app
from gateway.server import Gateway, GatewayConfig
from gateway.store import Store
from gateway.store_gate import StoreGate
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc

KEY = "sk-test-0123456789abcdef"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2"  # the served name; the replica's own differs
AUTH = {"authorization": f"Bearer {KEY}"}


class RecordingGate(OpenGate):
    """The open gate, plus an optional required key, an optional refusal at admission, and a record of every
    finish and feedback."""

    def __init__(self, key: str | None = None) -> None:
        self.key = key
        self.refuse: GateError | None = None
        self.finished: list[tuple[Ticket, Outcome]] = []
        self.feedbacks: list[tuple] = []
        self._cv = threading.Condition()

    def authenticate(self, secret: str | None, client_address: str | None) -> Principal:
        if self.key is None:
            return ANONYMOUS
        if secret != self.key:
            raise GateError(401, "invalid API key", kind="authentication_error", code="invalid_api_key")
        return Principal(key_id="key-1", user_id="user-1")

    def admit(self, principal, prepared, prompt_tokens):
        if self.refuse is not None:
            raise self.refuse
        return super().admit(principal, prepared, prompt_tokens)

    def finish(self, ticket: Ticket, outcome: Outcome) -> None:
        with self._cv:
            self.finished.append((ticket, outcome))
            self._cv.notify_all()

    def feedback(self, principal, request_id, rating, comment, tags) -> None:
        self.feedbacks.append((principal, request_id, rating, comment, tags))

    def outcomes(self, request_id: str, timeout: float = 15.0) -> list[Outcome]:
        """The outcomes finished for `request_id` (a response id or the bare one), waiting for at least one."""
        bare = request_id.split("-", 1)[1] if request_id.startswith(("chatcmpl-", "cmpl-")) else request_id
        with self._cv:
            self._cv.wait_for(lambda: any(t.request_id == bare for t, _ in self.finished), timeout)
            return [o for t, o in self.finished if t.request_id == bare]


# ----- fast: a stub replica -----------------------------------------------------------------------------------------

STUB_TEXT = "Hello there, world!"


class StubGeneration:
    def __init__(self, messages: list[pb.GenerateResponse], error: GateError | None, error_at: int) -> None:
        self.messages, self.error, self.error_at = messages, error, error_at
        self.cancelled = False
        self._i = 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        await asyncio.sleep(0)
        if self.error is not None and self._i == self.error_at:
            raise self.error
        if self._i >= len(self.messages):
            raise StopAsyncIteration
        self._i += 1
        return self.messages[self._i - 1]

    def cancel(self) -> None:
        self.cancelled = True


class StubReplica:
    """Answers STUB_TEXT (3 bytes per message, byte ids) cut at max_tokens; tokens are bytes of the prompt."""

    name = "stub"

    def __init__(self) -> None:
        self.info = pb.ModelInfo(
            model_name="stub-model",
            vocab_size=256,
            context_length=128,
            limits=pb.Limits(
                max_stop_strings=8,
                max_stop_string_chars=256,
                max_logprobs=20,
                max_messages=16,
                max_input_chars=4096,
                max_prompt_tokens=127,
                max_stop_token_ids=7,
            ),
        )
        self.requests: list[pb.GenerateRequest] = []
        self.streams: list[StubGeneration] = []
        self.error: GateError | None = None
        self.error_at = 0
        self.draining = False

    async def model_info(self) -> pb.ModelInfo:
        return self.info

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        if request.WhichOneof("input") == "text":
            text = request.text
        else:
            text = "".join(f"<{m.role}>{m.content}\n" for m in request.chat.messages)
        return pb.TokenizeResponse(token_ids=list(text.encode()))

    def generate(self, request: pb.GenerateRequest) -> StubGeneration:
        self.requests.append(request)
        data = STUB_TEXT.encode()[: request.sampling.max_tokens]
        prompt = len((request.text or "".join(m.content for m in request.chat.messages)).encode())
        messages = []
        for start in range(0, len(data), 3):
            ids = list(data[start : start + 3])
            m = pb.GenerateResponse(text=bytes(ids).decode(), token_ids=ids)
            if request.sampling.HasField("logprobs"):
                for t in ids:
                    top = [pb.TopLogprob(token_id=t, logprob=-0.5), pb.TopLogprob(token_id=33, logprob=-1.5)]
                    m.logprobs.add(token_id=t, logprob=-0.5, top=top[: request.sampling.logprobs])
            messages.append(m)
        messages[0].request_id, messages[0].prompt_tokens = request.request_id, prompt
        last = messages[-1]
        last.finish_reason = pb.FINISH_REASON_LENGTH if len(data) < len(STUB_TEXT) else pb.FINISH_REASON_STOP
        last.usage.CopyFrom(pb.Usage(prompt_tokens=prompt, completion_tokens=len(data), cached_tokens=4))
        stream = StubGeneration(messages, self.error, self.error_at)
        self.streams.append(stream)
        return stream

    async def load(self) -> pb.Load:
        return pb.Load(slots_total=4, draining=self.draining)

    def token_bytes(self, ids):
        return [bytes([t]) for t in ids]

    async def close(self) -> None:
        pass


@pytest.fixture
def stub():
    replica, gate = StubReplica(), RecordingGate(KEY)
    with TestClient(create_app(replica, gate, served_model_name="m", max_body_bytes=4096)) as client:
        client.headers.update(AUTH)
        yield client, replica, gate


def chat_body(**extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def sse_events(text: str) -> list:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_chat_response_schema_and_flow(stub):
    client, replica, gate = stub
    body = chat_body(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        max_completion_tokens=50,
        presence_penalty=0,
        response_format={"type": "text"},
        top_k=-1,
        seed=3,
        user="someone",
    )
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"].startswith("chatcmpl-") and r.headers["x-request-id"] == out["id"]
    assert out["object"] == "chat.completion" and out["model"] == "m"
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": STUB_TEXT, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    n = len(STUB_TEXT)
    assert out["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": n,
        "total_tokens": 10 + n,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    (sent,) = replica.requests
    assert [(m.role, m.content) for m in sent.chat.messages] == [("system", "be brief"), ("user", "hi")]
    s = sent.sampling
    assert (s.max_tokens, s.temperature, s.seed, s.HasField("top_k"), s.HasField("logprobs")) == (
        50,
        1.0,
        3,
        True,
        False,
    )
    assert s.top_k == 0
    ((ticket, outcome),) = gate.finished
    assert out["id"] == "chatcmpl-" + ticket.request_id and ticket.principal.key_id == "key-1"
    assert (outcome.replica, outcome.finish_reason, outcome.completion_tokens, outcome.error) == (
        "stub",
        "stop",
        n,
        None,
    )
    assert (outcome.prompt_tokens, outcome.cached_tokens) == (10, 4)


def test_streams_sse_with_usage_and_done(stub):
    client, _, gate = stub
    r = client.post(
        "/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=7)
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["id"] == r.headers["x-request-id"] and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == STUB_TEXT[:7]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    assert [o.finish_reason for _, o in gate.finished] == ["length"]


def test_completions_n_seeds_and_logprobs(stub):
    client, replica, gate = stub
    r = client.post("/v1/completions", json={"model": "m", "prompt": ["abc"], "n": 2, "seed": 7, "logprobs": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert [s.sampling.seed for s in (q for q in replica.requests)] == [7, 8]
    assert all(q.sampling.max_tokens == 16 for q in replica.requests)  # OpenAI's completions default
    lp = out["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == out["choices"][0]["text"] == STUB_TEXT[:16]
    assert lp["token_logprobs"] == [-0.5] * 16 and lp["text_offset"] == list(range(16))
    assert lp["top_logprobs"][0] == {"H": -0.5, "!": -1.5}
    assert out["usage"]["prompt_tokens"] == 3 and out["usage"]["completion_tokens"] == 32
    ((_, outcome),) = gate.finished
    assert outcome.completion_tokens == 32 and outcome.prompt_tokens == 6  # the ledger sums over choices


def test_chat_logprobs_schema(stub):
    client, replica, _ = stub
    r = client.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2, max_tokens=3))
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert replica.requests[0].sampling.logprobs == 2
    assert content[0] == {
        "token": "H",
        "logprob": -0.5,
        "bytes": [72],
        "top_logprobs": [
            {"token": "H", "logprob": -0.5, "bytes": [72]},
            {"token": "!", "logprob": -1.5, "bytes": [33]},
        ],
    }
    r = client.post("/v1/chat/completions", json=chat_body(logprobs=True, max_tokens=3, stream=True))
    chunks = [e for e in sse_events(r.text) if e != "[DONE]" and e["choices"][0]["logprobs"]]
    assert [t["token"] for c in chunks for t in c["choices"][0]["logprobs"]["content"]] == ["H", "e", "l"]


@pytest.mark.parametrize(
    ("change", "status", "param", "words"),
    [
        ({"foo": 1}, 400, "foo", "Unrecognized request argument supplied: foo"),
        ({"temperature": 3}, 400, "temperature", "less than or equal to 2"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "not supported"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
        ({"n": 0}, 400, "n", "greater than or equal to 1"),
        ({"top_logprobs": 2}, 400, "top_logprobs", "requires logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "less than or equal to 20"),
        ({"messages": []}, 400, "messages", "at least 1"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "not supported"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content", "text"),
        ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "required"),
        ({"stop": [str(i) for i in range(9)]}, 400, "stop", "limit is 8"),
        ({"stop": 5}, 400, "stop", "string"),
        ({"max_tokens": 1000}, 400, "max_tokens", "at most"),
        ({"messages": [{"role": "user", "content": "x" * 200}]}, 400, "messages", "context is 128 tokens"),
        ({"seed": -1}, 400, "seed", "greater than or equal to 0"),
        ({"stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
        ({"model": "nope"}, 404, "model", "does not exist"),
        ({"model": None}, 400, "model", "string"),
    ],
)
def test_validation_errors_name_the_field(stub, change, status, param, words):
    client, replica, gate = stub
    r = client.post("/v1/chat/completions", json={**chat_body(), **change})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert replica.requests == [] and gate.finished == []  # refused before admission


def test_completions_prompt_validation(stub):
    client, _, _ = stub
    for prompt, words in [(["a", "b"], "2 prompts"), ([1, 2, 3], "token-id"), (None, "string")]:
        r = client.post("/v1/completions", json={"model": "m", "prompt": prompt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and words in r.text, r.text
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "echo": True})
    assert r.json()["error"]["param"] == "echo"
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x" * 200})
    assert r.json()["error"]["param"] == "prompt" and "context" in r.text


def test_routes_json_and_size_errors(stub):
    client, _, _ = stub
    r = client.post("/v1/nope", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"[]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    big = json.dumps(chat_body(user="u" * 5000)).encode()
    r = client.post("/v1/chat/completions", content=big)
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=iter([big[:3000], big[3000:]]))  # chunked: no Content-Length
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_authentication_never_echoes_the_key(stub):
    client, _, _ = stub
    for headers in ({"authorization": "Bearer sk-wrong-secret"}, {"authorization": "Basic abc"}, {}):
        client.headers.pop("authorization", None)
        client.headers.update(headers)
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/feedback")):
            r = client.request(method, path, json=chat_body())
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["type"] == "authentication_error" and "sk-wrong" not in r.text
    client.headers.update(AUTH)
    assert client.get("/v1/models").json()["data"][0]["id"] == "m"
    assert client.get("/v1/models/m").json()["max_model_len"] == 128
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/health", headers={"authorization": ""}).json()["status"] == "ok"


def test_gate_and_replica_refusals_keep_their_status(stub):
    client, replica, gate = stub
    gate.refuse = GateError(429, "too many tokens this minute", kind="rate_limit_exceeded", retry_after=2.5)
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["type"] == "rate_limit_exceeded" and gate.finished == []
    gate.refuse = None
    for code, details, trailing, status, retry in [
        (grpc.StatusCode.UNAVAILABLE, "server is draining", (), 503, "1"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", (("grpc-retry-pushback-ms", "1500"),), 503, "2"),
        (grpc.StatusCode.INVALID_ARGUMENT, "top_k must be in [0, 256]", (), 400, None),
        (grpc.StatusCode.INTERNAL, "engine failure", (), 500, None),
    ]:
        replica.error = rpc_error(
            grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details), "stub"
        )
        r = client.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == status and r.headers.get("retry-after") == retry, r.text
        assert details in r.json()["error"]["message"] and r.headers["x-request-id"].startswith("chatcmpl-")
    assert [o.finish_reason for _, o in gate.finished] == ["error"] * 4  # admitted, so settled once each
    replica.draining = True
    assert client.get("/health").status_code == 503


def test_error_mid_stream_ends_with_an_error_event(stub):
    client, replica, gate = stub
    replica.error, replica.error_at = GateError(500, "the model failed", kind="server_error"), 2
    r = client.post("/v1/chat/completions", json=chat_body(stream=True))
    events = sse_events(r.text)
    assert r.status_code == 200 and "[DONE]" not in events
    assert events[-1] == {"error": {"message": "the model failed", "type": "server_error", "param": None, "code": None}}
    ((_, outcome),) = gate.finished
    assert outcome.finish_reason == "error" and outcome.error == "the model failed" and outcome.completion_tokens == 6
    assert replica.streams[0].cancelled


def test_outcome_splits_device_seconds_by_the_replicas_a_router_names(stub):
    """A router's streams name the replicas that served them and each one's device-seconds (a failover "b>a", or n
    choices routed apart): the outcome sums them by replica, so the ledger prices each share at its own replica; a
    stream given up after a failover still charges what its attempts spent. A request one replica served carries no
    split and is priced as before."""
    client, replica, gate = stub
    splits: list[dict[str, float]] = []
    generate = replica.generate

    def routed(request: pb.GenerateRequest) -> StubGeneration:
        stream = generate(request)
        split = splits.pop(0)
        stream.replica, stream.device_seconds_by_replica = ">".join(split), split  # as fleet.router's streams
        stream.messages[-1].usage.device_seconds = sum(split.values())
        return stream

    replica.generate = routed

    def outcome(body: dict) -> Outcome:
        r = client.post("/v1/chat/completions", json=body)
        (found,) = gate.outcomes(r.headers["x-request-id"])
        return found

    splits[:] = [{"a": 0.25}, {"b": 0.125, "a": 0.5}]  # choice 0 on a; choice 1 failed over from b to a
    two = outcome(chat_body(n=2, seed=1))
    assert (two.replica, two.device_seconds, two.device_seconds_by_replica) == ("a", 0.875, {"a": 0.75, "b": 0.125})
    splits[:] = [{"b": 0.25}]
    one = outcome(chat_body())
    assert (one.replica, one.device_seconds, one.device_seconds_by_replica) == ("b", 0.25, None)
    splits[:] = [{"b": 0.125, "a": 0.5}]
    replica.error = GateError(503, "the stream was cut and could not be resumed", kind="server_error")
    cut = outcome(chat_body())
    assert cut.finish_reason == "error" and cut.device_seconds_by_replica == {"b": 0.125, "a": 0.5}
    assert cut.device_seconds == 0.625


def test_feedback_refers_to_the_response_id(stub):
    client, _, gate = stub
    rid = client.post("/v1/chat/completions", json=chat_body()).json()["id"]
    r = client.post("/v1/feedback", json={"request_id": rid, "rating": 5, "comment": "good", "tags": ["a"]})
    assert r.status_code == 200 and r.json()["request_id"] == rid
    ((principal, request_id, rating, comment, tags),) = gate.feedbacks
    assert (principal.key_id, "chatcmpl-" + request_id, rating, comment, tags) == ("key-1", rid, 5, "good", ["a"])
    assert client.post("/v1/feedback", json={"rating": 1}).json()["error"]["param"] == "request_id"


def test_rpc_error_mapping():
    def error(code, details="", trailing=()):
        return rpc_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details), "r")

    e = error(grpc.StatusCode.INVALID_ARGUMENT, "prompt (90 tokens) + max_tokens (50) exceeds ...; lower max_tokens")
    assert (e.status, e.param) == (400, "max_tokens")
    e = error(grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue is full", (("grpc-retry-pushback-ms", "250"),))
    assert (e.status, e.retry_after, e.code) == (503, 0.25, "overloaded")
    assert error(grpc.StatusCode.UNAVAILABLE).status == 503 and error(grpc.StatusCode.UNAVAILABLE).retry_after
    assert error(grpc.StatusCode.DEADLINE_EXCEEDED).status == 504
    assert error(grpc.StatusCode.UNIMPLEMENTED).status == 502
    assert field_of("chat.messages[3].content brings the conversation to 9 characters") == "messages[3]"
    assert field_of("at most 8 stop strings are allowed, got 9") == "stop"
    assert field_of("each stop string must have 1 to 256 characters, got 0") == "stop"
    assert field_of("text has 9 characters; the limit is 8 (max_input_chars)") == "prompt"
    assert field_of("top_p must be in (0, 1], got 2") == "top_p"
    assert field_of("request id 'x' is already in flight") is None


def test_grpc_front_over_a_stub():
    async def main() -> None:
        replica, gate = StubReplica(), RecordingGate(KEY)
        front = GrpcFront(replica, gate, served_model_name="m", max_request_bytes=1000)
        port = await front.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.MeshServeStub(channel)
                auth = (("authorization", f"Bearer {KEY}"),)

                async def refusal(request, metadata=auth) -> grpc.aio.AioRpcError:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for _ in stub.Generate(request, metadata=metadata, timeout=10):
                            pass
                    return err.value

                request = pb.GenerateRequest(request_id="c1", text="hi", sampling=pb.SamplingOptions(max_tokens=5))
                call = stub.Generate(request, metadata=auth, timeout=10)
                messages = [m async for m in call]
                rid = dict(await call.initial_metadata())["x-request-id"]
                assert "".join(m.text for m in messages) == STUB_TEXT[:5] and messages[0].request_id == "c1"
                assert [t.request_id for t, _ in gate.finished] == [rid]
                assert replica.requests[0].sampling.max_tokens == 5 and replica.requests[0].text == "hi"
                info = await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=auth, timeout=10)
                assert info.model_name == "m" and info.context_length == 128

                e = await refusal(request, metadata=(("authorization", "Bearer nope"),))
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "nope" not in e.details()
                e = await refusal(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2])))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in e.details()
                e = await refusal(pb.GenerateRequest(text="x" * 2000))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "1000 bytes (max_request_bytes)" in e.details()
                e = await refusal(pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=500)))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in e.details()
                gate.refuse = GateError(429, "slow down", kind="rate_limit_exceeded", retry_after=2.5)
                e = await refusal(request)
                trailing = dict(e.trailing_metadata())
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and e.details() == "slow down"
                assert (trailing["retry-after"], trailing["grpc-retry-pushback-ms"]) == ("3", "2500")
                gate.refuse = None
                replica.error = GateError(503, "queue full", kind="server_error", code="overloaded", retry_after=1)
                assert (await refusal(request)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert [o.finish_reason for _, o in gate.finished] == ["length", "error"]
        finally:
            await front.stop(0)

    asyncio.run(main())


def test_cancelled_during_admission_is_still_settled():
    class SlowGate(RecordingGate):
        def admit(self, principal, prepared, prompt_tokens):
            time.sleep(0.2)
            return super().admit(principal, prepared, prompt_tokens)

    gate = SlowGate()

    async def main() -> None:
        prepared = PreparedRequest(model="m", messages=[ChatTurn("user", "hi")], prompt=None, sampling={})
        admitting = asyncio.create_task(
            flow.admit(gate, StubReplica(), ANONYMOUS, prepared, served_model="m", received_at=time.monotonic())
        )
        await asyncio.sleep(0.05)
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        await asyncio.sleep(0.3)
        assert await flow.Run.wait_all(timeout=5)

    asyncio.run(main())
    ((_, outcome),) = gate.finished
    assert outcome.finish_reason == "cancelled"


# ----- the fleet view needs an operator key ---------------------------------------------------------------------------

FLEET_ADDRESS = "10.0.0.7:50051"


class StubFleet:
    """A FleetView: one replica with an address, a page that polls fleet.json."""

    def __init__(self) -> None:
        self.metrics = types.SimpleNamespace(registry=CollectorRegistry())

    def snapshot(self) -> dict:
        return {"replicas": [{"name": "r0", "address": FLEET_ADDRESS}]}

    def dashboard_html(self) -> str:
        return "<!doctype html><title>fleet</title><script>fetch('fleet.json')</script>"


def test_fleet_view_needs_an_operator_key_unless_the_gate_is_open(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/gateway.db")
    gate = StoreGate(store)
    gate.keys.create_user("ops")
    plain, operator = gate.keys.create_key("ops", "plain"), gate.keys.create_key("ops", "dashboard")
    gate.policies.set("key", operator.info.id, "test", {"operator": True})
    try:
        with TestClient(create_app(StubReplica(), gate, fleet=StubFleet()), follow_redirects=False) as client:
            for headers, status in (({}, 401), ({"authorization": f"Bearer {plain.secret}"}, 403)):
                r = client.get("/fleet.json", headers=headers)
                assert r.status_code == status and FLEET_ADDRESS not in r.text
                assert r.json()["error"]["type"] == ("authentication_error" if status == 401 else "permission_error")
            r = client.get("/fleet.json", headers={"authorization": f"Bearer {operator.secret}"})
            assert r.status_code == 200 and r.json() == StubFleet().snapshot()

            # a browser: the page without a key is a sign-in form (no script, no fleet data)
            r = client.get("/fleet")
            assert r.status_code == 401 and "<form" in r.text and "<script" not in r.text
            assert FLEET_ADDRESS not in r.text and "form-action 'self'" in r.headers["content-security-policy"]
            r = client.post("/fleet", data={"key": plain.secret})
            assert r.status_code == 403 and "set-cookie" not in r.headers and plain.secret not in r.text
            r = client.post("/fleet", data={})
            assert r.status_code == 400 and "key is required" in r.text
            r = client.post("/fleet", data={"key": operator.secret})
            assert r.status_code == 303 and r.headers["location"] == "fleet"
            cookie = r.headers["set-cookie"].lower()
            assert all(a in cookie for a in ("meshserve_operator=", "httponly", "samesite=strict", "path=/"))
            # the browser now sends the cookie with the page and with its script's same-origin polls
            r = client.get("/fleet")
            assert r.status_code == 200 and "fetch('fleet.json')" in r.text
            assert client.get("/fleet.json").json() == StubFleet().snapshot()
            gate.keys.revoke_key(operator.info.id)  # a revoked key's cookie stops working
            assert client.get("/fleet.json").status_code == 401
            r = client.get("/fleet")
            assert r.status_code == 401 and "invalid API key" in r.text
    finally:
        gate.close()
        store.close()
    # the open gate (loopback, no keys) stays open
    with TestClient(create_app(StubReplica(), OpenGate(), fleet=StubFleet())) as client:
        assert client.get("/fleet.json").json() == StubFleet().snapshot()
        assert "fetch('fleet.json')" in client.get("/fleet").text


# ----- slow: the real thing -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def gateway_in_thread(replica_address: str, gate, vocab) -> Iterator[Gateway]:
    """A Gateway (uvicorn + gRPC front, ports picked) on its own event loop in a thread; stopped gracefully."""
    box: dict = {}
    ready = threading.Event()

    async def main() -> None:
        try:
            replica = GrpcReplica(replica_address, vocab=vocab)
            gateway = Gateway(
                replica, gate, GatewayConfig(http_port=0, grpc_port=0, drain_timeout=5.0, served_model_name=MODEL)
            )
            await gateway.start()
            box["gateway"], box["stop"], box["loop"] = gateway, asyncio.Event(), asyncio.get_running_loop()
        except BaseException as e:
            box["error"] = e
            raise
        finally:
            ready.set()
        await box["stop"].wait()
        await gateway.stop()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="gateway", daemon=True)
    thread.start()
    assert ready.wait(60) and "error" not in box, box.get("error")
    try:
        yield box["gateway"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)


@pytest.fixture(scope="module")
def real():
    """SmolLM2 served on loopback, behind a gateway whose gate requires KEY; one of each for the module."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from engine.engine import EngineConfig
    from engine.load import enable_compilation_cache, load_engine
    from tests.service_support import running_server

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in (*names, "jax_persistent_cache_min_entry_size_bytes")}
    # warm-up dominates this module's time: reuse compiled shapes across runs, then leave jax as it was
    enable_compilation_cache()
    compilation_cache.reset_cache()
    try:
        engine, tok = load_engine(
            None, EngineConfig(num_slots=4, max_seq_len=256, max_prefill_len=64, decode_steps=4, dtype="float32")
        )
        gate = RecordingGate(KEY)
        with running_server(engine, tok) as server:
            address = f"127.0.0.1:{server.server.port}"
            with gateway_in_thread(address, gate, TokenVocab(tok)) as gateway:
                yield gateway, gate, server
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def clients(gateway: Gateway, key: str = KEY) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    url = f"http://127.0.0.1:{gateway.http_port}/v1"
    return (
        openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60),
        openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=60),
    )


QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.mark.slow
def test_real_chat_and_completions(real):
    gateway, gate, _ = real
    sync, async_client = clients(gateway)
    whole = sync.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    text = whole.choices[0].message.content
    assert whole.id.startswith("chatcmpl-") and "Paris" in text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 20 and whole.usage.completion_tokens >= 1
    (outcome,) = gate.outcomes(whole.id)
    assert outcome.finish_reason == whole.choices[0].finish_reason and outcome.replica.startswith("127.0.0.1:")
    # the gateway counted the prompt itself (its tokenizer matched the replica's), to the replica's own count
    assert gateway.replica.counts_locally
    (ticket,) = [t for t, _ in gate.finished if whole.id.endswith(t.request_id)]
    assert ticket.reserved_tokens == whole.usage.prompt_tokens + 24

    # streamed, the same prompt again: the same text, and its prompt now comes from cached KV pages
    chunks = list(
        sync.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    usage = chunks[-1].usage
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.prompt_tokens_details.cached_tokens > 0

    # a stop string taken from the greedy text cuts it there
    word = text.split()[2]
    cut = sync.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stop=[word])
    assert cut.choices[0].message.content == text[: text.index(word)] and cut.choices[0].finish_reason == "stop"

    async def completions() -> tuple[str, str]:
        prompt = "The three primary colors are"
        one = await async_client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
        stream = await async_client.completions.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True
        )
        return one.choices[0].text, "".join([c.choices[0].text async for c in stream])

    one, streamed = asyncio.run(completions())
    assert one == streamed and len(one) > 0


@pytest.mark.slow
def test_real_prompt_counts_fall_back_to_the_replica_for_another_tokenizer(real):
    from engine.tokenizer import make_tiny_tokenizer

    _, _, server = real
    address = f"127.0.0.1:{server.server.port}"

    async def main() -> None:
        matching, other, fresh = (
            GrpcReplica(address, vocab=real[0].replica.vocab),
            GrpcReplica(address, vocab=TokenVocab(make_tiny_tokenizer())),
            GrpcReplica(address),  # counts nothing: sends chats and texts as they are
        )
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Count me, please: 1, 2, 3.")])
        try:
            for request in (
                pb.TokenizeRequest(chat=chat),
                pb.TokenizeRequest(text="Hello there", add_special_tokens=True),
            ):
                expected = list((await matching.tokenize(request)).token_ids)
                assert await matching.count_tokens(request) == await other.count_tokens(request) == len(expected)
                # the Generate that follows a count carries the counted ids (the replica tokenizes nothing again)
                generate = pb.GenerateRequest(
                    request_id="r", sampling=pb.SamplingOptions(max_tokens=3, temperature=0.0, ignore_eos=True)
                )
                if request.WhichOneof("input") == "chat":
                    generate.chat.CopyFrom(request.chat)
                else:
                    generate.text = request.text
                for replica in (matching, other):
                    sent = replica._with_ids(generate)
                    assert sent.WhichOneof("input") == "token_ids" and list(sent.token_ids.ids) == expected
                    assert sent.request_id == "r" and sent.sampling.max_tokens == 3
                    got = [t async for m in replica.generate(generate) for t in m.token_ids]
                    assert got == [t async for m in fresh.generate(generate) for t in m.token_ids]  # as a chat / text
                    assert len(got) == 3
            assert matching.counts_locally and not other.counts_locally
            # a prompt never counted goes as it came
            uncounted = pb.GenerateRequest(text="Never counted", sampling=pb.SamplingOptions(max_tokens=1))
            assert matching._with_ids(uncounted) is uncounted
            # an input the replica refuses is its to explain, with the field
            with pytest.raises(GateError) as err:
                await matching.count_tokens(pb.TokenizeRequest(text="", add_special_tokens=True))
            assert err.value.status == 400 and err.value.param == "prompt"
        finally:
            await matching.close()
            await other.close()
            await fresh.close()

    asyncio.run(main())


@pytest.mark.slow
def test_real_logprobs_and_n(real):
    gateway, gate, _ = real
    sync, _ = clients(gateway)
    out = sync.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the most likely token is the one chosen
    two = sync.chat.completions.create(model=MODEL, messages=QUESTION, temperature=1.0, seed=11, max_tokens=8, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert 2 <= two.usage.completion_tokens <= 16
    (outcome,) = gate.outcomes(two.id)
    assert outcome.completion_tokens == two.usage.completion_tokens
    assert outcome.prompt_tokens == 2 * two.usage.prompt_tokens


@pytest.mark.slow
def test_real_errors_as_the_client_raises_them(real):
    gateway, _, _ = real
    sync, _ = clients(gateway)
    with pytest.raises(openai.BadRequestError) as err:
        sync.chat.completions.create(model=MODEL, messages=QUESTION, temperature=5)
    assert err.value.param == "temperature" and "2" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        sync.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10_000)
    assert err.value.param == "max_tokens" and "256" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        sync.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        clients(gateway, key="sk-wrong")[0].models.list()
    assert [m.id for m in sync.models.list()] == [MODEL]
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    r = httpx.post(f"http://127.0.0.1:{gateway.http_port}/v1/chat/completions", json=big, headers=AUTH, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


@pytest.mark.slow
def test_real_client_going_away_frees_the_request(real):
    gateway, gate, server = real
    body = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    url = f"http://127.0.0.1:{gateway.http_port}/v1/chat/completions"
    with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body, headers=AUTH) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # streaming has begun
    (outcome,) = gate.outcomes(rid)
    assert outcome.finish_reason == "cancelled" and 0 < outcome.completion_tokens < 200
    deadline = time.monotonic() + 10
    while server.load().slots_used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.load().slots_used == 0
    time.sleep(0.2)
    assert len(gate.outcomes(rid)) == 1  # finished exactly once


@pytest.mark.slow
def test_real_grpc_front(real):
    gateway, gate, _ = real
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.MeshServeStub(channel)
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in QUESTION])
        request = pb.GenerateRequest(request_id="mine", chat=chat, sampling=pb.SamplingOptions(max_tokens=24))
        metadata = (("authorization", f"Bearer {KEY}"),)
        call = stub.Generate(request, metadata=metadata, timeout=60)
        messages = list(call)
        rid = dict(call.initial_metadata())["x-request-id"]
        assert messages[0].request_id == "mine" and messages[-1].finish_reason in (1, 2)
        assert "Paris" in "".join(m.text for m in messages)
        (outcome,) = gate.outcomes(rid)
        assert outcome.completion_tokens == messages[-1].usage.completion_tokens
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10)
        assert info.model_name == MODEL and info.context_length == 256
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and KEY not in err.value.details()
        huge = pb.GenerateRequest(text="x" * (5 * 1024 * 1024))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(huge, metadata=metadata, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_request_bytes" in err.value.details()
        # a client cancelling mid-stream: the replica's call is cancelled and the ticket settled once, as cancelled
        long = pb.GenerateRequest(chat=chat, sampling=pb.SamplingOptions(max_tokens=200, ignore_eos=True))
        call = stub.Generate(long, metadata=metadata, timeout=60)
        next(call)
        rid = dict(call.initial_metadata())["x-request-id"]
        call.cancel()
        (outcome,) = gate.outcomes(rid)
        assert outcome.finish_reason == "cancelled" and outcome.completion_tokens < 200
        bad = pb.GenerateRequest(chat=chat, sampling=pb.SamplingOptions(max_tokens=1000))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(bad, metadata=metadata, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in err.value.details()


# ----- the script: SIGTERM drains --------------------------------------------------------------------------------


@pytest.mark.slow
def test_gateway_script_drains_on_sigterm(real, monkeypatch):
    """scripts/gateway.py in its own process, in front of the module's replica: SIGTERM mid-stream lets the stream
    finish, refuses new connections, and the process exits 0."""
    from tests.service_support import slow_generate

    _, _, server = real
    engine = server.server.engine
    monkeypatch.setattr(engine, "generate", slow_generate(engine, 0.03))  # the stream outlives the SIGTERM
    command = [
        sys.executable,
        os.path.join(ROOT, "scripts", "gateway.py"),
        f"--replica=127.0.0.1:{server.server.port}",
        "--http_port=0",
        "--grpc_port=0",
        "--tokenizer=",
        f"--served_model_name={MODEL}",
        "--drain_timeout=20",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("gateway listening on"):
                break
        ports = dict(part.split("=") for part in lines[-1].split()[-2:])
        url = f"http://127.0.0.1:{ports['http_port']}/v1/completions"
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True, "stream": True}
        body["stream_options"] = {"include_usage": True}
        with httpx.Client(timeout=30) as client, client.stream("POST", url, json=body) as r:
            assert r.status_code == 200, r.read()
            events = r.iter_lines()
            assert next(e for e in events if e.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = [e for e in events if e.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and len(rest) >= 8
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 64  # the whole stream came
        with pytest.raises(httpx.TransportError):
            httpx.post(url, json=body, timeout=5)
        assert proc.wait(timeout=30) == 0, "".join(lines) + proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
