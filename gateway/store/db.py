"""The connection to the gateway's database: SQLite (WAL) by default, PostgreSQL by URL, schema by alembic."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from engine import paths

_MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
_PG_MIGRATE_LOCK = 0x6D73_6777  # pg_advisory_xact_lock key: one migrating gateway at a time

URL_ENV = "MESHSERVE_GATEWAY_DB"


def default_url() -> str:
    """$MESHSERVE_GATEWAY_DB, else SQLite at $MESHSERVE_CACHE/gateway.db."""
    return os.environ.get(URL_ENV) or "sqlite:///" + os.path.join(paths.cache_root(), "gateway.db")


class Store:
    """One database. `write()` is a transaction that may change rows (on SQLite it takes the write lock at BEGIN, so
    concurrent writers queue on busy_timeout instead of failing a lock upgrade); `read()` never blocks writers."""

    def __init__(self, url: str | None = None, *, echo: bool = False):
        self.url = url or default_url()
        parsed = sa.engine.make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
            self.engine: Engine = sa.create_engine(self.url, echo=echo, connect_args={"timeout": 30})
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        elif self.dialect == "postgresql":
            self.engine = sa.create_engine(self.url, echo=echo, pool_pre_ping=True, pool_size=8, max_overflow=16)
        else:
            raise ValueError(f"unsupported database {self.dialect!r}: use sqlite:/// or postgresql+psycopg://")
        self._read_engine = self.engine.execution_options(meshserve_read_only=True)
        self._writes = sessionmaker(self.engine, expire_on_commit=False)
        self._reads = sessionmaker(self._read_engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Upgrades the schema to the newest alembic version (idempotent; concurrent callers queue)."""
        from alembic import command
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", _MIGRATIONS)
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        if self.current_revision() == ScriptDirectory.from_config(cfg).get_current_head():
            return  # the common case: every gateway start after the first
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self._read_engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on an exception."""
        with self._writes.begin() as session:
            yield session

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._reads() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Store({sa.engine.make_url(self.url).render_as_string(hide_password=True)!r})"


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own BEGIN handling is off so that `_sqlite_begin` chooses the mode.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    read_only = conn.get_execution_options().get("meshserve_read_only", False)
    conn.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")


MISSING = object()
"""What `TtlCache.peek` answers for a key it does not hold (None may be a cached value)."""

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A small thread-safe cache whose entries live `ttl` seconds: what other processes change in the store is
    seen here within `ttl`."""

    def __init__(self, ttl: float, max_entries: int = 10_000):
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: dict[K, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get(self, key: K, load: Callable[[K], V]) -> V:
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = load(key)
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
            self._entries[key] = (now + self.ttl, value)
        return value

    def peek(self, key: K) -> V | object:
        """The live cached value of `key`, or MISSING (absent or expired); never loads, never blocks on I/O."""
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return MISSING

    def invalidate(self, key: K | None = None) -> None:
        with self._lock:
            if key is None:
                self._entries.clear()
            else:
                self._entries.pop(key, None)
