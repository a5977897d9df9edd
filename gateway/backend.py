"""The gateway's side of one meshserve replica: an async gRPC client (model info, tokenize, generate, load) behind the
small `Replica` interface the front doors use, and the map from the replica's gRPC status codes to `GateError`s.

The front doors never see grpc errors: every failure of a replica call surfaces as a `GateError` whose HTTP status
and OpenAI error type say what the caller should do (fix the request, retry later, retry elsewhere). A router over
many replicas (a later issue) implements the same `Replica` interface.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import math
import re
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import grpc
import grpc.aio

from gateway.gate import GateError
from protos.meshserve.v1 import DRAINING_KEY
from protos.meshserve.v1 import meshserve_pb2 as pb
from protos.meshserve.v1 import meshserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""The replica's retry hint on RESOURCE_EXHAUSTED (trailing metadata, milliseconds)."""

UNARY_TIMEOUT = 30.0
"""Deadline of the replica's unary calls (tokenize, model info, load), seconds."""

route_key: contextvars.ContextVar[str] = contextvars.ContextVar("route_key", default="")
"""Routing hint: the caller's key id, set by the front door before `generate`; a router over several replicas uses it
for fairness between keys in its queue (a single replica ignores it)."""
client_region: contextvars.ContextVar[str] = contextvars.ContextVar("client_region", default="")
"""Routing hint: the caller's region ("": the router's own), set by `gateway.flow.admit` before `generate` from the
request's `x-meshserve-region` (HTTP header or gRPC metadata) or its key's policy (`PreparedRequest.region`)."""

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a Tokenize reply on a long prompt carries every token's text
# Retry hint for UNAVAILABLE (warming up, draining, unreachable): the replica gives none.
_UNAVAILABLE_RETRY_SECONDS = 1.0


class Generation(Protocol):
    """One running Generate stream: async-iterate its messages; `cancel()` ends the call on the replica, which frees
    the request's slot within one decode dispatch. Iteration raises `GateError` when the replica fails the call."""

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]: ...

    async def __anext__(self) -> pb.GenerateResponse: ...

    def cancel(self) -> None: ...

    # A router's generation may also carry `replica: str`, the replica that served it ("a>b" after a failover from
    # a to b), which the ledger records instead of the router's name, and `device_seconds_by_replica: dict[str,
    # float]` once it has ended, each replica's device-seconds, which the ledger prices at each replica's own price.


class Replica(Protocol):
    """What the front doors need of a model replica (one meshserve server, or later a router over several)."""

    name: str
    """Names the replica in the ledger and logs (its address by default)."""

    async def model_info(self) -> pb.ModelInfo:
        """The served model, context length and request limits (static: may be cached)."""
        ...

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        """Token ids of a text or a chat exactly as Generate would see them."""
        ...

    # A replica may also offer `async count_tokens(request: pb.TokenizeRequest) -> int`: the number of tokenize()'s
    # ids without the round trip (GrpcReplica and fleet.router.Router, with the model's tokenizer: `LocalTokens`);
    # the flow uses it when present.

    def generate(self, request: pb.GenerateRequest) -> Generation:
        """Starts one Generate stream."""
        ...

    async def load(self) -> pb.Load:
        """Slots, queue and KV use right now (`draining` says whether it takes new requests)."""
        ...

    def token_bytes(self, ids: Sequence[int]) -> list[bytes] | None:
        """Each token's bytes (for log-probabilities by token), or None when this replica cannot name tokens."""
        ...

    async def close(self) -> None: ...


# ----- gRPC status -> GateError -------------------------------------------------------------------------------------

# The replica's messages start with the field they are about (see service/server.py and engine.sampling); these
# words name the request field in meshserve's terms ("prompt" is the input, whatever form it came in).
_FIELD_RE = re.compile(r"^(?:at most \d+ |each )?(?:chat\.)?([a-z_]+)(\[\d+\])?")
_FIELDS = {
    "text": "prompt",
    "token": "prompt",
    "token_ids": "prompt",
    "prompt": "prompt",
    "input": "prompt",
    "messages": "messages",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "seed": "seed",
    "max_tokens": "max_tokens",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "logprobs": "logprobs",
}


