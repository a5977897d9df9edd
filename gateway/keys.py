"""Users and API keys. A secret reads `msk-<public id>-<43 random urlsafe chars>` (256 bits); the store keeps only
the public id, a per-key salt and HMAC-SHA256(salt, secret).

Why HMAC-SHA256 and not scrypt/argon2: slow, memory-hard hashes exist to make guessing *low-entropy passwords* from a
stolen hash expensive. These secrets are 256 random bits, so a stolen hash cannot be reversed by guessing however fast
the hash is, while a deliberately slow hash would cost every authentication tens of milliseconds of CPU (and hand an
attacker a cheap way to burn it with junk keys). The per-key salt keeps equal secrets from sharing a hash and rules
out precomputed tables; the comparison is constant-time (`hmac.compare_digest`).

The secret is returned once, by `create_key` / `rotate_key`, in `NewKey.secret`, which no repr, log line or error
message contains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import re
import secrets
import time

import sqlalchemy as sa

from gateway.store import MISSING, Store, TtlCache
from gateway.store.models import ApiKey, User

log = logging.getLogger(__name__)

PREFIX = "msk"
_PUBLIC_ID = re.compile(r"[0-9a-f]{12}")
_SECRET_PART = re.compile(r"[A-Za-z0-9_-]{32,128}")
CACHE_SECONDS = 0.5
"""How long a process trusts what it read about a key: a revocation fails everywhere within this."""
LAST_USED_EVERY = 60.0
"""A key's last_used is written at most this often per process (not on every request)."""


class NotFoundError(LookupError):
    """An unknown user or key id in an admin operation."""


