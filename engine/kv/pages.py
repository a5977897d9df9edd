"""The host side of the KV memory: which pages are free, who holds each one, and which token contents they cache.

The device holds one pool of pages per layer (engine.attention); this module only does the bookkeeping, in plain
Python, so it is tested without a model and every process of a multi-host engine reaches the same decisions by
making the same calls.

- `PagePool` hands out page ids (page 0 is the sink, never handed out), counts references (a page held by several
  sequences through a shared prefix is freed when the last lets go), and keeps *reservations*: admission reserves
  the pages a request can ever need (prompt + max_tokens), so decode never runs out of pages mid-request.
- `PrefixIndex` names pages by their content. A page's key is a hash of its parent's key and its tokens (a block
  hash chain, as in vLLM), so a prompt is matched page by page from its start, each step one dict lookup. Chosen
  over a radix tree because every lookup and insertion is O(pages) with no tree surgery, and the chain already
  gives what the radix tree would: a page is only reachable through its whole prefix. Where the chain stops (the
  prompt diverges inside a page, or a cached sequence ended in a partly filled page), the parent's children are
  scanned for the longest common run of tokens; such a partial hit is served by copying that page (copy-on-write)
  or, when no sequence holds it, by taking the page over, so reuse is token-granular while storage stays
  page-granular.

Pages that an index entry names and no sequence holds are *evictable*: they stay until memory is needed and then go
least recently used first (a page's descendants go with it: they are unreachable without it).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence
from typing import NamedTuple

SINK = 0


class OutOfPages(RuntimeError):
    """No free or evictable page is left (a reservation should have prevented this: a bookkeeping bug)."""


@dataclasses.dataclass
class _Node:
    key: bytes
    parent: bytes
    tokens: tuple[int, ...]
    page: int
    full: bool
    children: dict[bytes, _Node] = dataclasses.field(default_factory=dict)


ROOT = b"root"


def page_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a page holding `tokens` after the prefix whose last page has key `parent`."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


@dataclasses.dataclass(frozen=True)
class Match:
    """What the index holds of a token sequence: `pages` full pages shared as they are, then optionally `copy_from`,
    a page whose first `copy_tokens` positions continue the match (to be copied into a page of the sequence's own)."""

    pages: tuple[int, ...]
    copy_from: int | None
    copy_tokens: int
    page_size: int
    key: bytes = dataclasses.field(default=ROOT, compare=False)
    """The chain key of the last full page matched (ROOT when none): where a lookup in another tier continues."""

    @property
    def tokens(self) -> int:
        return len(self.pages) * self.page_size + self.copy_tokens


class Spilled(NamedTuple):
    """A page eviction freed: its chain key, its id, its parent's key and the tokens it holds (fewer than a page:
    a partly filled last page)."""

    key: bytes
    page: int
    parent: bytes
    tokens: tuple[int, ...]


@dataclasses.dataclass
class PoolStats:
    """Counters since start-up."""

    evictions: int = 0


class PagePool:
    """Page ids 1..num_pages-1 with reference counts, reservations and the prefix index over them."""

    def __init__(self, num_pages: int, page_size: int, *, index: bool = True) -> None:
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is the sink), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.indexing = index
        self.refs = [0] * num_pages
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._reserved = 0
        self._root = _Node(ROOT, b"", (), SINK, True)
        self._nodes: dict[bytes, _Node] = {}
        self._node_of_page: dict[int, _Node] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # evictable pages, oldest first
        self.stats = PoolStats()
        self.spilled: list[Spilled] | None = None
        """With a host tier: the pages that eviction freed, whose contents must be copied out before the next
        device step overwrites them (the engine takes them with `take_spilled`); None: not kept."""

    # ----- counts --------------------------------------------------------------------------------------------

    @property
    def usable(self) -> int:
        """Pages a sequence can ever use (all but the sink)."""
        return self.num_pages - 1

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def cached(self) -> int:
        """Pages held by the index only (evictable)."""
        return len(self._lru)

    @property
    def used(self) -> int:
        """Pages some sequence holds."""
        return self.usable - self.free - self.cached

    @property
    def reserved(self) -> int:
        return self._reserved

    def available(self) -> int:
        """Pages a new reservation can still take: free and evictable, less what is reserved already."""
        return self.free + self.cached - self._reserved

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    # ----- reservations and references --------------------------------------------------------------------------

    def reserve(self, pages: int) -> None:
        if pages > self.available():
            raise OutOfPages(f"cannot reserve {pages} pages; {self.available()} available")
        self._reserved += pages

    def unreserve(self, pages: int) -> None:
        if not 0 <= pages <= self._reserved:
            raise ValueError(f"unreserving {pages} of {self._reserved} reserved pages")
        self._reserved -= pages

    def allocate(self, *, reserved: bool) -> int:
        """A fresh page with one reference; `reserved`: it comes out of a reservation made earlier."""
        if reserved:
            self.unreserve(1)
        elif self.available() < 1:
            raise OutOfPages("no page available")
        if not self._free:
            self._evict_one()
        page = self._free.pop()
        self.refs[page] = 1
        return page

    def retain(self, page: int) -> None:
        if self.refs[page] == 0:
            self._lru.pop(page, None)  # a cached page in use again
        self.refs[page] += 1

    def adoptable(self, page: int) -> bool:
        """Whether `adopt` may take `page`: a cached, partly filled page nobody holds. Never a full page: other
        sequences' later pages hang below it in the chain, and adopting it would drop them all from the index (a
        new user of an app, diverging inside the page after the shared system prompt, would wipe every idle
        conversation of that app); a full page is copied instead."""
        node = self._node_of_page.get(page)
        return node is not None and not node.full and self.refs[page] == 0 and page in self._lru

    def adopt(self, page: int) -> None:
        """Takes a cached, partly filled page no sequence holds (see `adoptable`) as a sequence's own (one
        reference), un-indexing it: the new holder will overwrite it past the positions it shares (no copy)."""
        if not self.adoptable(page):
            raise ValueError(f"page {page} is not a cached, partly filled page that nobody holds")
        self.refs[page] = 1
        del self._lru[page]
        self._forget(self._node_of_page[page], spill=True)

    def release(self, page: int) -> None:
        if page == SINK or self.refs[page] <= 0:
            raise ValueError(f"page {page} released more often than held")
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self._node_of_page:
                self._lru[page] = None
            else:
                self._free.append(page)

    def _evict_one(self) -> None:
        if not self._lru:
            raise OutOfPages("no free page and none evictable")
        page, _ = self._lru.popitem(last=False)
        self._forget(self._node_of_page[page], spill=True)
        self.stats.evictions += 1

    def take_spilled(self) -> list[Spilled]:
        """The pages evicted since the last call (see `spilled`)."""
        if self.spilled is None:
            return []
        out, self.spilled = self.spilled, []
        return out

    def _forget(self, node: _Node, spill: bool = False) -> None:
        """Drops a node and its descendants from the index; their pages go free unless a sequence holds them (with
        `spill`, they are listed in `spilled` first)."""
        frees = self._node_of_page.get(node.page) is node and self.refs[node.page] == 0
        if spill and self.spilled is not None and frees:
            self.spilled.append(Spilled(node.key, node.page, node.parent, node.tokens))
        for child in list(node.children.values()):
            self._forget(child, spill)
        parent = self._root if node.parent == ROOT else self._nodes.get(node.parent)
        if parent is not None:
            parent.children.pop(node.key, None)
        self._nodes.pop(node.key, None)
        if self._node_of_page.get(node.page) is node:
            del self._node_of_page[node.page]
            if self.refs[node.page] == 0:
                self._lru.pop(node.page, None)
                self._free.append(node.page)

    def clear_index(self) -> None:
        """Forgets every cached prefix (pages no sequence holds go free)."""
        for child in list(self._root.children.values()):
            self._forget(child)

    # ----- the prefix index ----------------------------------------------------------------------------------

    def match(self, tokens: Sequence[int], *, limit: int | None = None) -> Match:
        """The longest cached prefix of `tokens[:limit]`; touches what it finds (most recently used)."""
        p = self.page_size
        n = len(tokens) if limit is None else min(limit, len(tokens))
        pages: list[int] = []
        node = self._root
        if not self.indexing:
            return Match((), None, 0, p)
        while (len(pages) + 1) * p <= n:
            child = node.children.get(page_key(node.key, tokens[len(pages) * p : (len(pages) + 1) * p]))
            if child is None or not child.full:
                break
            pages.append(child.page)
            node = child
        at = len(pages) * p
        best, best_len = None, 0
        rest = tokens[at:n]
        for child in node.children.values():
            same = _common(child.tokens, rest)
            if same > best_len:
                best, best_len = child, same
        for page in pages:
            self._touch(page)
        if best is not None:
            self._touch(best.page)
        return Match(tuple(pages), None if best is None else best.page, best_len, p, node.key)

    def _touch(self, page: int) -> None:
        if page in self._lru:
            self._lru.move_to_end(page)

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> None:
        """Indexes a sequence whose first len(tokens) positions fill `pages` (its last page may be partly filled).
        A page whose content is already indexed under another page id is left out (that copy is freed when its
        holder lets go); a page indexed before with fewer tokens (a sequence that grew) is re-keyed."""
        if not self.indexing:
            return
        p = self.page_size
        node = self._root
        for i, page in enumerate(pages):
            chunk = tuple(int(t) for t in tokens[i * p : (i + 1) * p])
            if not chunk:
                break
            key = page_key(node.key, chunk)
            existing = self._nodes.get(key)
            if existing is not None:
                node = existing
                continue
            old = self._node_of_page.get(page)
            if old is not None:  # the same page indexed with an earlier, shorter content
                self._forget_node_only(old)
            child = _Node(key, node.key, chunk, page, len(chunk) == p)
            node.children[key] = child
            self._nodes[key] = child
            self._node_of_page[page] = child
            if self.refs[page] == 0:  # indexing a page nobody holds (not done by the engine, but keep it coherent)
                if page in self._free:
                    self._free.remove(page)
                self._lru[page] = None
            if not child.full:
                break
            node = child

    def _forget_node_only(self, node: _Node) -> None:
        """Un-indexes one partial node (no children: a partial page ends its chain) keeping its page as it is."""
        parent = self._root if node.parent == ROOT else self._nodes.get(node.parent)
        if parent is not None:
            parent.children.pop(node.key, None)
        self._nodes.pop(node.key, None)
        del self._node_of_page[node.page]
        self._lru.pop(node.page, None)
        for child in list(node.children.values()):
            self._forget(child)

    def check(self) -> None:
        """Asserts the bookkeeping adds up (tests): every page is exactly one of free, held, or cached."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is free twice"
        for page in range(1, self.num_pages):
            held, cached = self.refs[page] > 0, page in self._lru
            assert (page in free) + held + cached == 1 or (held and page in self._node_of_page), (
                f"page {page}: free={page in free} refs={self.refs[page]} cached={cached}"
            )
            if cached:
                assert page in self._node_of_page and self.refs[page] == 0
        assert 0 <= self._reserved <= self.free + self.cached, "more reserved than free + evictable"


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
