"""The contract between the gateway's front doors (OpenAI HTTP, gRPC pass-through) and what decides who may do what
(keys, limits, policy, the ledger). The front doors call a `Gate`; they know nothing of the store behind it.

Flow of one request through a front door:
  principal = gate.authenticate(secret, client_address)      -> Principal, or raises GateError(401)
  prepared  = gate.prepare(principal, request)                -> PreparedRequest (policy applied), or GateError(400/403)
  ticket    = gate.admit(principal, prepared)                 -> Ticket (limits reserved), or GateError(429 + retry)
  ... the request runs on a replica ...
  gate.finish(ticket, outcome)                                -> settles the limits, writes the ledger row
`finish` is called exactly once per admitted ticket, also when the client goes away or the replica fails.

The four methods may block (a gate over a database reads it), so the front doors call them in worker threads. A gate
may also offer `authenticate_nowait`, `prepare_nowait`, `admit_nowait` and `finish_nowait`, with the same arguments,
that never block: they answer from memory, or return None, having done nothing, when the answer needs I/O. The front
doors call those on the event loop first (`gateway.flow.gate_call`), which saves a thread hand-off per call.

A gate may also answer `is_operator(principal) -> bool` (and `is_operator_nowait`): whether the caller may open the
operator pages (the fleet dashboard). A gate without it lets only anonymous callers of an open gateway in.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Protocol

REGION_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""What a caller's region may be (whole match): a short token, as a replica's `region` in the fleet's file."""


class GateError(Exception):
    """A refusal the front door turns into an HTTP status / gRPC code. `kind` is OpenAI's error type
    (invalid_request_error, authentication_error, permission_error, rate_limit_exceeded, ...), `param` the field
    at fault, `retry_after` seconds for 429 / RESOURCE_EXHAUSTED. The message never contains a secret."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling: ids only, never the secret."""

    key_id: str  # public id of the key (safe to log)
    user_id: str
    anonymous: bool = False  # keys not required (loopback default): every caller is this principal


@dataclasses.dataclass
class ChatTurn:
    role: str
    content: str


@dataclasses.dataclass
class PreparedRequest:
    """What goes to a replica after policy: either chat `messages` or a raw `prompt` (exactly one is set)."""

    model: str  # the served model's name (aliases resolved)
    messages: list[ChatTurn] | None
    prompt: str | None
    sampling: dict[str, Any]  # meshserve SamplingOptions fields: temperature, top_p, top_k, min_p, seed, max_tokens,
    # stop, ignore_eos, logprobs
    priority: int = (
        0  # the policy's priority class, higher first (the front doors negate it: the engine runs lower first)
    )
    n: int = 1
    quarantined: bool = False  # served under the quarantine persona (never told to the caller)
    log_content: bool = False  # the key's policy opts in to storing prompt and completion text
    client_address: str | None = None
    region: str = ""  # the caller's region, a routing preference ("": the router's own); the front door sets the
    # caller's (`x-meshserve-region`), the policy may pin another (gateway/policy.py); must match REGION_RE


@dataclasses.dataclass
class Ticket:
    """An admitted request: what was reserved against the caller's limits."""

    request_id: str
    principal: Principal
    prepared: PreparedRequest
    reserved_tokens: int
    started: float  # time.time() at admission
    handle: Any = None  # the gate's own bookkeeping


@dataclasses.dataclass
class Outcome:
    """What happened, for settling limits and the ledger (one per ticket; with n > 1, the sums over choices)."""

    replica: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float = 0.0
    ttft_seconds: float = 0.0
    total_seconds: float = 0.0
    device_seconds: float = 0.0
    finish_reason: str = ""  # stop, length, cancelled, error
    error: str | None = None
    prompt_text: str | None = None  # only kept when prepared.log_content
    completion_text: str | None = None
    device_seconds_by_replica: dict[str, float] | None = None
    """Each replica's share of `device_seconds` when several served the request (a router's failover path "a>b", or
    choices routed to different replicas), so each share is priced at its own replica; None: all on `replica`."""


class Gate(Protocol):
    def authenticate(self, secret: str | None, client_address: str | None) -> Principal: ...

    def prepare(self, principal: Principal, request: PreparedRequest) -> PreparedRequest: ...

    def admit(self, principal: Principal, prepared: PreparedRequest, prompt_tokens: int) -> Ticket: ...

    def finish(self, ticket: Ticket, outcome: Outcome) -> None: ...

    def feedback(
        self, principal: Principal, request_id: str, rating: int | str | bool, comment: str | None, tags: list[str]
    ) -> None: ...
