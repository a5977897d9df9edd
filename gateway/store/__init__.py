"""The gateway's shared state: users, keys, policies, limits and their counters, the ledger, feedback and flags,
in one SQL database that every gateway process uses (SQLite for one machine, PostgreSQL for many)."""

from gateway.store.db import MISSING, Store, TtlCache, default_url

__all__ = ["MISSING", "Store", "TtlCache", "default_url"]
