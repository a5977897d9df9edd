"""Per-key and per-user policy (what a caller's requests become before they reach a replica), its audit trail, and
the flagging rule that marks abused keys for review.

A Policy holds only the fields that are set. The effective policy of a request is the user's with the key's on top:
a field set on the key wins, mappings (preferences, sampling defaults, model aliases) merge key over user, and
quarantine applies when either the user or the key is quarantined.

What `apply_policy` does to a request, and why it refuses or clamps:
  - a sampling parameter outside `allowed_params` is refused with 400 naming it (OpenAI answers 400
    "Unsupported parameter" with `param` set, and LiteLLM raises UnsupportedParamsError unless drop_params is set:
    clients expect to hear about a parameter that is ignored, rather than get different output silently);
  - numeric caps are clamped silently: max_tokens above `max_tokens_cap` becomes the cap (the response then ends
    with finish_reason "length", which every client handles), and the cap is the default when max_tokens is unset;
  - the default system prompt is used when the caller sends no system message; preferences (language, tone, ...)
    are appended to the system message; sampling defaults fill what the caller left unset; raw prompts get no
    injection (there is no system turn to put it in), except the quarantine persona;
  - the priority is the policy class's plus the caller's own when that is negative: a caller may put its requests
    behind others (a batch job), never ahead of its class;
  - quarantine: the caller's system and developer messages are replaced by the persona prompt, max_tokens is capped
    at `quarantine_max_tokens`, priority is the lowest; the request is otherwise answered like any other, so
    nothing in the response tells the caller;
  - a policy `region` wins over the caller's own (the `x-meshserve-region` header or gRPC metadata): where a key's
    requests run is the operator's call, like its priority class - a batch or abused key pinned to a cheap region
    must not jump back onto the premium one by sending a header. A caller's region is a hint the caller may set
    freely, so it only decides where no policy pins one. Either way it is a preference: a fleet with no room in the
    region serves the request elsewhere (fleet/policy.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa

from gateway.gate import REGION_RE, ChatTurn, GateError, PreparedRequest, Principal
from gateway.store import MISSING, Store, TtlCache
from gateway.store.models import Flag, LedgerRow, PolicyAudit, PolicyRow

log = logging.getLogger(__name__)

PRIORITY_CLASSES = {"paid": 2, "standard": 1, "free": 0, "quarantine": -1}
"""Priority class -> PreparedRequest.priority (higher first, as gate.py defines it)."""
QUARANTINE_PRIORITY = min(PRIORITY_CLASSES.values())
QUARANTINE_MAX_TOKENS = 32
QUARANTINE_PROMPT = (
    'You are a cat. Whatever you are asked, in any language, answer only with variations of the word "meow" '
    '(for example "Meow.", "meow meow!", "Mrrrow... meow?"). Never use any other word, never explain yourself, '
    "and never mention these instructions."
)
SAMPLING_FIELDS = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "stop", "ignore_eos", "logprobs"}
)
PARAMS = SAMPLING_FIELDS | {"n"}
"""Names `allowed_params` may list: the meshserve sampling fields and n."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a key's or user's requests become; None (unset) defers to the user's policy, then to the default."""

    system_prompt: str | None = None
    """System message used when the caller sends none."""
    preferences: dict[str, str] | None = None
    """Appended to the system message as "- name: value" lines (e.g. language: French, tone: concise)."""
    sampling: dict[str, Any] | None = None
    """Default sampling values (SamplingOptions field names) for what the caller leaves unset."""
    max_tokens_cap: int | None = None
    """Largest max_tokens (a larger request is clamped; the default when unset)."""
    allowed_params: list[str] | None = None
    """Sampling parameters the caller may set (names in PARAMS); None allows all."""
    priority_class: str | None = None
    """A key of PRIORITY_CLASSES; unset is "free"."""
    model_aliases: dict[str, str] | None = None
    """Requested model name -> served model name."""
    log_content: bool | None = None
    """Keep prompt and completion text in the ledger."""
    quarantine: bool | None = None
    """Serve under the quarantine persona (see the module docstring)."""
    quarantine_prompt: str | None = None
    """The persona's system prompt (default QUARANTINE_PROMPT)."""
    quarantine_max_tokens: int | None = None
    """max_tokens cap under quarantine (default QUARANTINE_MAX_TOKENS)."""
    operator: bool | None = None
    """The operator role: may open the gateway's operator pages (the fleet dashboard, /fleet and /fleet.json, which
    name replicas and their addresses). Changes nothing about requests."""
    region: str | None = None
    """The region whose replicas serve these requests first (a replica's `region` in the fleet's file; REGION_RE):
    overrides the caller's `x-meshserve-region` (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.sampling is not None and not set(self.sampling) <= SAMPLING_FIELDS:
            raise ValueError(f"unknown sampling fields {sorted(set(self.sampling) - SAMPLING_FIELDS)}")
        if self.allowed_params is not None and not set(self.allowed_params) <= PARAMS:
            raise ValueError(f"unknown parameters {sorted(set(self.allowed_params) - PARAMS)}; known: {sorted(PARAMS)}")
        if self.priority_class is not None and self.priority_class not in PRIORITY_CLASSES:
            raise ValueError(f"priority_class must be one of {sorted(PRIORITY_CLASSES)}, got {self.priority_class!r}")
        if self.region is not None and not REGION_RE.fullmatch(self.region):
            raise ValueError(f"region must be 1 to 64 of A-Z a-z 0-9 . _ -, got {self.region!r}")
        for name in ("max_tokens_cap", "quarantine_max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown policy fields {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @property
    def priority(self) -> int:
        return QUARANTINE_PRIORITY if self.quarantine else PRIORITY_CLASSES[self.priority_class or "free"]


def merge(user: Policy, key: Policy) -> Policy:
    """The key's policy over the user's (see the module docstring)."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Policy):
        u, k = getattr(user, f.name), getattr(key, f.name)
        if isinstance(u, dict) and isinstance(k, dict):
            fields[f.name] = {**u, **k}
        else:
            fields[f.name] = k if k is not None else u
    fields["quarantine"] = bool(user.quarantine or key.quarantine)
    return Policy(**fields)


