"""The host-memory tier of the KV cache: full pages evicted from the device pool, kept in host RAM by their content
key, and copied back on a hit instead of being recomputed (as SGLang's HiCache and JetStream's DRAM prefix cache).

The engine owns the copies (engine.Engine: `_spill` gathers evicted pages on device before anything overwrites
them, `_restore` scatters hits back); this module is the bookkeeping and the off-thread half:
- an entry is keyed by the page's block-hash-chain key (engine.kv.pages.page_key), so a prompt's chain continues
  from the device index into this tier page by page; where it stops, the pages kept under the last key are
  scanned for the longest common run of tokens (as the device index does), so the page where a new turn diverges
  from the old one, often the conversation's partly filled last page, comes back too;
- a spilled batch arrives as device arrays (one gather per batch of pages, dispatched in order before the step that
  reuses the pages); a background thread copies it to host memory, so the engine thread never waits on that copy;
- the tier is bounded (`capacity_bytes`): least recently used entries go first.

Entries are plain copies: restoring a page keeps its host entry, so a page evicted again costs no second copy.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
from collections.abc import Sequence

import numpy as np

from engine.kv.pages import page_key


@dataclasses.dataclass
class HostStats:
    """Counters since start-up."""

    spilled_pages: int = 0
    """Pages copied from the device to host memory."""
    restored_pages: int = 0
    """Pages copied back to the device on a prefix hit."""
    hit_tokens: int = 0
    """Prompt tokens served from this tier."""
    dropped_pages: int = 0
    """Pages dropped from host memory to make room."""


class _Batch:
    """One spill: device arrays [L, W, ...] (engine.steps.spill's: K and V, and an int8 pool's scales, kept in the
    form the device holds them) until the copier thread replaces them with host copies."""

    def __init__(self, arrays: tuple) -> None:
        self.arrays = arrays
        self.done = threading.Event()

    def host(self) -> tuple[np.ndarray, ...]:
        self.done.wait()
        return self.arrays


@dataclasses.dataclass
class _Entry:
    batch: _Batch
    index: int  # the page's position in its batch
    parent: bytes
    tokens: tuple[int, ...]
    full: bool


@dataclasses.dataclass(frozen=True)
class HostMatch:
    """What the tier holds continuing a chain: full pages' keys, then optionally a partly matching page whose first
    `partial_tokens` positions continue the match."""

    keys: tuple[bytes, ...]
    partial: bytes | None = None
    partial_tokens: int = 0
    """A page under the last key whose first `partial_tokens` positions continue the match (to be copied into a
    page of the sequence's own)."""

    def tokens(self, page_size: int) -> int:
        return len(self.keys) * page_size + self.partial_tokens


class HostTier:
    """Pages of KV in host RAM, keyed by content; thread-safe (the engine thread and one copier thread)."""

    def __init__(self, capacity_bytes: int, page_bytes: int) -> None:
        if capacity_bytes < page_bytes:
            raise ValueError(f"host_kv_bytes={capacity_bytes} holds no page of {page_bytes} bytes")
        self.page_bytes = page_bytes
        self.capacity_pages = capacity_bytes // page_bytes
        self.stats = HostStats()
        self._entries: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self._children: dict[bytes, set[bytes]] = {}  # parent key -> keys of the pages under it
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._thread = threading.Thread(target=self._copier, name="meshserve-kv-host", daemon=True)
        self._thread.start()

    @property
    def pages(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return len(self._entries) * self.page_bytes

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def touch(self, key: bytes) -> None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)

    def add(self, pages: Sequence[tuple[bytes, bytes, tuple[int, ...], bool]], arrays: tuple) -> None:
        """Takes a spilled batch: page i of each of the device arrays [L, W, ...] (W >= len(pages)) is pages[i] =
        (key, parent key, the tokens it holds, whether they fill it); the copy to host memory happens on the copier
        thread."""
        batch = _Batch(tuple(arrays))
        with self._lock:
            for i, (key, parent, tokens, full) in enumerate(pages):
                self._drop(key)
                self._entries[key] = _Entry(batch, i, parent, tuple(tokens), full)
                self._children.setdefault(parent, set()).add(key)
            self.stats.spilled_pages += len(pages)
            while len(self._entries) > self.capacity_pages:
                self._drop(next(iter(self._entries)))
                self.stats.dropped_pages += 1
        self._queue.put(batch)

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            siblings = self._children[entry.parent]
            siblings.discard(key)
            if not siblings:
                del self._children[entry.parent]

    def chain(self, parent: bytes, tokens: Sequence[int], page_size: int, start_page: int, limit: int) -> HostMatch:
        """What this tier holds continuing a chain from page `start_page` of `tokens[:limit]`, whose parent's key is
        `parent` (ROOT for the first page): whole pages, then the page under the last one sharing the longest run of
        the tokens that follow."""
        keys = []
        key = parent
        with self._lock:
            at = start_page
            while (at + 1) * page_size <= limit:
                child = page_key(key, tokens[at * page_size : (at + 1) * page_size])
                entry = self._entries.get(child)
                if entry is None or not entry.full:
                    break
                self._entries.move_to_end(child)
                keys.append(key := child)
                at += 1
            rest = tokens[at * page_size : limit]
            best, best_len = None, 0
            for candidate in self._children.get(key, ()):
                same = _common(self._entries[candidate].tokens, rest)
                if same > best_len:
                    best, best_len = candidate, same
            if best is not None:
                self._entries.move_to_end(best)
        return HostMatch(tuple(keys), best, best_len)

    def read(self, keys: Sequence[bytes]) -> tuple[np.ndarray, ...]:
        """The pages' data, each of the spilled arrays stacked along a new page axis 1: [L, n, ...] (waits for a
        copy still in flight)."""
        with self._lock:
            entries = [self._entries[key] for key in keys]
        pages = [tuple(a[:, e.index] for a in e.batch.host()) for e in entries]
        self.stats.restored_pages += len(keys)
        return tuple(np.stack(parts, axis=1) for parts in zip(*pages, strict=True))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._children.clear()

    def flush(self) -> None:
        """Waits until every spilled batch is in host memory (tests, shutdown)."""
        self._queue.join()

    def _copier(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                batch.arrays = tuple(np.asarray(a) for a in batch.arrays)
            finally:
                batch.done.set()
                self._queue.task_done()


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