def field_of(message: str) -> str | None:
    """The request field an INVALID_ARGUMENT message from the replica is about, or None."""
    if "lower max_tokens" in message:
        return "max_tokens"
    m = _FIELD_RE.match(message)
    if m is None:
        return None
    field = _FIELDS.get(m.group(1))
    if field == "messages" and m.group(2):
        return field + m.group(2)
    return field


def _retry_after(error: grpc.aio.AioRpcError) -> float | None:
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return max(int(value), 0) / 1000
            except ValueError:
                return None
    return None


def _draining(error: grpc.aio.AioRpcError) -> bool:
    return any(key == DRAINING_KEY for key, _ in error.trailing_metadata() or ())


def rpc_error(error: grpc.aio.AioRpcError, replica: str) -> GateError:
    """The `GateError` a front door answers for a failed replica call.

    INVALID_ARGUMENT -> 400 naming the field; RESOURCE_EXHAUSTED (the replica's queue is full) -> 503 with the
    replica's retry hint (a 429 is the caller's own limit, which the gate decides); UNAVAILABLE (warming up, draining,
    unavailable) -> 503, with code "draining" when the replica says so (DRAINING_KEY); DEADLINE_EXCEEDED -> 504;
    CANCELLED -> 499; INTERNAL -> 500; anything else -> 502.
    """
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return GateError(400, details, param=field_of(details))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own message-size limit, not the replica's queue
        return GateError(413, f"the request is too large for the model server ({details})", code="request_too_large")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = _retry_after(error)
        return GateError(
            503,
            f"the model is overloaded ({details}); retry later",
            kind="server_error",
            code="overloaded",
            retry_after=_UNAVAILABLE_RETRY_SECONDS if retry is None else retry,
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return GateError(
            503,
            f"the model is unavailable ({details}); retry later",
            kind="server_error",
            code="draining" if _draining(error) else "unavailable",
            retry_after=_UNAVAILABLE_RETRY_SECONDS,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GateError(504, f"the model did not answer in time ({details})", kind="server_error", code="timeout")
    if code == grpc.StatusCode.CANCELLED:
        return GateError(499, f"the request was cancelled ({details})", kind="server_error", code="cancelled")
    if code == grpc.StatusCode.INTERNAL:
        return GateError(500, f"the model failed on this request ({details})", kind="server_error")
    return GateError(502, f"replica {replica} answered {code.name}: {details}", kind="server_error")


def retry_after_header(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


# ----- the gRPC replica ---------------------------------------------------------------------------------------------


class _GrpcGeneration:
    """A Generate call whose failures come out as GateErrors."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, replica: str) -> None:
        self._call = call
        self._replica = replica

    def __aiter__(self) -> _GrpcGeneration:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as e:
            raise rpc_error(e, self._replica) from None
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message

    def cancel(self) -> None:
        self._call.cancel()


class TokenVocab:
    """Token id -> bytes from a byte-level BPE vocabulary (an `engine.tokenizer.Tokenizer`), for log-probabilities.

    The gRPC API gives token ids only; until it names tokens itself, the gateway reads the model's tokenizer.
    """

    def __init__(self, tokenizer) -> None:
        from engine.tokenizer import bytes_to_unicode

        self._tokenizer = tokenizer
        self.tokenizer = tokenizer
        """The `engine.tokenizer.Tokenizer` itself (the gateway also counts prompts with it, see PromptCounter)."""
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self.vocab_size: int = tokenizer.vocab_size

    def token_bytes(self, token_id: int) -> bytes:
        entry = self._tokenizer.id_to_token(int(token_id))
        if entry is None:
            return b""
        try:
            return bytes(self._byte_of[c] for c in entry)
        except KeyError:  # an added token spelled as its text, not in the byte alphabet
            return entry.encode()


LOCAL_COUNT_INLINE_CHARS = 4096
"""Prompts up to this many characters are counted on the event loop (tens of microseconds); longer ones in a worker
thread, so a long prompt does not stall other requests."""
_PROBE_TEXT = "Probe 1: the gateway's tokenizer, ÄÖÜ äöü ß, 12345678, \t tabs,  spaces, 'quotes' and 🤖.\n"
_PROBE_CHAT = (("system", "You are brief."), ("user", _PROBE_TEXT), ("assistant", "OK."), ("user", "Again?"))


def _probes() -> list[pb.TokenizeRequest]:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in _PROBE_CHAT])
    return [pb.TokenizeRequest(text=_PROBE_TEXT, add_special_tokens=True), pb.TokenizeRequest(chat=chat)]


class PromptCounter:
    """Tokenizes a prompt in the gateway process exactly as the replica's Tokenize would, so admission (a count) and
    routing (the ids' block hashes) need no round trip to the replica. Used only through `LocalTokens`, after the
    replica's Tokenize agreed with it on probe texts (the gateway's tokenizer is configured separately from the
    replica's model and may not be the same)."""

    def __init__(self, tokenizer, info: pb.ModelInfo) -> None:
        self.tokenizer, self.limits = tokenizer, info.limits

    def ids(self, request: pb.TokenizeRequest) -> list[int] | None:
        """The prompt's token ids; None for an input the replica refuses (empty, too long, a role or conversation
        its chat template refuses): the replica's Tokenize says why, naming the field and the limit."""
        kind = request.WhichOneof("input")
        if kind == "text":
            if not request.text or len(request.text) > self.limits.max_input_chars:
                return None
            return self.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        if kind != "chat":
            return None
        messages = request.chat.messages
        if not 0 < len(messages) <= self.limits.max_messages:
            return None
        if sum(len(m.content) for m in messages) > self.limits.max_input_chars:
            return None
        try:
            return self.tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in messages])
        except ValueError:
            return None

    def count(self, request: pb.TokenizeRequest) -> int | None:
        ids = self.ids(request)
        return None if ids is None else len(ids)


def prompt_chars(request: pb.TokenizeRequest) -> int:
    if request.WhichOneof("input") == "chat":
        return sum(len(m.content) for m in request.chat.messages)
    return len(request.text)


class LocalTokens:
    """A prompt's token ids as `replica.tokenize` would give them: computed in this process by a `PromptCounter`
    over `replica.vocab` once the replica's Tokenize agreed with it on the probe texts, else (no tokenizer, a
    different one, an input the replica must judge) by a Tokenize call. Checked once, at the first use or `check()`;
    a replica that cannot answer the probes yet is asked again at the next use. Which way it went is logged once.

    `replica` is the owner: a GrpcReplica (counting for admission) or a fleet router (the ids it routes by and
    resumes with); `vocab` is read at the check, since a script may drop a tokenizer that does not fit the model."""

    def __init__(self, replica: Replica) -> None:
        self._replica = replica
        self._counter: PromptCounter | None = None
        self._checked = False
        self._lock: asyncio.Lock | None = None

    @property
    def local(self) -> bool:
        """Whether prompts are tokenized in this process (the tokenizer was checked and matches the replica's)."""
        return self._counter is not None

    async def ids(self, request: pb.TokenizeRequest) -> list[int]:
        """The prompt's token ids, as the replica's Tokenize would give them (its GateError when it refuses the
        input)."""
        counter = self._counter if self._checked else await self.check()
        ids = None
        if counter is not None:
            if prompt_chars(request) <= LOCAL_COUNT_INLINE_CHARS:
                ids = counter.ids(request)
            else:
                ids = await asyncio.to_thread(counter.ids, request)
        if ids is None:
            ids = list((await self._replica.tokenize(request)).token_ids)
        return ids

    async def check(self) -> PromptCounter | None:
        """Builds the PromptCounter when the replica's Tokenize agrees with the gateway's tokenizer on the probes;
        None (and a Tokenize per prompt) otherwise."""
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._checked:
                return self._counter
            name, vocab = self._replica.name, getattr(self._replica, "vocab", None)
            if vocab is None:
                self._checked = True
                log.info(
                    "replica %s: the gateway has no tokenizer (--tokenizer); every prompt is tokenized by the "
                    "replica's Tokenize (a round trip per request)",
                    name,
                )
                return None
            try:
                counter = PromptCounter(vocab.tokenizer, await self._replica.model_info())
                agree = True
                for probe in _probes():
                    local = await asyncio.to_thread(counter.ids, probe)
                    agree = agree and local == list((await self._replica.tokenize(probe)).token_ids)
            except GateError as e:
                log.info("replica %s: cannot check the gateway's tokenizer yet (%s)", name, e.message)
                return None
            self._counter, self._checked = (counter if agree else None), True
            if agree:
                log.info("replica %s: prompts are tokenized in the gateway (its tokenizer matches)", name)
            else:
                log.warning(
                    "replica %s: the gateway's tokenizer (--tokenizer) tokenizes differently from the replica's "
                    "model; every prompt is tokenized by the replica's Tokenize instead (a round trip per request)",
                    name,
                )
            return self._counter


_PROMPT_IDS_KEPT = 256
"""Prompts whose token ids a GrpcReplica keeps between the flow's count and the Generate that follows."""


def tokenize_request_of(request: pb.GenerateRequest) -> pb.TokenizeRequest | None:
    """The TokenizeRequest that gives a Generate request's prompt ids (a chat or a text); None for token ids."""
    kind = request.WhichOneof("input")
    if kind == "chat":
        return pb.TokenizeRequest(chat=request.chat)
    if kind == "text":
        return pb.TokenizeRequest(text=request.text, add_special_tokens=True)
    return None


class GrpcReplica:
    """One meshserve server reached over gRPC (grpc.aio). The channel is opened on first use, in the event loop that
    uses it; the model info is fetched once and kept.

    A prompt the flow counted (`count_tokens`) goes to the replica as its token ids, as vLLM's front end hands its
    engine ids: the replica does not render the chat template and tokenize it a second time on the request's way to
    its first token. The ids are exact either way: the gateway's tokenizer is used only after it agreed with the
    replica's (`LocalTokens`), else they are the replica's own Tokenize answer."""

    def __init__(self, address: str, *, name: str | None = None, vocab: TokenVocab | None = None) -> None:
        self.address = address
        self.name = name or address
        self.vocab = vocab
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.MeshServeStub | None = None
        self._info: pb.ModelInfo | None = None
        self._info_lock: asyncio.Lock | None = None
        self._local = LocalTokens(self)
        self._ids: collections.OrderedDict[bytes, list[int]] = collections.OrderedDict()

    def _client(self) -> pb_grpc.MeshServeStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.address,
                options=[
                    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ],
            )
            self._stub = pb_grpc.MeshServeStub(self._channel)
        return self._stub

    async def _unary(self, method: str, request):
        try:
            return await getattr(self._client(), method)(request, timeout=UNARY_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            raise rpc_error(e, self.name) from None

    async def model_info(self) -> pb.ModelInfo:
        if self._info is None:
            self._info_lock = self._info_lock or asyncio.Lock()
            async with self._info_lock:
                if self._info is None:
                    self._info = await self._unary("GetModelInfo", pb.GetModelInfoRequest())
        return self._info

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        return await self._unary("Tokenize", request)

    @property
    def counts_locally(self) -> bool:
        """Whether prompts are counted in this process (the tokenizer was checked and matches the replica's)."""
        return self._local.local

    async def count_tokens(self, request: pb.TokenizeRequest) -> int:
        """How many tokens the prompt is, as Tokenize would count it: in this process with the gateway's tokenizer
        once it has been checked against the replica's, else (no tokenizer, a different one, or an input the replica
        must judge) by a Tokenize call (`LocalTokens`)."""
        ids = await self._local.ids(request)
        key = request.SerializeToString(deterministic=True)
        self._ids[key] = ids
        self._ids.move_to_end(key)
        while len(self._ids) > _PROMPT_IDS_KEPT:
            self._ids.popitem(last=False)
        return len(ids)

    def _with_ids(self, request: pb.GenerateRequest) -> pb.GenerateRequest:
        """`request` with its prompt as the token ids `count_tokens` found for it, or as it is when none were kept."""
        tokenize = tokenize_request_of(request) if self._ids else None
        ids = None if tokenize is None else self._ids.get(tokenize.SerializeToString(deterministic=True))
        if ids is None:
            return request
        out = pb.GenerateRequest()
        out.CopyFrom(request)
        out.token_ids.ids[:] = ids  # replaces the chat or text (one input)
        return out

    def generate(self, request: pb.GenerateRequest) -> Generation:
        return _GrpcGeneration(self._client().Generate(self._with_ids(request)), self.name)

    async def load(self) -> pb.Load:
        return await self._unary("GetLoad", pb.GetLoadRequest())

    def token_bytes(self, ids: Sequence[int]) -> list[bytes] | None:
        if self.vocab is None:
            return None
        return [self.vocab.token_bytes(t) for t in ids]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