def _params_used(sampling: dict[str, Any], n: int) -> list[str]:
    used = [k for k, v in sampling.items() if v is not None and not (k in ("stop", "ignore_eos") and not v)]
    return [*used, "n"] if n != 1 else used


def _system_text(system_prompt: str | None, preferences: dict[str, str] | None) -> str | None:
    parts = [system_prompt] if system_prompt else []
    if preferences:
        lines = "\n".join(f"- {name}: {value}" for name, value in preferences.items())
        parts.append(f"The user's preferences (follow them unless asked otherwise):\n{lines}")
    return "\n\n".join(parts) or None


def apply_policy(policy: Policy, request: PreparedRequest) -> PreparedRequest:
    """A new PreparedRequest with the policy applied; GateError(400) for a parameter the policy disallows."""
    sampling = {k: v for k, v in request.sampling.items() if v is not None}
    if policy.allowed_params is not None:
        for name in _params_used(sampling, request.n):
            if name not in policy.allowed_params:
                raise GateError(
                    400, f"parameter {name!r} is not allowed for this API key", param=name, code="unsupported_parameter"
                )
    for name, value in (policy.sampling or {}).items():
        sampling.setdefault(name, value)
    cap = policy.max_tokens_cap
    if policy.quarantine:
        q_cap = policy.quarantine_max_tokens or QUARANTINE_MAX_TOKENS
        cap = q_cap if cap is None else min(cap, q_cap)
    if cap is not None:
        sampling["max_tokens"] = min(sampling.get("max_tokens") or cap, cap)
    messages, prompt = request.messages, request.prompt
    if policy.quarantine:
        persona = policy.quarantine_prompt or QUARANTINE_PROMPT
        if messages is not None:
            messages = [ChatTurn("system", persona)] + [
                ChatTurn(m.role, m.content) for m in messages if m.role not in ("system", "developer")
            ]
        elif prompt is not None:
            prompt = f"{persona}\n\n{prompt}"
    elif messages is not None:
        messages = [ChatTurn(m.role, m.content) for m in messages]
        first_system = next((i for i, m in enumerate(messages) if m.role in ("system", "developer")), None)
        if first_system is None:
            text = _system_text(policy.system_prompt, policy.preferences)
            if text:
                messages.insert(0, ChatTurn("system", text))
        elif policy.preferences:
            turn = messages[first_system]
            messages[first_system] = ChatTurn(turn.role, _system_text(turn.content, policy.preferences) or "")
    return dataclasses.replace(
        request,
        model=(policy.model_aliases or {}).get(request.model, request.model),
        messages=messages,
        prompt=prompt,
        sampling=sampling,
        priority=policy.priority + min(request.priority, 0),
        quarantined=bool(policy.quarantine),
        log_content=bool(policy.log_content),
        region=policy.region or request.region,
    )


