"""The gateway's tables as typed SQLAlchemy models. Times are float seconds since the epoch (UTC), the same in
SQLite and PostgreSQL and cheap to window; `ledger.day` is the UTC date so usage groups by day without date math in
SQL. A schema change here needs a new alembic version under gateway/store/migrations/versions/."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created: Mapped[float] = mapped_column(Float)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiKey(Base):
    """One API key. The secret itself is never stored: `hash` is HMAC-SHA256(salt, secret) in hex."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the public id inside the secret
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    salt: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(128))
    created: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, default=None)
    last_used: Mapped[float | None] = mapped_column(Float, default=None)


class PolicyRow(Base):
    """A policy for one subject: subject_kind is "key" or "user"; `data` holds only the fields that are set."""

    __tablename__ = "policies"

    subject_kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(200))


class PolicyAudit(Base):
    """Every change of a policy or of limits: who, when, which subject, the value before and after."""

    __tablename__ = "policy_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    who: Mapped[str] = mapped_column(String(200))
    what: Mapped[str] = mapped_column(String(16))  # "policy" or "limits"
    subject_kind: Mapped[str] = mapped_column(String(8))
    subject_id: Mapped[str] = mapped_column(String(200))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class LimitsRow(Base):
    """Configured limits of one subject ("key" or "user"); NULL means unlimited."""

    __tablename__ = "limits"

    subject_kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    requests_per_minute: Mapped[int | None] = mapped_column(BigInteger, default=None)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger, default=None)
    concurrent_streams: Mapped[int | None] = mapped_column(BigInteger, default=None)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger, default=None)
    tokens_per_month: Mapped[int | None] = mapped_column(BigInteger, default=None)
    updated: Mapped[float] = mapped_column(Float)


class Counter(Base):
    """Usage of one limit of one subject in one window (window_start: epoch seconds; 0 for stream counts).
    Admission increments with a conditional UPDATE, so concurrent gateways never pass a limit together."""

    __tablename__ = "limit_counters"

    subject: Mapped[str] = mapped_column(String(220), primary_key=True)  # "key:<id>" or "user:<id>"
    limit_name: Mapped[str] = mapped_column(String(32), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    used: Mapped[int] = mapped_column(BigInteger, default=0)


class StreamLease(Base):
    """One open stream counted against a subject's concurrent_streams; a lease left by a crashed gateway expires
    and is reaped (and its count given back) at the subject's next admission."""

    __tablename__ = "stream_leases"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(220), primary_key=True)
    expires: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_stream_leases_subject_expires", "subject", "expires"),)


class LedgerRow(Base):
    """One finished request: who, where, how many tokens, how long, what it cost."""

    __tablename__ = "ledger"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created: Mapped[float] = mapped_column(Float)  # admission time
    day: Mapped[str] = mapped_column(String(10))  # UTC date of `created`, YYYY-MM-DD
    key_id: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    replica: Mapped[str] = mapped_column(String(200))
    client_address: Mapped[str | None] = mapped_column(String(200), default=None)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    queue_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    ttft_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    total_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    finish_reason: Mapped[str] = mapped_column(String(32), default="")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    device_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    cost_device: Mapped[float] = mapped_column(Float, default=0.0)  # device_seconds x chips x $/chip-hour / 3600
    cost_tokens: Mapped[float] = mapped_column(Float, default=0.0)  # tokens x $ per 1M tokens
    quarantined: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt_text: Mapped[str | None] = mapped_column(Text, default=None)  # only when the policy opts in
    completion_text: Mapped[str | None] = mapped_column(Text, default=None)
    # a request several replicas served (a fleet's failover path, choices routed apart): {replica: device-seconds}
    # and {replica: its cost}, summing to device_seconds and cost_device; NULL when `replica` served all of it
    device_seconds_by_replica: Mapped[dict[str, float] | None] = mapped_column(JSON(none_as_null=True), default=None)
    cost_device_by_replica: Mapped[dict[str, float] | None] = mapped_column(JSON(none_as_null=True), default=None)

    __table_args__ = (
        Index("ix_ledger_key_created", "key_id", "created"),
        Index("ix_ledger_user_day", "user_id", "day"),
        Index("ix_ledger_day", "day"),
    )


class Feedback(Base):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    rating: Mapped[int] = mapped_column(Integer)  # 1..5 (thumbs: down 1, up 5)
    comment: Mapped[str | None] = mapped_column(Text, default=None)
    tags: Mapped[list[str]] = mapped_column(JSON)
    created: Mapped[float] = mapped_column(Float)


class Flag(Base):
    """A key marked for review by the flagging rule (reason: "request_burst" or "many_addresses")."""

    __tablename__ = "flags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    reason: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[float] = mapped_column(Float)
    reviewed: Mapped[bool] = mapped_column(Boolean, default=False)
    reviewed_at: Mapped[float | None] = mapped_column(Float, default=None)
    reviewed_by: Mapped[str | None] = mapped_column(String(200), default=None)
