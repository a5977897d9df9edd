"""The KV memory's host-side bookkeeping: the page pool, reservations and the prefix index (see pages.py)."""

from engine.kv.pages import Match, OutOfPages, PagePool

__all__ = ["Match", "OutOfPages", "PagePool"]
