"""The OpenAI-compatible HTTP front door: `create_app(replica, gate)` is a FastAPI app serving

  POST /v1/chat/completions   POST /v1/completions   GET /v1/models[/{model}]   POST /v1/feedback   GET /health
  GET /metrics (the gateway's own Prometheus metrics, gateway/metrics.py; no key needed: they name no caller)

over one `Replica`, with the `Gate` deciding who may do what (see gateway/gate.py and gateway/flow.py for the flow).
When the replica is a fleet (a `FleetView`, such as `fleet.router.Router`), the app also serves the fleet's view:

  GET /fleet (its dashboard page)   GET /fleet.json (its snapshot)   and its metrics inside GET /metrics

The fleet view names replicas and their addresses, so it needs an operator key (the `operator` role of a key's or
user's policy, see `Gate.is_operator`) unless the gate is open (loopback without keys). A script sends the key as
`Authorization: Bearer <key>`. A browser opening /fleet without one gets a small sign-in form (no script) that POSTs
the key to /fleet; the answer sets it as the cookie `meshserve_operator` (HttpOnly, SameSite=Strict, Path=/, Secure
over https, 12 hours) and redirects to /fleet, whose script then polls /fleet.json with the cookie, as a same-origin
fetch does. The key is never taken from the URL: a query string ends up in access logs, browser history and Referer
headers. /metrics needs no key: it names no caller (guard its port with the network policy, as for any exporter).

Decisions:
- Errors are always OpenAI's `{"error": {"message", "type", "param", "code"}}`: validation 400 naming the field and the
  limit (FastAPI's 422 too), 401 / 403 from the gate, 404 for an unknown model or route, 413 for a body above
  `max_body_bytes` (checked from Content-Length and while reading, before any parsing), 429 (the gate's limits) and
  503 (the replica's queue full, draining, unreachable) with Retry-After.
- The caller is authenticated before the body is parsed, so an unauthenticated caller learns nothing of the schema.
- Unknown fields are refused (400 "Unrecognized request argument"); common fields this server does not implement
  (tools, response_format, penalties, logit_bias, ...) are refused by name unless their value is harmless (a zero
  penalty, `response_format: {"type": "text"}`, ...). vLLM's extras (top_k, min_p, ignore_eos, stop_token_ids) are
  accepted at the top level, as vLLM does.
- Sampling defaults follow OpenAI: temperature 1 when unset (the replica's own default is greedy); max_tokens 16
  for completions (OpenAI's default), and for chat the replica's min(256, context left). `user` and a message's
  `name` are accepted and not used (the gate has no field for them).
- A response (streamed or not) starts only once the replica produced its first message, so a refusal after admission
  (queue full, draining, a limit only the replica knows) still gets its own status instead of a broken stream. Then
  each message is forwarded as it comes (no buffering). An error after the first message ends the stream with an
  SSE `data: {"error": ...}` event and no `[DONE]`.
- The caller may name its region in the `x-meshserve-region` header: over a fleet, replicas there serve it first
  (spilling elsewhere when they have no room); a key's policy may pin another (gateway/policy.py). A value that is
  not a region's name (1 to 64 of A-Z a-z 0-9 . _ -) is a 400 naming the header; an empty one names none.
- `n` > 1 runs n requests on the replica (seeds seed, seed + 1, ... when a seed is given); usage counts the prompt
  once and the completions of every choice, as OpenAI does; the gate's outcome sums over choices.
- Token names for log-probabilities come from `Replica.token_bytes`; a replica that cannot name tokens refuses
  logprobs with 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import math
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import flow
from gateway.backend import Replica, retry_after_header
from gateway.gate import ChatTurn, Gate, GateError, PreparedRequest, Principal
from gateway.metrics import CONTENT_TYPE, GatewayMetrics, HttpMetrics
from protos.meshserve.v1 import meshserve_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body accepted by default (413 beyond)."""
MAX_TOP_LOGPROBS = 20


# ----- request schema -----------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool | None = None