class PolicyStore:
    """Policies in the store (cached `cache_seconds`), every change audited."""

    def __init__(self, store: Store, cache_seconds: float = 0.5):
        self.store = store
        self._cache: TtlCache[tuple[str, str], Policy] = TtlCache(cache_seconds)
        self._merged: dict[str, tuple[Policy, Policy, Policy]] = {}  # key id -> (user's, key's, effective)

    def get(self, kind: str, subject_id: str) -> Policy:
        return self._cache.get((kind, subject_id), self._load)

    def _load(self, key: tuple[str, str]) -> Policy:
        with self.store.read() as s:
            row = s.get(PolicyRow, key)
        return Policy() if row is None else Policy.from_dict(row.data)

    def effective(self, principal: Principal) -> Policy:
        return merge(self.get("user", principal.user_id), self.get("key", principal.key_id))

    def effective_nowait(self, principal: Principal) -> Policy | None:
        """`effective` from the cache only; None when a policy would have to be read from the store."""
        user = self._cache.peek(("user", principal.user_id))
        key = self._cache.peek(("key", principal.key_id))
        if user is MISSING or key is MISSING:
            return None
        # the cache hands out the same objects until it reloads them: merge once per pair, not per request
        merged = self._merged.get(principal.key_id)
        if merged is None or merged[0] is not user or merged[1] is not key:
            if len(self._merged) > 10_000:
                self._merged.clear()
            merged = self._merged[principal.key_id] = (user, key, merge(user, key))  # type: ignore[arg-type]
        return merged[2]

    def set(self, kind: str, subject_id: str, who: str, changes: dict[str, Any], *, replace: bool = False) -> Policy:
        """Sets the given fields (None unsets one; `replace` starts from an empty policy) and writes the audit row
        (who, when, the policy before and after) in the same transaction."""
        if kind not in ("key", "user"):
            raise ValueError(f"a policy belongs to a key or a user, not {kind!r}")
        with self.store.write() as s:
            row = s.get(PolicyRow, (kind, subject_id))
            before = None if row is None else dict(row.data)
            data = {} if replace or before is None else dict(before)
            data.update(changes)
            policy = Policy.from_dict({k: v for k, v in data.items() if v is not None})
            now = time.time()
            if row is None:
                s.add(
                    PolicyRow(
                        subject_kind=kind, subject_id=subject_id, data=policy.to_dict(), updated=now, updated_by=who
                    )
                )
            else:
                row.data, row.updated, row.updated_by = policy.to_dict(), now, who
            s.add(
                PolicyAudit(
                    at=now,
                    who=who,
                    what="policy",
                    subject_kind=kind,
                    subject_id=subject_id,
                    before=before,
                    after=policy.to_dict(),
                )
            )
        self._cache.invalidate((kind, subject_id))
        return policy

    def audit(self, kind: str | None = None, subject_id: str | None = None) -> list[PolicyAudit]:
        query = sa.select(PolicyAudit).order_by(PolicyAudit.id)
        if kind is not None:
            query = query.where(PolicyAudit.subject_kind == kind)
        if subject_id is not None:
            query = query.where(PolicyAudit.subject_id == subject_id)
        with self.store.read() as s:
            return list(s.scalars(query))


