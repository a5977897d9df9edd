"""`StoreGate`: the Gate of gateway/gate.py over the shared store (keys, policy, limits, ledger, feedback, flags).

Several gateway processes may run StoreGates on one database: keys, policies and limits are re-read at most every
`cache_seconds` (a revoked key fails everywhere within a second), limits are spent from leases each process takes
from the database in batches (gateway/limits.py: never over a limit together, under it by a stated bound), and the
ledger is the one table every process appends to (in batches, off the request path).

With warm caches and leases a request needs no I/O: the `*_nowait` methods answer on the event loop and return None
(having changed nothing) only when the store must be read or written, for which the front doors fall back to the
blocking methods in a worker thread (gateway/gate.py).
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import logging
import threading
import time
import urllib.parse
import uuid
from typing import Any

import sqlalchemy as sa

from gateway.gate import GateError, Outcome, PreparedRequest, Principal, Ticket
from gateway.keys import PREFIX, KeyStore, parse_secret
from gateway.ledger import Entry, Ledger, Prices
from gateway.limits import Limiter, Reservation
from gateway.policy import FlagMonitor, FlagRule, PolicyStore, apply_policy
from gateway.store import MISSING, Store
from gateway.store.models import Feedback, LedgerRow

log = logging.getLogger(__name__)

ANONYMOUS = Principal(key_id="anonymous", user_id="anonymous", anonymous=True)
"""Every caller when keys are not required and none is sent (limits and policy may name "anonymous")."""
MAX_COMMENT_CHARS = 4000
MAX_TAGS, MAX_TAG_CHARS = 16, 64
_RATINGS = {"up": 5, "thumbs_up": 5, "down": 1, "thumbs_down": 1}


def parse_rating(value: Any) -> int:
    """A feedback rating as StoreGate.feedback takes it: 1..5 stars, with thumbs up = 5 and thumbs down = 1 (one
    scale, so averages mean something); accepts "up" / "down", true / false, 1..5 and their strings."""
    if isinstance(value, bool):
        return 5 if value else 1
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _RATINGS:
            return _RATINGS[text]
        if text.isdigit():
            value = int(text)
    if isinstance(value, int) and 1 <= value <= 5:
        return value
    raise GateError(400, 'rating must be "up", "down" or an integer from 1 to 5', param="rating")


def is_loopback(address: str | None) -> bool:
    """Whether a client address (plain IP, host:port, [v6]:port, or a gRPC peer such as "ipv4:127.0.0.1:5000",
    "ipv6:%5B::1%5D:5000", "unix:/path") is this machine. None (an in-process caller) counts as loopback."""
    if address is None:
        return True
    text = urllib.parse.unquote(address.strip())
    if text.startswith("unix:") or text == "localhost":
        return True
    text = text.removeprefix("ipv4:").removeprefix("ipv6:")
    if text.startswith("["):
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@dataclasses.dataclass
class _Handle:
    reservation: Reservation
    finished: bool = False


class StoreGate:
    """The Gate over a Store (see gateway/gate.py for the flow)."""

    def __init__(
        self,
        store: Store,
        *,
        keys_required: bool = True,
        prices: Prices | None = None,
        flag_rule: FlagRule | None = None,
        default_max_tokens: int = 256,
        cache_seconds: float = 0.5,
        lease_seconds: float = 900.0,
        migrate: bool = True,
        ledger: Ledger | None = None,
    ):
        """`default_max_tokens`: what a request without max_tokens reserves (the engine's own default is at most
        256). `lease_seconds`: a stream not finished within this is assumed lost (its gateway died) and stops
        counting against concurrent_streams."""
        if migrate:
            store.migrate()
        self.store, self.keys_required, self.default_max_tokens = store, keys_required, default_max_tokens
        self.keys = KeyStore(store, cache_seconds)
        self.policies = PolicyStore(store, cache_seconds)
        self.limiter = Limiter(store, cache_seconds=cache_seconds, lease_seconds=lease_seconds)
        self.flags = FlagMonitor(store, flag_rule)
        self.ledger = ledger or Ledger(store, prices, on_write=self._observe)
        self._lock = threading.Lock()
        self._recent: collections.OrderedDict[str, str] = collections.OrderedDict()  # request id -> key id

    def _observe(self, entries: list[Entry]) -> None:
        self.flags.observe(e.key_id for e in entries if e.key_id != ANONYMOUS.key_id)

    def authenticate(self, secret: str | None, client_address: str | None) -> Principal:
        principal = self._authenticate(secret, client_address, blocking=True)
        assert principal is not None
        return principal

    def authenticate_nowait(self, secret: str | None, client_address: str | None) -> Principal | None:
        """`authenticate` from memory only (see gateway/gate.py): None when the key must be read or touched."""
        return self._authenticate(secret, client_address, blocking=False)

    def _authenticate(self, secret: str | None, client_address: str | None, *, blocking: bool) -> Principal | None:
        secret = (secret or "").strip()
        if secret[:7].lower() == "bearer ":
            secret = secret[7:].strip()
        if parse_secret(secret) is None:
            if not self.keys_required and not secret.startswith(f"{PREFIX}-") and is_loopback(client_address):
                return ANONYMOUS  # placeholders such as "EMPTY" or "sk-no-key" included; a mistyped key is not
            if not secret:
                raise GateError(
                    401, "missing API key: send it as 'Authorization: Bearer <key>'", kind="authentication_error"
                )
            raise GateError(401, "invalid API key", kind="authentication_error", code="invalid_api_key")
        record = self.keys.verify(secret, blocking=blocking)
        if record is MISSING:
            return None
        if record is None or record.revoked:
            raise GateError(401, "invalid API key", kind="authentication_error", code="invalid_api_key")
        if record.user_disabled:
            raise GateError(403, "the account of this API key is disabled", kind="permission_error")
        if blocking:
            self.keys.touch(record.id)
        elif self.keys.touch_due(record.id):
            return None
        return Principal(key_id=record.id, user_id=record.user_id)

    def prepare(self, principal: Principal, request: PreparedRequest) -> PreparedRequest:
        return apply_policy(self.policies.effective(principal), request)

    def prepare_nowait(self, principal: Principal, request: PreparedRequest) -> PreparedRequest | None:
        policy = self.policies.effective_nowait(principal)
        return None if policy is None else apply_policy(policy, request)

    def is_operator(self, principal: Principal) -> bool:
        """Whether the caller may open the operator pages: a key whose effective policy (key over user) has the
        `operator` role, or the anonymous caller of a gateway that does not require keys (only a loopback client
        without a key is anonymous: the same trust as the open gate)."""
        if principal.anonymous:
            return not self.keys_required
        return bool(self.policies.effective(principal).operator)

    def is_operator_nowait(self, principal: Principal) -> bool | None:
        if principal.anonymous:
            return not self.keys_required
        policy = self.policies.effective_nowait(principal)
        return None if policy is None else bool(policy.operator)

    def admit(self, principal: Principal, prepared: PreparedRequest, prompt_tokens: int) -> Ticket:
        ticket = self._admit(principal, prepared, prompt_tokens, blocking=True)
        assert ticket is not None
        return ticket

    def admit_nowait(self, principal: Principal, prepared: PreparedRequest, prompt_tokens: int) -> Ticket | None:
        """`admit` from this process's limit leases only: None, with nothing reserved, when it needs the store."""
        return self._admit(principal, prepared, prompt_tokens, blocking=False)

    def _admit(
        self, principal: Principal, prepared: PreparedRequest, prompt_tokens: int, *, blocking: bool
    ) -> Ticket | None:
        request_id = uuid.uuid4().hex
        max_tokens = prepared.sampling.get("max_tokens") or self.default_max_tokens
        reserved = prompt_tokens + max(prepared.n, 1) * max_tokens
        subjects = [("key", principal.key_id), ("user", principal.user_id)]
        if blocking:
            reservation = self.limiter.admit(subjects, request_id, reserved)
        else:
            reservation = self.limiter.admit_nowait(subjects, request_id, reserved)
            if reservation is None:
                return None
        return Ticket(request_id, principal, prepared, reserved, time.time(), handle=_Handle(reservation))

    def finish(self, ticket: Ticket, outcome: Outcome) -> None:
        """Settles the limits and queues the ledger row; never raises (the response is already on its way)."""
        self._finish(ticket, outcome, blocking=True)

    def finish_nowait(self, ticket: Ticket, outcome: Outcome) -> bool | None:
        """`finish` without waiting for a lock another thread may hold while it reads the store: True when done,
        None (nothing done) when `finish` must run in a worker thread."""
        return True if self._finish(ticket, outcome, blocking=False) else None

    def _finish(self, ticket: Ticket, outcome: Outcome, *, blocking: bool) -> bool:
        handle: _Handle = ticket.handle
        with self._lock:
            if handle.finished:
                log.warning("finish called twice for request %s", ticket.request_id)
                return True
        try:
            tokens = outcome.prompt_tokens + outcome.completion_tokens
            if not self.limiter.settle(handle.reservation, tokens, blocking=blocking):
                return False
        except Exception:
            log.exception("could not settle the limits of request %s", ticket.request_id)
        with self._lock:
            if handle.finished:  # a concurrent finish got here first
                return True
            handle.finished = True
        prepared, principal = ticket.prepared, ticket.principal
        entry = Entry(
            request_id=ticket.request_id,
            created=ticket.started,
            key_id=principal.key_id,
            user_id=principal.user_id,
            model=prepared.model,
            replica=outcome.replica,
            client_address=prepared.client_address,
            prompt_tokens=outcome.prompt_tokens,
            cached_tokens=outcome.cached_tokens,
            completion_tokens=outcome.completion_tokens,
            queue_seconds=outcome.queue_seconds,
            ttft_seconds=outcome.ttft_seconds,
            total_seconds=outcome.total_seconds,
            finish_reason=outcome.finish_reason,
            error=outcome.error,
            device_seconds=outcome.device_seconds,
            device_seconds_by_replica=outcome.device_seconds_by_replica,
            quarantined=prepared.quarantined,
            prompt_text=outcome.prompt_text if prepared.log_content else None,
            completion_text=outcome.completion_text if prepared.log_content else None,
        )
        try:
            self.ledger.record(entry)
        except Exception:
            log.exception("could not record request %s in the ledger", ticket.request_id)
        with self._lock:
            self._recent[ticket.request_id] = principal.key_id
            while len(self._recent) > 10_000:
                self._recent.popitem(last=False)
        return True

    def feedback(
        self, principal: Principal, request_id: str, rating: int, comment: str | None, tags: list[str]
    ) -> None:
        """Stores a rating (1..5, see parse_rating) of a finished request. Only the key that made the request may
        rate it; any other caller gets 404, the same as for an unknown id, so ids of others are not confirmed."""
        rating = parse_rating(rating)
        if comment is not None and len(comment) > MAX_COMMENT_CHARS:
            raise GateError(400, f"comment longer than {MAX_COMMENT_CHARS} characters", param="comment")
        if len(tags) > MAX_TAGS or any(not isinstance(t, str) or len(t) > MAX_TAG_CHARS for t in tags):
            raise GateError(400, f"at most {MAX_TAGS} tags of at most {MAX_TAG_CHARS} characters", param="tags")
        with self._lock:
            owner = self._recent.get(request_id)
        if owner is None:
            with self.store.read() as s:
                owner = s.scalar(sa.select(LedgerRow.key_id).where(LedgerRow.request_id == request_id))
        if owner is None or owner != principal.key_id:
            raise GateError(404, f"no request with id {request_id[:64]!r}", code="request_not_found")
        with self.store.write() as s:
            s.add(
                Feedback(
                    request_id=request_id,
                    key_id=principal.key_id,
                    rating=rating,
                    comment=comment,
                    tags=list(tags),
                    created=time.time(),
                )
            )

    def close(self) -> None:
        """Gives back this process's limit leases and writes the rest of the ledger; the Store stays open (its owner
        closes it)."""
        self.limiter.close()
        self.ledger.close()