class ChatMessageIn(_Body):
    role: str
    content: str | None = None
    name: str | None = Field(None, max_length=256)  # accepted and not used (the chat template has no names)

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        # OpenAI's content parts: only text parts are supported; they are joined in order
        if not isinstance(value, list):
            return value
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content[{i}] is a {kind!r} part; only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)


def _stop_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if value is None or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        return value
    raise ValueError("must be a string or a list of strings")


class _Sampling(_Body):
    """What chat and completions share: OpenAI's sampling fields, vLLM's extras, and the known unsupported ones."""

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=flow.SEED_RANGE)
    stop: list[str] | None = None
    n: int = Field(1, ge=1, le=flow.MAX_N)
    user: str | None = Field(None, max_length=256)
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # known but not implemented: refused unless harmless (see UNSUPPORTED)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    echo: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        return _stop_list(value)


# field -> is this value harmless (the same as not sending it)?
UNSUPPORTED: dict[str, Callable[[Any, _Sampling], bool]] = {
    "presence_penalty": lambda v, r: v == 0,
    "frequency_penalty": lambda v, r: v == 0,
    "repetition_penalty": lambda v, r: v == 1,
    "logit_bias": lambda v, r: not v,
    "min_tokens": lambda v, r: v == 0,
    "best_of": lambda v, r: v == r.n,
    "suffix": lambda v, r: not v,
    "echo": lambda v, r: not v,
    "tools": lambda v, r: not v,
    "tool_choice": lambda v, r: v in ("none", "auto") and not r.tools,
    "parallel_tool_calls": lambda v, r: True,  # meaningless without tools
    "functions": lambda v, r: not v,
    "function_call": lambda v, r: v in ("none", "auto") and not r.functions,
    "response_format": lambda v, r: v == {"type": "text"},
    "store": lambda v, r: not v,
    "metadata": lambda v, r: not v,
    "service_tier": lambda v, r: v in ("auto", "default"),
    "modalities": lambda v, r: v == ["text"],
    "audio": lambda v, r: False,
    "prediction": lambda v, r: False,
    "reasoning_effort": lambda v, r: False,
    "web_search_options": lambda v, r: False,
    "skip_special_tokens": lambda v, r: v,
    "include_stop_str_in_output": lambda v, r: not v,
}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Sampling):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_text(cls, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            raise ValueError(f"has {len(value)} prompts; send one prompt per request")
        raise ValueError("must be a string (token-id prompts are not supported)")


class FeedbackRequest(_Body):
    """A rating of an earlier response; the gate judges the rating's scale, the comment and the tags."""

    request_id: str = Field(min_length=1, max_length=200)
    rating: bool | int | str
    comment: str | None = None
    tags: list[str] = Field(default_factory=list)


_ID_PREFIXES = ("chatcmpl-", "cmpl-")


def ticket_id(response_id: str) -> str:
    """The gate's request id behind a response id (`chatcmpl-<id>`, `cmpl-<id>` or the bare id)."""
    for prefix in _ID_PREFIXES:
        if response_id.startswith(prefix):
            return response_id[len(prefix) :]
    return response_id


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _prepare(body: _Sampling, client_address: str | None, region: str) -> PreparedRequest:
    """The gate's view of a validated request from `region` (the caller's, "" for none); raises GateError(400) for a
    field this server does not implement."""
    for field, harmless in UNSUPPORTED.items():
        value = getattr(body, field)
        if value is not None and not harmless(value, body):
            raise GateError(400, f"{field} is not supported by this server (got {value!r})", param=field)
    if body.stream_options is not None and not body.stream:
        raise GateError(400, "stream_options is only allowed when stream is true", param="stream_options")
    sampling: dict[str, Any] = {
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": body.stop,
        "top_k": None if body.top_k is None else max(body.top_k, 0),  # vLLM's -1 disables, as 0 does here
        "min_p": body.min_p,
        "ignore_eos": body.ignore_eos or None,
        "stop_token_ids": body.stop_token_ids,
    }
    messages = prompt = None
    if isinstance(body, ChatCompletionRequest):
        sampling["max_tokens"] = body.max_completion_tokens or body.max_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise GateError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        if body.logprobs:
            sampling["logprobs"] = body.top_logprobs or 0
        messages = []
        for i, m in enumerate(body.messages):
            if m.role not in _ROLES:
                raise GateError(
                    400,
                    f"messages[{i}].role {m.role!r} is not supported; use one of {sorted(_ROLES)}",
                    param=f"messages[{i}].role",
                )
            if m.content is None:
                raise GateError(400, f"messages[{i}].content is required", param=f"messages[{i}].content")
            messages.append(ChatTurn(_ROLES[m.role], m.content))
    else:
        assert isinstance(body, CompletionRequest)
        sampling["max_tokens"] = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default
        sampling["logprobs"] = body.logprobs
        prompt = body.prompt
    return PreparedRequest(
        model=body.model,
        messages=messages,
        prompt=prompt,
        sampling={k: v for k, v in sampling.items() if v is not None},
        n=body.n,
        client_address=client_address,
        region=region,
    )


# ----- errors -------------------------------------------------------------------------------------------------------


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: GateError, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if error.retry_after is not None:
        headers["retry-after"] = retry_after_header(error.retry_after)
    return JSONResponse(
        error_body(error.message, error.kind, error.param, error.code), status_code=error.status, headers=headers
    )


def _field_path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if part in ("body", "query", "path", "header"):
            continue
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def validation_error(errors: Sequence[Any]) -> GateError:
    """The 400 for pydantic's first complaint, naming the field (and the limit, which pydantic's message states)."""
    if not errors:
        return GateError(400, "invalid request")
    first = errors[0]
    field = _field_path(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return GateError(400, f"Unrecognized request argument supplied: {field}", param=field)
    if first.get("type") == "missing":
        return GateError(400, f"Missing required parameter: '{field}'.", param=field)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return GateError(400, f"Invalid value for '{field}': {message}", param=field or None)


_CHAT_PARAMS = {"prompt": "messages", "logprobs": "top_logprobs"}
_COMPLETION_PARAMS = {"messages": "prompt"}


def _rename_param(error: GateError, chat: bool) -> GateError:
    names = _CHAT_PARAMS if chat else _COMPLETION_PARAMS
    if error.param is not None:
        base, sep, rest = error.param.partition("[")
        if base in names:
            error.param = names[base] + sep + rest
    return error


class BodyLimit:
    """ASGI middleware: 413 for a request body above `max_bytes`, judged from Content-Length before reading and from
    the bytes read so far while reading, before anything parses it; the accepted body is replayed to the app.

    Before the 413 goes out, the rest of the body is read and thrown away (up to `DRAIN_BYTES` beyond the limit, for
    at most `DRAIN_SECONDS`): closing a connection with unread request bytes makes the kernel send a reset, which
    destroys the 413 in the client's receive buffer before the client (still sending) reads it."""

    DRAIN_BYTES = 64 * 1024 * 1024
    DRAIN_SECONDS = 5.0

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _drain(self, receive, more_body: bool) -> None:
        """Reads and discards the rest of the request body (bounded, see the class docstring)."""
        left = self.DRAIN_BYTES
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.DRAIN_SECONDS):
                while more_body and left > 0:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away
                    left -= len(message.get("body", b""))
                    more_body = message.get("more_body", False)

    async def _refuse(self, receive, send, size: str, more_body: bool = True) -> None:
        await self._drain(receive, more_body)
        body = json.dumps(
            error_body(
                f"the request body is {size} bytes; the limit is {self.max_bytes} bytes (max_body_bytes)",
                "invalid_request_error",
                None,
                "request_too_large",
            )
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = 0
        if length > self.max_bytes:
            # a client waiting for "100 Continue" has sent no body: refuse without asking for it
            waiting = headers.get(b"expect", b"").lower() == b"100-continue"
            await self._refuse(receive, send, str(length), more_body=not waiting)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(receive, send, f"more than {self.max_bytes}", message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the client's disconnect

        await self.app(scope, replay, send)


# ----- responses ----------------------------------------------------------------------------------------------------


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else -9999.0


class _EventStream(StreamingResponse):
    """An SSE response that cancels its run however it ends (finished, client gone, server shutting down)."""

    def __init__(self, content: AsyncIterator[bytes], run: flow.Run, headers: dict[str, str]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )
        self._run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.cancel()


class _Choices:
    """Formats one request's messages as OpenAI choices (chat or completions), streamed or whole."""

    def __init__(self, replica: Replica, chat: bool, n: int, logprobs: bool) -> None:
        self.replica, self.chat, self.logprobs = replica, chat, logprobs
        self.text: list[list[str]] = [[] for _ in range(n)]
        self.lps: list[list[pb.TokenLogprob]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.usage: list[pb.Usage | None] = [None] * n
        self.prompt_tokens: int | None = None
        self._offsets = [0] * n  # completions' text_offset, per choice

    def add(self, index: int, message: pb.GenerateResponse) -> None:
        if message.prompt_tokens and self.prompt_tokens is None:
            self.prompt_tokens = message.prompt_tokens
        self.text[index].append(message.text)
        self.lps[index].extend(message.logprobs)
        if message.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH):
            self.finish[index] = flow.FINISH_REASONS[message.finish_reason]
            self.usage[index] = message.usage

    def _names(self, lps: Sequence[pb.TokenLogprob]) -> dict[int, bytes]:
        ids = sorted({lp.token_id for lp in lps} | {t.token_id for lp in lps for t in lp.top})
        return dict(zip(ids, self.replica.token_bytes(ids) or [b""] * len(ids), strict=True))

    def logprobs_json(self, index: int, lps: Sequence[pb.TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        names = self._names(lps)

        def text(token: int) -> str:
            return names[token].decode("utf-8", errors="replace")

        if self.chat:

            def entry(token: int, logprob: float) -> dict[str, Any]:
                return {"token": text(token), "logprob": _finite(logprob), "bytes": list(names[token])}

            content = [
                {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t.token_id, t.logprob) for t in lp.top]}
                for lp in lps
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for lp in lps:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text(lp.token_id))
        return {
            "tokens": [text(lp.token_id) for lp in lps],
            "token_logprobs": [_finite(lp.logprob) for lp in lps],
            "top_logprobs": [{text(t.token_id): _finite(t.logprob) for t in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def usage_json(self, fallback_prompt_tokens: int) -> dict[str, Any]:
        usages = [u for u in self.usage if u is not None]
        prompt = usages[0].prompt_tokens if usages else (self.prompt_tokens or fallback_prompt_tokens)
        completion = sum(u.completion_tokens for u in usages)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min((u.cached_tokens for u in usages), default=0)},
        }

    def whole(self) -> list[dict[str, Any]]:
        choices = []
        for i in range(len(self.text)):
            text = "".join(self.text[i])
            choice: dict[str, Any] = {"index": i}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            else:
                choice["text"] = text
            choice["logprobs"] = self.logprobs_json(i, self.lps[i])
            choice["finish_reason"] = self.finish[i]
            choices.append(choice)
        return choices


# ----- the fleet view -----------------------------------------------------------------------------------------------


@runtime_checkable
class FleetView(Protocol):
    """What a replica that is a fleet of replicas (`fleet.router.Router`) shows through the gateway: a dashboard page,
    the JSON it polls, and a Prometheus registry of its own. The gateway knows nothing else of fleets."""

    metrics: Any
    """Has `registry`, a `prometheus_client.CollectorRegistry`: the fleet's series."""

    def snapshot(self) -> dict[str, Any]:
        """The fleet now, JSON-able (served at /fleet.json)."""
        ...

    def dashboard_html(self) -> str:
        """A self-contained page (inline CSS and JS, no external assets) that polls /fleet.json."""
        ...


class _Forward(Collector):
    """Another registry's series, collected at scrape time into this one: the fleet's into the gateway's, so one
    scrape of /metrics sees both (their names never collide: `meshserve_fleet_*` vs `meshserve_gateway_*`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def describe(self) -> list:
        return []  # collected lazily: the fleet's series come and go with its replicas

    def collect(self):
        return self._registry.collect()


# the page may run its own inline script and style, and fetch from this gateway only
_DASHBOARD_HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
    ),
}


OPERATOR_COOKIE = "meshserve_operator"
"""The cookie a browser holds an operator key in after signing in at /fleet."""
OPERATOR_COOKIE_SECONDS = 12 * 3600
MAX_KEY_CHARS = 256

# the sign-in page: a form and nothing else (no script, posts to this gateway only)
_SIGN_IN_HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
}
_SIGN_IN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meshserve fleet: sign in</title>
<style>body{{font:15px system-ui,sans-serif;margin:4em auto;max-width:28em;color:#222}}
input{{font:inherit;width:100%;box-sizing:border-box;margin:.4em 0;padding:.4em}}p.error{{color:#a00}}</style>
</head><body><h1>Fleet view</h1><p>The fleet view needs an operator key.</p>{error}
<form method="post" action="fleet"><label>Operator key
<input type="password" name="key" autocomplete="current-password" required></label>
<input type="submit" value="Open the fleet view"></form></body></html>
"""


def sign_in_page(error: GateError | None, status: int = 401) -> HTMLResponse:
    """The sign-in form, with the refusal's message (never a key) when there was one."""
    text = "" if error is None else f'<p class="error">{html.escape(error.message)}</p>'
    return HTMLResponse(
        _SIGN_IN_PAGE.format(error=text),
        status_code=error.status if error is not None else status,
        headers=_SIGN_IN_HEADERS,
    )


# ----- the app ------------------------------------------------------------------------------------------------------


def _bearer(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None (absent or another scheme)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class _Api:
    def __init__(self, replica: Replica, gate: Gate, served_model_name: str | None, metrics: GatewayMetrics) -> None:
        self.replica, self.gate, self.metrics = replica, gate, metrics
        self._served = served_model_name
        self.created = int(time.time())

    async def served_model(self) -> str:
        if self._served is None:
            self._served = (await self.replica.model_info()).model_name
        return self._served

    async def authenticate(self, request: Request) -> Principal:
        client = request.client.host if request.client else None
        return await flow.gate_call(self.gate, "authenticate", _bearer(request.headers.get("authorization")), client)

    async def operator(self, request: Request, secret: str | None = None) -> Principal:
        """The caller, when it may open the operator pages: its key from `secret`, else the bearer header, else the
        sign-in cookie. GateError 401 without a valid key, 403 for a key without the operator role."""
        client = request.client.host if request.client else None
        if secret is None:
            secret = _bearer(request.headers.get("authorization")) or request.cookies.get(OPERATOR_COOKIE)
        principal = await flow.gate_call(self.gate, "authenticate", secret, client)
        if hasattr(self.gate, "is_operator"):
            allowed = await flow.gate_call(self.gate, "is_operator", principal)
        else:
            allowed = principal.anonymous
        if not allowed:
            raise GateError(
                403,
                "this API key may not open the fleet view: it needs the operator role (policy field `operator`)",
                kind="permission_error",
                code="operator_required",
            )
        return principal

    async def sign_in(self, request: Request) -> Response:
        """POST /fleet: the sign-in form's key -> the cookie and a redirect to the dashboard, or the form again
        with why not (400 without a key, 401, 403)."""
        raw = await request.body()
        fields = urllib.parse.parse_qs(raw.decode("utf-8", errors="replace"), max_num_fields=8)
        secret = (fields.get("key") or [""])[0].strip()
        if not secret or len(secret) > MAX_KEY_CHARS:
            error = GateError(400, f"key is required, at most {MAX_KEY_CHARS} characters", param="key")
            return sign_in_page(error)
        try:
            await self.operator(request, secret)
        except GateError as e:
            return sign_in_page(e)
        response = RedirectResponse("fleet", status_code=303, headers={"cache-control": "no-store"})
        response.set_cookie(
            OPERATOR_COOKIE,
            secret,
            max_age=OPERATOR_COOKIE_SECONDS,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @staticmethod
    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GateError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise GateError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e.errors(include_input=False)) from None

    async def _watch_disconnect(self, request: Request, run: flow.Run) -> None:
        # The body is read: the next ASGI message is the client's disconnect (or the end of the response).
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                run.cancel()
                return

    async def complete(self, request: Request, chat: bool) -> Response:
        try:
            return await self._complete(request, chat)
        except GateError as e:
            self.metrics.refusal("http", e)
            raise

    async def _complete(self, request: Request, chat: bool) -> Response:
        received = time.monotonic()
        principal = await self.authenticate(request)
        body = await self.parse(request, ChatCompletionRequest if chat else CompletionRequest)
        client = request.client.host if request.client else None
        try:
            prepared = _prepare(body, client, flow.region_of(request.headers.get(flow.REGION_HEADER)))
            if prepared.sampling.get("logprobs") is not None and self.replica.token_bytes([]) is None:
                raise GateError(
                    400, "logprobs are not available: this gateway cannot name the model's tokens", param="logprobs"
                )
            run = await flow.admit(
                self.gate,
                self.replica,
                principal,
                prepared,
                served_model=await self.served_model(),
                received_at=received,
            )
        except GateError as e:
            raise _rename_param(e, chat) from None
        self.metrics.running("http", run)
        response_id = ("chatcmpl-" if chat else "cmpl-") + run.ticket.request_id
        headers = {"x-request-id": response_id}
        watcher = asyncio.create_task(self._watch_disconnect(request, run))
        handed_over = False
        try:
            try:
                await run.wait_started()
            except GateError as e:
                self.metrics.refusal("http", e)
                return error_response(_rename_param(e, chat), headers)
            self.metrics.started("http")
            admitted = run.ticket.prepared  # after the gate's policy
            logprobs = admitted.sampling.get("logprobs") is not None
            choices = _Choices(self.replica, chat, len(run.requests), logprobs)
            meta = {"id": response_id, "created": int(time.time()), "model": await self.served_model()}
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                watcher.cancel()  # from here the streaming response watches the client itself
                handed_over = True
                return _EventStream(self._stream(run, choices, meta, include_usage), run, headers)
            try:
                async for index, message in run.events():
                    choices.add(index, message)
            except GateError as e:
                return error_response(_rename_param(e, chat), headers)
            result = {
                **meta,
                "object": "chat.completion" if chat else "text_completion",
                "choices": choices.whole(),
                "usage": choices.usage_json(run.prompt_tokens),
                "system_fingerprint": None,
            }
            return JSONResponse(result, headers=headers)
        finally:
            watcher.cancel()
            if not handed_over:
                run.cancel()  # no-op when it finished

    async def _stream(
        self, run: flow.Run, choices: _Choices, meta: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[bytes]:
        chat = choices.chat
        base = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
        if chat:
            base["system_fingerprint"] = None
        if include_usage:
            base["usage"] = None
        opened: set[int] = set()
        try:
            async for index, message in run.events():
                choices.add(index, message)
                finish = flow.FINISH_REASONS.get(message.finish_reason)
                if finish not in ("stop", "length"):
                    finish = None
                opening = b""  # a choice's role chunk goes out in one write with its first content (one send)
                if chat and index not in opened:
                    opened.add(index)
                    role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    opening = _sse({**base, "choices": [{**role, "finish_reason": None}]})
                if not (message.text or message.logprobs or finish):
                    if opening:
                        yield opening
                    continue
                choice: dict[str, Any] = {"index": index}
                if chat:
                    choice["delta"] = {"content": message.text} if message.text else {}
                else:
                    choice["text"] = message.text
                choice["logprobs"] = choices.logprobs_json(index, message.logprobs) if message.logprobs else None
                choice["finish_reason"] = finish
                yield opening + _sse({**base, "choices": [choice]})
        except GateError as e:
            yield _sse(error_body(e.message, e.kind, _rename_param(e, chat).param, e.code))
            return
        if include_usage:
            yield _sse({**base, "choices": [], "usage": choices.usage_json(run.prompt_tokens)})
        yield b"data: [DONE]\n\n"

    async def models(self, request: Request) -> dict[str, Any]:
        await self.authenticate(request)
        return {"object": "list", "data": [await self._model_card()]}

    async def _model_card(self) -> dict[str, Any]:
        info = await self.replica.model_info()
        return {
            "id": await self.served_model(),
            "object": "model",
            "created": self.created,
            "owned_by": "meshserve",
            "max_model_len": info.context_length,
        }

    async def model(self, request: Request, model: str) -> dict[str, Any]:
        await self.authenticate(request)
        if model != await self.served_model():
            raise flow.not_found_model(model)
        return await self._model_card()

    async def feedback(self, request: Request) -> dict[str, Any]:
        principal = await self.authenticate(request)
        body = await self.parse(request, FeedbackRequest)
        await asyncio.to_thread(
            self.gate.feedback, principal, ticket_id(body.request_id), body.rating, body.comment, list(body.tags)
        )
        return {"object": "feedback", "request_id": body.request_id, "status": "recorded"}

    async def health(self) -> JSONResponse:
        try:
            load = await self.replica.load()
        except GateError as e:
            return JSONResponse({"status": "unavailable", "detail": e.message}, status_code=503)
        if load.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "replica": self.replica.name})


def create_app(
    replica: Replica,
    gate: Gate,
    *,
    served_model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: GatewayMetrics | None = None,
    fleet: FleetView | None = None,
) -> FastAPI:
    """The OpenAI-compatible API over `replica`, guarded by `gate`. `served_model_name`: the model name clients send
    (None: the replica's own); `max_body_bytes`: larger request bodies get 413; `metrics`: where to count (the
    gateway's, shared with its gRPC front; None: the app's own), served at /metrics; `fleet`: a fleet whose view is
    served at /fleet and /fleet.json and whose registry is added to `metrics`' (None: no fleet view)."""
    metrics = metrics or GatewayMetrics(gate)
    if fleet is not None:
        metrics.registry.register(_Forward(fleet.metrics.registry))
    api = _Api(replica, gate, served_model_name, metrics)
    app = FastAPI(title="meshserve gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api, app.state.metrics = api, metrics

    @app.exception_handler(GateError)
    async def _gate_error(request: Request, error: GateError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message, code = f"Unknown request URL: {request.method} {request.url.path}", "unknown_url"
        elif error.status_code == 405:
            message, code = f"Method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(error.detail), None
        return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception) -> JSONResponse:
        # the path only: headers (the key) and the body never reach a log line
        log.error("%s %s failed: %s", request.method, request.url.path, type(error).__name__, exc_info=error)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.complete(request, chat=False)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return await api.models(request)

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        return await api.model(request, model)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        return await api.feedback(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        return await api.health()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    if fleet is not None:

        @app.get("/fleet")
        async def fleet_page(request: Request) -> HTMLResponse:
            try:
                await api.operator(request)
            except GateError as e:
                sent = request.headers.get("authorization") or request.cookies.get(OPERATOR_COOKIE)
                return sign_in_page(e if sent else None)  # a first visit is no error
            return HTMLResponse(fleet.dashboard_html(), headers=_DASHBOARD_HEADERS)

        @app.post("/fleet")
        async def fleet_sign_in(request: Request) -> Response:
            return await api.sign_in(request)

        @app.get("/fleet.json")
        async def fleet_json(request: Request) -> JSONResponse:
            await api.operator(request)
            return JSONResponse(fleet.snapshot(), headers={"cache-control": "no-store"})

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(HttpMetrics, metrics=metrics)  # outermost: 413s and errors are counted too
    return app