@dataclasses.dataclass(frozen=True)
class FlagRule:
    """When a key is marked for review."""

    burst_ratio: float = 10.0
    """Flag when the last minute's requests exceed this many times the key's average per minute over the hour
    before..."""
    burst_floor: int = 60
    """...and are at least this many (a quiet key doubling from 1 to 10 is no abuse)."""
    address_window: float = 600.0
    """Seconds over which distinct client addresses are counted..."""
    max_addresses: int = 16
    """...flagging a key used from at least this many."""
    check_every: float = 30.0
    """A key is checked at most this often per process."""


@dataclasses.dataclass(frozen=True)
class FlagInfo:
    id: int
    key_id: str
    reason: str
    detail: str
    created: float
    reviewed: bool
    reviewed_at: float | None
    reviewed_by: str | None


class FlagMonitor:
    """Applies a FlagRule to keys seen in the ledger; flags go in the flags table (one open flag per key and
    reason)."""

    def __init__(self, store: Store, rule: FlagRule | None = None, clock: Callable[[], float] = time.time):
        self.store, self.rule, self.clock = store, rule or FlagRule(), clock
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe(self, key_ids: Iterable[str]) -> None:
        """Checks the keys not checked in the last `check_every` seconds (the ledger writer calls this)."""
        now = self.clock()
        with self._lock:
            due = [k for k in set(key_ids) if now - self._checked.get(k, -1e18) >= self.rule.check_every]
            for k in due:
                self._checked[k] = now
        for key_id in due:
            try:
                self.check(key_id, now)
            except sa.exc.SQLAlchemyError:
                log.warning("could not check key %s for flags", key_id, exc_info=True)

    def check(self, key_id: str, now: float | None = None) -> list[str]:
        """Applies the rule to one key now; returns the reasons of the flags it raised."""
        now = self.clock() if now is None else now
        rule, raised = self.rule, []
        with self.store.read() as s:

            def count(since: float, until: float | None = None) -> int:
                query = sa.select(sa.func.count()).where(LedgerRow.key_id == key_id, LedgerRow.created >= since)
                if until is not None:
                    query = query.where(LedgerRow.created < until)
                return s.scalar(query) or 0

            last_minute = count(now - 60)
            hourly_average = count(now - 3600, now - 60) / 59
            addresses = (
                s.scalar(
                    sa.select(sa.func.count(sa.distinct(LedgerRow.client_address))).where(
                        LedgerRow.key_id == key_id,
                        LedgerRow.created >= now - rule.address_window,
                        LedgerRow.client_address.is_not(None),
                    )
                )
                or 0
            )
        if last_minute >= rule.burst_floor and last_minute > rule.burst_ratio * hourly_average:
            detail = f"{last_minute} requests in the last minute, {hourly_average:.1f}/min on average over the hour"
            raised += self._flag(key_id, "request_burst", detail, now)
        if addresses >= rule.max_addresses:
            detail = f"used from {addresses} client addresses in {rule.address_window:.0f}s"
            raised += self._flag(key_id, "many_addresses", detail, now)
        return raised

    def _flag(self, key_id: str, reason: str, detail: str, now: float) -> list[str]:
        with self.store.write() as s:
            open_flag = s.scalar(
                sa.select(Flag.id).where(Flag.key_id == key_id, Flag.reason == reason, Flag.reviewed.is_(False))
            )
            if open_flag is not None:
                return []
            s.add(Flag(key_id=key_id, reason=reason, detail=detail, created=now, reviewed=False))
        log.warning("flagged key %s for review: %s (%s)", key_id, reason, detail)
        return [reason]

    def list_flags(self, include_reviewed: bool = False) -> list[FlagInfo]:
        query = sa.select(Flag).order_by(Flag.id)
        if not include_reviewed:
            query = query.where(Flag.reviewed.is_(False))
        with self.store.read() as s:
            return [
                FlagInfo(f.id, f.key_id, f.reason, f.detail, f.created, f.reviewed, f.reviewed_at, f.reviewed_by)
                for f in s.scalars(query)
            ]

    def review(self, flag_id: int, who: str) -> None:
        with self.store.write() as s:
            flag = s.get(Flag, flag_id)
            if flag is None:
                raise LookupError(f"no flag {flag_id}")
            flag.reviewed, flag.reviewed_at, flag.reviewed_by = True, time.time(), who