@dataclasses.dataclass(frozen=True)
class UserInfo:
    id: str
    name: str
    created: float
    disabled: bool


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never the secret, salt or hash."""

    id: str
    user_id: str
    name: str
    created: float
    revoked_at: float | None
    last_used: float | None


@dataclasses.dataclass(frozen=True)
class NewKey:
    """A key just created or rotated; `secret` is shown to the caller once and kept nowhere."""

    info: KeyInfo
    secret: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """What authentication needs about one key (cached for CACHE_SECONDS)."""

    id: str
    user_id: str
    salt: str
    hash: str
    revoked: bool
    user_disabled: bool


def parse_secret(secret: str) -> tuple[str, str] | None:
    """(public id, secret) of a well-formed key, else None."""
    parts = secret.strip().split("-", 2)
    if len(parts) != 3 or parts[0] != PREFIX:
        return None
    public_id, rest = parts[1], parts[2]
    if not _PUBLIC_ID.fullmatch(public_id) or not _SECRET_PART.fullmatch(rest):
        return None
    return public_id, rest


def hash_secret(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


def _new_secret(public_id: str) -> tuple[str, str, str]:
    """(full secret, salt, hash) of a fresh key."""
    secret = f"{PREFIX}-{public_id}-{secrets.token_urlsafe(32)}"
    salt = secrets.token_hex(16)
    return secret, salt, hash_secret(salt, secret)


def _key_info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.user_id, row.name, row.created, row.revoked_at, row.last_used)


def _user_info(row: User) -> UserInfo:
    return UserInfo(row.id, row.name, row.created, row.disabled)


class KeyStore:
    """Users and keys in a Store, with a short-lived per-process cache for authentication."""

    def __init__(self, store: Store, cache_seconds: float = CACHE_SECONDS):
        self.store = store
        self._cache: TtlCache[str, KeyRecord | None] = TtlCache(cache_seconds)
        self._touched: dict[str, float] = {}

    # --- users ---

    def create_user(self, name: str) -> UserInfo:
        name = name.strip()
        if not name:
            raise ValueError("a user needs a name")
        with self.store.write() as s:
            if s.scalar(sa.select(User.id).where(User.name == name)) is not None:
                raise ValueError(f"a user named {name!r} exists")
            row = User(id="u" + secrets.token_hex(6), name=name, created=time.time(), disabled=False)
            s.add(row)
        return _user_info(row)

    def list_users(self) -> list[UserInfo]:
        with self.store.read() as s:
            return [_user_info(u) for u in s.scalars(sa.select(User).order_by(User.created))]

    def get_user(self, id_or_name: str) -> UserInfo:
        with self.store.read() as s:
            row = s.scalar(sa.select(User).where(sa.or_(User.id == id_or_name, User.name == id_or_name)))
        if row is None:
            raise NotFoundError(f"no user {id_or_name!r}")
        return _user_info(row)

    def set_user_disabled(self, id_or_name: str, disabled: bool = True) -> UserInfo:
        user = self.get_user(id_or_name)
        with self.store.write() as s:
            s.execute(sa.update(User).where(User.id == user.id).values(disabled=disabled))
        self._cache.invalidate()
        return dataclasses.replace(user, disabled=disabled)

    # --- keys ---

    def create_key(self, user: str, name: str = "") -> NewKey:
        """A new key for a user (id or name); the returned secret is the only copy."""
        user_id = self.get_user(user).id
        for _ in range(8):
            public_id = secrets.token_hex(6)
            secret, salt, digest = _new_secret(public_id)
            with self.store.write() as s:
                if s.get(ApiKey, public_id) is not None:
                    continue  # 48-bit ids: a clash is rare but not impossible
                row = ApiKey(id=public_id, user_id=user_id, name=name, salt=salt, hash=digest, created=time.time())
                s.add(row)
            self._cache.invalidate(public_id)
            return NewKey(_key_info(row), secret)
        raise RuntimeError("could not find a free key id")

    def list_keys(self, user: str | None = None, include_revoked: bool = True) -> list[KeyInfo]:
        query = sa.select(ApiKey).order_by(ApiKey.created)
        if user is not None:
            query = query.where(ApiKey.user_id == self.get_user(user).id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        with self.store.read() as s:
            return [_key_info(k) for k in s.scalars(query)]

    def get_key(self, key_id: str) -> KeyInfo:
        with self.store.read() as s:
            row = s.get(ApiKey, key_id)
        if row is None:
            raise NotFoundError(f"no key {key_id!r}")
        return _key_info(row)

    def rotate_key(self, key_id: str) -> NewKey:
        """A new secret under the same public id (its policy, limits and ledger history stay); the old secret
        stops working within CACHE_SECONDS on every process. A revoked key cannot be rotated."""
        public_id = self.get_key(key_id).id
        secret, salt, digest = _new_secret(public_id)
        with self.store.write() as s:
            done = s.execute(
                sa.update(ApiKey)
                .where(ApiKey.id == public_id, ApiKey.revoked_at.is_(None))
                .values(salt=salt, hash=digest)
            ).rowcount
            row = s.get(ApiKey, public_id)
        if not done:
            raise ValueError(f"key {public_id} is revoked")
        self._cache.invalidate(public_id)
        return NewKey(_key_info(row), secret)

    def revoke_key(self, key_id: str) -> KeyInfo:
        with self.store.write() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise NotFoundError(f"no key {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = time.time()
        self._cache.invalidate(key_id)
        return _key_info(row)

    # --- authentication ---

    def lookup(self, public_id: str) -> KeyRecord | None:
        return self._cache.get(public_id, self._load)

    def _load(self, public_id: str) -> KeyRecord | None:
        with self.store.read() as s:
            row = s.execute(
                sa.select(ApiKey.id, ApiKey.user_id, ApiKey.salt, ApiKey.hash, ApiKey.revoked_at, User.disabled)
                .join(User, User.id == ApiKey.user_id)
                .where(ApiKey.id == public_id)
            ).first()
        if row is None:
            return None
        return KeyRecord(row.id, row.user_id, row.salt, row.hash, row.revoked_at is not None, bool(row.disabled))

    def verify(self, secret: str, *, blocking: bool = True) -> KeyRecord | object | None:
        """The key a secret belongs to, if it is well formed and matches (revoked or not: the caller decides).
        `blocking=False`: answers only from the cache, MISSING when the key would have to be read from the store."""
        parsed = parse_secret(secret)
        if parsed is None:
            return None
        record = self.lookup(parsed[0]) if blocking else self._cache.peek(parsed[0])
        if record is MISSING:
            return MISSING
        if record is None or not hmac.compare_digest(hash_secret(record.salt, secret.strip()), record.hash):
            return None
        return record

    def touch_due(self, key_id: str) -> bool:
        """Whether `touch(key_id)` would write to the store now."""
        return time.time() - self._touched.get(key_id, 0.0) >= LAST_USED_EVERY

    def touch(self, key_id: str) -> None:
        """Writes last_used, at most once per LAST_USED_EVERY seconds per key in this process."""
        now = time.time()
        if now - self._touched.get(key_id, 0.0) < LAST_USED_EVERY:
            return
        self._touched[key_id] = now
        try:
            with self.store.write() as s:
                s.execute(sa.update(ApiKey).where(ApiKey.id == key_id).values(last_used=now))
        except sa.exc.SQLAlchemyError:
            log.warning("could not record last use of key %s", key_id, exc_info=True)
