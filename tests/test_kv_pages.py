"""The KV page pool (engine/kv/pages.py) on its own, with hand-computed expectations: allocation order, reference
counts, reservations, the prefix index (full pages through the hash chain, partial matches mid-page and on a partly
filled last page, re-keying a grown page, adopting a cached page), LRU eviction (a parent takes its descendants with
it), and a randomized churn against a pure-Python model of what each page holds; then the engine's pool under a
scheduler churn (shared prefixes, follow-up turns, chunked prompts, cancellations, evictions) against each request
run alone.

Pages here are named by the order the pool hands them out: a fresh pool pops the lowest free id first, and a page
given back goes on top of the free stack (it is the next one handed out).
"""

from __future__ import annotations

import dataclasses
import random

import jax.numpy as jnp
import numpy as np
import pytest

from engine.config import tiny_config
from engine.engine import Engine, EngineConfig
from engine.kv import Match, OutOfPages, PagePool
from engine.kv.pages import ROOT, SINK, page_key
from engine.model import init_params
from engine.sampling import SamplingParams
from engine.scheduler import Request, RequestOutput, Scheduler
from engine.tokenizer import make_tiny_tokenizer

# ----- allocation, references, reservations -----------------------------------------------------------------------


def counts(pool: PagePool) -> tuple[int, int, int, int]:
    pool.check()
    return pool.free, pool.cached, pool.used, pool.reserved


def test_allocation_order_and_refcounts():
    pool = PagePool(6, 4)
    assert (pool.usable, pool.available()) == (5, 5)
    assert counts(pool) == (5, 0, 0, 0)
    assert [pool.allocate(reserved=False) for _ in range(3)] == [1, 2, 3]  # lowest ids first; the sink never
    assert counts(pool) == (2, 0, 3, 0)
    pool.retain(2)
    assert pool.refs[:4] == [0, 1, 2, 1]
    pool.release(2)
    assert counts(pool) == (2, 0, 3, 0)  # still held once
    pool.release(2)
    assert counts(pool) == (3, 0, 2, 0)
    assert pool.allocate(reserved=False) == 2  # the page given back is the next handed out
    assert [pool.allocate(reserved=False) for _ in range(2)] == [4, 5]
    assert counts(pool) == (0, 0, 5, 0)
    with pytest.raises(OutOfPages):
        pool.allocate(reserved=False)
    with pytest.raises(ValueError, match="released more often than held"):
        pool.release(SINK)
    for page in (1, 2, 3, 4, 5):
        pool.release(page)
    with pytest.raises(ValueError, match="released more often than held"):
        pool.release(3)
    assert counts(pool) == (5, 0, 0, 0)
    assert pool.refs == [0] * 6
    with pytest.raises(ValueError, match="at least 2 pages"):
        PagePool(1, 4)


def test_reservations():
    pool = PagePool(6, 4)
    assert pool.pages_for(0) == 0 and pool.pages_for(1) == 1 and pool.pages_for(4) == 1 and pool.pages_for(5) == 2
    pool.reserve(3)
    assert pool.available() == 2 and counts(pool) == (5, 0, 0, 3)
    with pytest.raises(OutOfPages, match="cannot reserve 3 pages; 2 available"):
        pool.reserve(3)
    assert pool.reserved == 3  # a refused reservation takes nothing
    assert pool.allocate(reserved=True) == 1  # out of the reservation: available stays 2
    assert pool.available() == 2 and counts(pool) == (4, 0, 1, 2)
    assert [pool.allocate(reserved=False) for _ in range(2)] == [2, 3]  # unreserved pages: the 2 left over
    with pytest.raises(OutOfPages):
        pool.allocate(reserved=False)  # 2 pages are free but both are reserved
    assert counts(pool) == (2, 0, 3, 2)
    assert [pool.allocate(reserved=True) for _ in range(2)] == [4, 5]
    assert counts(pool) == (0, 0, 5, 0)
    with pytest.raises(ValueError, match="unreserving 1 of 0"):
        pool.allocate(reserved=True)
    with pytest.raises(ValueError, match="unreserving 1 of 0"):
        pool.unreserve(1)
    with pytest.raises(ValueError, match="unreserving -1"):
        pool.unreserve(-1)
    for page in range(1, 6):
        pool.release(page)
    pool.reserve(5)
    pool.unreserve(2)
    assert pool.available() == 2 and counts(pool) == (5, 0, 0, 3)


# ----- the prefix index -------------------------------------------------------------------------------------------


def held_sequence(pool: PagePool, tokens: list[int]) -> list[int]:
    """Pages for a sequence of `tokens` (allocated, so held once), indexed by them."""
    pages = [pool.allocate(reserved=False) for _ in range(pool.pages_for(len(tokens)))]
    pool.insert(tokens, pages)
    return pages


def cached_sequence(pool: PagePool, tokens: list[int]) -> list[int]:
    """A finished sequence: indexed, then given back (cached), first page first."""
    pages = held_sequence(pool, tokens)
    for page in pages:
        pool.release(page)
    return pages


def test_page_key_is_a_chain():
    assert page_key(ROOT, [1, 2]) == page_key(ROOT, (1, 2)) != page_key(ROOT, [2, 1])
    assert page_key(page_key(ROOT, [1, 2]), [3]) != page_key(page_key(ROOT, [9, 2]), [3])  # the parent is in the key
    assert page_key(ROOT, [1, 23]) != page_key(ROOT, [12, 3])  # tokens are separated
    assert Match((3, 4), 7, 2, 4).tokens == 10 and Match((), None, 0, 4).tokens == 0


def test_match_full_pages_and_partial_copies():
    pool = PagePool(12, 4)
    seq = list(range(10, 20))  # 10 tokens: pages a, b full, c holds 2
    a, b, c = cached_sequence(pool, seq)
    assert (a, b, c) == (1, 2, 3) and counts(pool) == (8, 3, 0, 0)
    # the whole sequence: two full pages, then the partly filled last page by copy
    assert pool.match(seq) == Match((a, b), c, 2, 4)
    assert pool.match([*seq, 5, 6]) == Match((a, b), c, 2, 4)  # the query runs on past what is cached
    assert pool.match(seq, limit=9) == Match((a, b), c, 1, 4)  # the limit caps the copy
    assert pool.match(seq, limit=8) == Match((a, b), None, 0, 4)
    assert pool.match(seq, limit=7) == Match((a,), b, 3, 4)  # the second page only partly, by copy
    # diverging mid-page: the full pages before it, then a copy of the matching head of the next page
    assert pool.match([*seq[:6], 99, 98, 97]) == Match((a,), b, 2, 4)
    assert pool.match([*seq[:9], 99]) == Match((a, b), c, 1, 4)
    assert pool.match([*seq[:8], 99]) == Match((a, b), None, 0, 4)  # diverges at the start of c: nothing of it
    assert pool.match([10, 99]) == Match((), a, 1, 4)
    assert pool.match([99, 11]) == Match((), None, 0, 4)
    assert pool.match([]) == Match((), None, 0, 4)
    # a page is reachable only through its whole prefix: b's tokens after another first page are not b
    d, e = cached_sequence(pool, [7, 7, 7, 7, *seq[4:8]])
    assert pool.match([7, 7, 7, 7, *seq[4:8], 1]) == Match((d, e), None, 0, 4)
    assert pool.match([*seq[4:8], 1]) == Match((), None, 0, 4)
    assert pool.match([10, 11, 12, 99, *seq[4:8]]) == Match((), a, 3, 4)
    # two cached continuations of a: the longest common run wins. The new sequence's first page repeats a's tokens:
    # it is left out of the index (a is kept) and goes free when let go, so only its two other pages stay cached
    cached_sequence(pool, [*seq[:4], 14, 15, 40, 41, 42])
    assert counts(pool) == (12 - 1 - 7, 7, 0, 0)
    assert pool.match([*seq[:4], 14, 15, 40, 41, 0]).tokens == 8
    assert pool.match([*seq[:4], 14, 15, 16, 0]) == Match((a,), b, 3, 4)
    assert all(r == 0 for r in pool.refs)  # matching holds nothing: the caller retains what it uses


def test_insert_rekeys_a_grown_partial_page():
    pool = PagePool(8, 4)
    a, b = held_sequence(pool, [1, 2, 3, 4, 5, 6])  # b holds (5, 6)
    assert pool.match([1, 2, 3, 4, 5, 6, 0]) == Match((a,), b, 2, 4)
    pool.insert([1, 2, 3, 4, 5, 6, 7, 8], [a, b])  # the sequence grew: b now holds (5, 6, 7, 8)
    assert pool.match([1, 2, 3, 4, 5, 6, 7, 8, 0]) == Match((a, b), None, 0, 4)
    assert pool.match([1, 2, 3, 4, 5, 6, 0]) == Match((a,), b, 2, 4)  # the grown page still serves the shorter head
    c = pool.allocate(reserved=False)
    pool.insert([1, 2, 3, 4, 5, 6, 7, 8, 9], [a, b, c])
    assert pool.match([1, 2, 3, 4, 5, 6, 7, 8, 9, 0]) == Match((a, b), c, 1, 4)
    assert len(pool._nodes) == 3  # one node per page: the (5, 6) node of b is gone, not left beside the new one
    for page in (a, b, c):
        pool.release(page)
    assert counts(pool) == (4, 3, 0, 0)
    pool.clear_index()
    assert counts(pool) == (7, 0, 0, 0) and pool._nodes == {}


def test_insert_leaves_out_a_page_whose_content_is_indexed_already():
    """Two sequences computed the same tokens into different pages: the first stays indexed; the second's copy is
    freed when let go (a dedup), and re-inserting it changes nothing."""
    pool = PagePool(8, 4)
    (a,) = cached_sequence(pool, [1, 2, 3, 4])
    b = pool.allocate(reserved=False)
    pool.insert([1, 2, 3, 4], [b])
    assert pool.match([1, 2, 3, 4, 5]) == Match((a,), None, 0, 4)
    pool.release(b)
    assert counts(pool) == (6, 1, 0, 0)  # b free, only a cached


def test_adopt_takes_over_a_partly_filled_page_never_a_full_one():
    """A partly filled page nobody holds (the end of an earlier turn) is taken over by the new sequence as is (no
    copy). A full page is never taken over: later pages of other conversations hang below it, and taking it would
    drop them all from the index (a new user diverging inside the page after a shared system prompt used to wipe
    every idle conversation of that app); the caller copies it instead."""
    pool = PagePool(8, 4)
    a, b, c = cached_sequence(pool, list(range(10, 20)))  # c holds 2 of 4 positions
    assert counts(pool) == (4, 3, 0, 0)
    assert pool.match([10, 11, 12, 13, 14, 15, 99]) == Match((a,), b, 2, 4)
    assert not pool.adoptable(b)  # full, with c below it
    with pytest.raises(ValueError, match=f"page {b} is not a cached, partly filled page that nobody holds"):
        pool.adopt(b)
    assert pool.match(list(range(10, 20))) == Match((a, b), c, 2, 4)  # the other conversation keeps everything
    assert pool.match([10, 11, 12, 13, 14, 15, 16, 17, 18, 77]) == Match((a, b), c, 1, 4)
    assert pool.adoptable(c)
    pool.adopt(c)
    assert pool.refs[c] == 1 and counts(pool) == (4, 2, 1, 0)  # c held, a and b still cached
    assert pool.match(list(range(10, 20))) == Match((a, b), None, 0, 4)
    with pytest.raises(ValueError, match=f"page {c} is not a cached, partly filled page"):
        pool.adopt(c)
    pool.retain(a)
    with pytest.raises(ValueError, match=f"page {a} is not a cached, partly filled page"):
        pool.adopt(a)
    pool.release(a)
    pool.insert([10, 11, 12, 13, 14, 15, 16, 17, 18, 77, 5], [a, b, c])  # the new holder's content, indexed
    pool.release(c)
    assert pool.match([10, 11, 12, 13, 14, 15, 16, 17, 18, 77, 5, 0]) == Match((a, b), c, 3, 4)


def test_lru_eviction_order_and_touch_by_match():
    pool = PagePool(5, 2)  # 4 usable pages
    (a,) = cached_sequence(pool, [1, 2])
    (b,) = cached_sequence(pool, [3, 4])
    (c,) = cached_sequence(pool, [5, 6])
    assert (a, b, c) == (1, 2, 3) and counts(pool) == (1, 3, 0, 0)
    assert pool.available() == 4  # evictable pages count as available
    assert pool.allocate(reserved=False) == 4  # a free page first: nothing evicted
    assert pool.stats.evictions == 0
    assert pool.allocate(reserved=False) == a  # then the least recently used cached page
    assert pool.stats.evictions == 1 and counts(pool) == (0, 2, 2, 0)
    assert pool.match([1, 2, 0]) == Match((), None, 0, 2)  # a's content is forgotten
    assert pool.match([3, 4, 0]) == Match((b,), None, 0, 2)  # touches b: c is now the oldest
    assert pool.allocate(reserved=False) == c
    assert pool.match([5, 6, 0]).tokens == 0 and pool.match([3, 4, 0]).tokens == 2
    # no free page: the next sequence's page is b, evicted; a copy match touches the page it copies from
    (d,) = cached_sequence(pool, [7, 8])
    assert d == b and pool.stats.evictions == 3 and pool.match([3, 4]).tokens == 0
    pool.release(4)
    pool.release(a)
    assert counts(pool) == (2, 1, 1, 0)
    (e,) = cached_sequence(pool, [9, 9])
    (f,) = cached_sequence(pool, [9, 10])
    assert counts(pool) == (0, 3, 1, 0)  # d, e, f cached (oldest first), c held
    assert pool.match([7, 0]) == Match((), d, 1, 2)  # a copy match on d: d is now the most recent
    assert pool.allocate(reserved=False) == e
    assert pool.allocate(reserved=False) == f
    assert pool.allocate(reserved=False) == d
    assert pool.stats.evictions == 6 and counts(pool) == (0, 0, 4, 0)
    with pytest.raises(OutOfPages):
        pool.allocate(reserved=False)


def test_evicting_a_parent_drops_its_descendants():
    pool = PagePool(6, 2)  # 5 usable pages
    a, b, c = cached_sequence(pool, [1, 2, 3, 4, 5])  # released a, b, c in that order: a is the oldest
    (d,) = cached_sequence(pool, [9, 9])
    assert counts(pool) == (1, 4, 0, 0)
    assert pool.allocate(reserved=False) == 5
    # evicting a makes b and c unreachable: all three go free, one eviction counted, and a is handed out
    assert pool.allocate(reserved=False) == a
    assert pool.stats.evictions == 1 and counts(pool) == (2, 1, 2, 0)
    assert pool.match([1, 2, 3, 4, 5, 0]).tokens == 0 and pool.match([9, 9, 0]).tokens == 2
    assert sorted(pool._free) == sorted([b, c])
    # a descendant still held when its parent goes: it leaves the index, and is freed (not cached) when let go
    pool.release(a)
    pool.release(5)
    assert counts(pool) == (4, 1, 0, 0)
    x, y = held_sequence(pool, [4, 4, 6, 6])
    assert (x, y) == (5, 1)
    pool.release(x)
    assert counts(pool) == (2, 2, 1, 0)  # d and x cached (d the older), y held
    assert [pool.allocate(reserved=False) for _ in range(2)] == [2, 3]  # the free pages first
    assert pool.allocate(reserved=False) == d
    assert pool.allocate(reserved=False) == x  # evicting x drops y from the index although y is held
    assert pool.stats.evictions == 3 and pool.match([4, 4, 6, 6, 0]).tokens == 0
    assert counts(pool) == (0, 0, 5, 0)
    pool.release(y)
    assert counts(pool) == (1, 0, 4, 0) and pool._free == [y]


def test_clear_index():
    pool = PagePool(8, 2)
    cached_sequence(pool, [1, 2, 3, 4])
    held = held_sequence(pool, [5, 6, 7])
    assert counts(pool) == (3, 2, 2, 0)
    pool.clear_index()
    assert counts(pool) == (5, 0, 2, 0)  # cached pages go free; held ones stay held
    assert pool.match([1, 2, 3, 4, 0]).tokens == 0 and pool.match([5, 6, 7, 0]).tokens == 0
    for page in held:
        pool.release(page)
    assert counts(pool) == (7, 0, 0, 0)  # no longer indexed: freed, not cached


def test_no_index():
    pool = PagePool(8, 2, index=False)
    pages = held_sequence(pool, [1, 2, 3, 4])
    for page in pages:
        pool.release(page)
    assert counts(pool) == (7, 0, 0, 0) and pool.match([1, 2, 3, 4]) == Match((), None, 0, 2)


def test_indexing_a_page_nobody_holds_keeps_the_pool_coherent():
    """insert() says it keeps a page nobody holds coherent (the engine never indexes one): the page must be counted
    once, as cached or as free."""
    pool = PagePool(4, 2)
    page = pool.allocate(reserved=False)
    pool.release(page)  # free again
    pool.insert([1, 2], [page])
    assert pool.free + pool.cached == pool.usable and pool.used == 0
    pool.check()


# ----- randomized churn against a model of the page contents ------------------------------------------------------


@dataclasses.dataclass
class Seq:
    tokens: list[int]
    pages: list[int]
    shared: int  # leading pages taken from the index (held by reference, never written)
    reserved: int
    written: int  # positions whose content is in the pages


class PoolModel:
    """Drives a PagePool as the engine does and checks it against `content`: what each page holds, written only by
    the sequence that allocated it."""

    def __init__(self, pool: PagePool, rng: random.Random) -> None:
        self.pool, self.rng, self.p = pool, rng, pool.page_size
        self.content: dict[int, list[int]] = {}
        self.live: list[Seq] = []
        self.ended: list[list[int]] = []  # what finished sequences wrote (the next turn of a chat resends it)
        self.stats = {"full": 0, "copy": 0, "adopt": 0, "refused": 0, "finished": 0, "cancelled": 0}

    def check_match(self, tokens: list[int], limit: int, m: Match) -> None:
        p = self.p
        assert m.tokens <= limit
        for i, page in enumerate(m.pages):
            assert page != SINK and self.content[page][:p] == tokens[i * p : (i + 1) * p], "a full page mismatch"
        if m.copy_from is not None:
            at = len(m.pages) * p
            assert m.copy_tokens > 0 and self.content[m.copy_from][: m.copy_tokens] == tokens[at : at + m.copy_tokens]
        else:
            assert m.copy_tokens == 0

    def write(self, s: Seq, end: int) -> None:
        """The sequence's positions [written, end) get their tokens, in pages allocated from its reservation."""
        while len(s.pages) * self.p < end:
            page = self.pool.allocate(reserved=True)
            s.reserved -= 1
            assert all(page not in o.pages for o in self.live), f"page {page} handed out while held"
            self.content[page] = []
            s.pages.append(page)
        for pos in range(s.written, end):
            page = self.content[s.pages[pos // self.p]]
            assert len(page) == pos % self.p
            page.append(s.tokens[pos])
        s.written = end

    def open(self, tokens: list[int], extra: int) -> None:
        pool, p = self.pool, self.p
        limit = len(tokens) - 1
        m = pool.match(tokens, limit=limit)
        self.check_match(tokens, limit, m)
        for page in m.pages:
            pool.retain(page)
        need = pool.pages_for(len(tokens) + extra) - len(m.pages)
        copy = m.copy_from
        if need > pool.available():
            for page in m.pages:
                pool.release(page)
            self.stats["refused"] += 1
            return
        s = Seq(tokens + [self.rng.randrange(50) for _ in range(extra)], list(m.pages), len(m.pages), need, 0)
        s.written = len(m.pages) * p
        self.stats["full"] += bool(m.pages)
        if copy is not None and pool.adoptable(copy):  # a partial page nobody holds: taken over (the engine's way)
            pool.adopt(copy)
            pool.reserve(need - 1)
            s.reserved -= 1
            assert all(copy not in o.pages for o in self.live)
            del self.content[copy][m.copy_tokens :]  # what lies past the match will be overwritten
            s.pages.append(copy)
            s.written += m.copy_tokens
            self.stats["adopt"] += 1
        else:
            pool.reserve(need)
            if copy is not None:  # a live sequence holds it: copy its head into a page of our own
                pool.retain(copy)
                page = pool.allocate(reserved=True)
                s.reserved -= 1
                self.content[page] = list(self.content[copy][: m.copy_tokens])
                s.pages.append(page)
                s.written += m.copy_tokens
                pool.release(copy)  # copied: the source may go
                self.stats["copy"] += 1
        self.write(s, len(tokens))  # the prompt, computed
        pool.insert(s.tokens[: s.written], s.pages)
        self.live.append(s)

    def grow(self, s: Seq) -> None:
        self.write(s, min(len(s.tokens), s.written + self.rng.randint(1, 2 * self.p)))
        if self.rng.random() < 0.3:
            self.pool.insert(s.tokens[: s.written], s.pages)  # indexed mid-way (the engine does per prefill chunk)

    def end(self, s: Seq, index: bool) -> None:
        self.live.remove(s)
        if index:
            self.ended.append(s.tokens[: s.written])
            self.pool.insert(s.tokens[: s.written], s.pages)
            m = self.pool.match(s.tokens[: s.written])
            assert m.tokens == s.written, "what was just indexed is found in full"
            self.check_match(s.tokens, s.written, m)
        for page in s.pages:
            self.pool.release(page)
        self.pool.unreserve(s.reserved)
        self.stats["finished" if index else "cancelled"] += 1

    def check(self) -> None:
        pool = self.pool
        pool.check()
        holders: dict[int, int] = {}
        owners: dict[int, int] = {}
        for s in self.live:
            for i, page in enumerate(s.pages):
                holders[page] = holders.get(page, 0) + 1
                if i >= s.shared:  # allocated and written by this sequence
                    owners[page] = owners.get(page, 0) + 1
                else:  # taken through a full-page match: full, and never written again by anyone
                    assert len(self.content[page]) == self.p
            for pos in range(s.written):
                assert self.content[s.pages[pos // self.p]][pos % self.p] == s.tokens[pos]
        assert all(n == 1 for n in owners.values()), "a page allocated to two live sequences"
        assert {pg: n for pg, n in enumerate(pool.refs) if n} == holders
        assert pool.used == len(holders) and pool.reserved == sum(s.reserved for s in self.live)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_churn_against_a_model(seed):
    rng = random.Random(seed)
    pool = PagePool(40, 4)
    model = PoolModel(pool, rng)
    systems = [[rng.randrange(50) for _ in range(n)] for n in (6, 11, 16, 3)]
    for _ in range(600):
        r = rng.random()
        if r < 0.35 or not model.live:
            base = rng.choice(systems)
            cut = rng.randint(0, len(base))
            tokens = base[:cut] + [rng.randrange(50) for _ in range(rng.randint(1, 10))]
            if rng.random() < 0.2 and model.live:  # a turn forking a live conversation
                tokens = [*rng.choice(model.live).tokens[: rng.randint(1, 30)], rng.randrange(50)]
            elif rng.random() < 0.5 and model.ended:  # the next turn of an ended one: its history + a message
                tokens = [*rng.choice(model.ended), *(rng.randrange(50) for _ in range(rng.randint(1, 6)))]
            model.open(tokens, rng.randint(0, 12))
        elif r < 0.75:
            model.grow(rng.choice(model.live))
        else:
            model.end(rng.choice(model.live), index=rng.random() < 0.8)
        model.check()
    while model.live:
        model.end(model.live[0], index=True)
        model.check()
    assert pool.used == 0 and pool.reserved == 0 and pool.free + pool.cached == pool.usable
    # the churn did what it is meant to exercise
    assert pool.stats.evictions > 0 and model.stats["full"] > 10 and model.stats["copy"] > 10
    # adoption takes only a partly filled page nobody holds (the end of an ended conversation, whose next turn
    # resends it): 5, 7 and 8 times over the three seeds
    assert model.stats["adopt"] >= 4
    assert model.stats["refused"] > 0 and model.stats["cancelled"] > 0
    pool.clear_index()
    assert pool.free == pool.usable
    pool.check()


# ----- the engine's pool under a scheduler churn ------------------------------------------------------------------

CHURN_CONFIG = EngineConfig(
    num_slots=3,
    max_seq_len=96,
    max_prefill_len=32,
    min_prefill_len=16,
    page_size=16,
    kv_pages=14,  # 13 usable: one full-context request takes 6, so admissions wait for pages and cached ones go
    decode_steps=4,
    dtype="float32",
)


@pytest.fixture(scope="module")
def churn_engines() -> tuple[Engine, Engine]:
    """The engine under test (warmed, with a host tier) and a reference with the prefix cache off, the same shapes
    otherwise."""
    cfg = tiny_config()
    params = init_params(cfg, jnp.float32)
    host_bytes = 24 * cfg.kv_bytes_per_token(4) * CHURN_CONFIG.page_size  # evicted pages go to a 24-page host tier
    engine = Engine(cfg, params, dataclasses.replace(CHURN_CONFIG, host_kv_bytes=host_bytes))
    engine.warmup()
    reference = Engine(cfg, params, dataclasses.replace(CHURN_CONFIG, prefix_caching=False))
    return engine, reference


def churn_requests(
    rng: np.random.Generator, n: int, systems: list[list[int]]
) -> list[tuple[list[int], SamplingParams]]:
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.15:  # a long prompt: computed in chunks
            prompt = [int(t) for t in rng.integers(2, 256, int(rng.integers(40, 80)))]
        else:  # a shared system prompt (sometimes cut short), then the request's own tail
            system = systems[int(rng.integers(len(systems)))]
            cut = len(system) if rng.random() < 0.7 else int(rng.integers(1, len(system)))
            prompt = system[:cut] + [int(t) for t in rng.integers(2, 256, int(rng.integers(1, 20)))]
        room = CHURN_CONFIG.max_seq_len - len(prompt)
        max_tokens = int(rng.integers(1, min(room, 40) + 1))
        if i % 7 == 3:  # seeded sampling: the same tokens wherever it runs
            params = SamplingParams(temperature=0.8, top_k=50, seed=int(rng.integers(1000)), max_tokens=max_tokens)
        else:
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=bool(rng.random() < 0.5))
        out.append((prompt, params))
    return out


def test_engine_churn_matches_requests_run_alone(churn_engines):
    engine, reference = churn_engines
    tok = make_tiny_tokenizer()
    rng = np.random.default_rng(7)
    systems = [[int(t) for t in rng.integers(2, 256, n)] for n in (20, 37, 50)]
    scheduler = Scheduler(engine, tok, prefill_token_budget=16, free_slot_decode_steps=2)
    outputs: dict[str, list[RequestOutput]] = {}
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    cancel_at: dict[int, list[str]] = {}

    def submit(batch: list[tuple[list[int], SamplingParams]], step: int) -> None:
        for prompt, params in batch:
            rid = f"r{len(requests)}"
            requests[rid] = (prompt, params)
            scheduler.submit(Request(rid, prompt, params, lambda o: outputs.setdefault(o.request_id, []).append(o)))
            if rng.random() < 0.12:
                cancel_at.setdefault(step + int(rng.integers(0, 12)), []).append(rid)

    def tokens_of(rid: str) -> list[int]:
        return [t for o in outputs[rid] for t in o.token_ids]

    submit(churn_requests(rng, 45, systems), 0)
    step, cancelled = 0, set()
    while scheduler.has_work() or step < 40:
        if step in (15, 40):  # follow-up turns of finished conversations, and more of the first kind
            done = [rid for rid, outs in outputs.items() if outs[-1].finished and outs[-1].finish_reason != "cancelled"]
            turns = []
            for rid in done[:12]:
                prompt, params = requests[rid]
                history = prompt + tokens_of(rid)[:-1] + [int(t) for t in rng.integers(2, 256, 3)]
                if len(history) < CHURN_CONFIG.max_seq_len - 4:
                    turns.append((history, dataclasses.replace(params, max_tokens=4)))
            submit(turns + churn_requests(rng, 25, systems), step)
        for rid in cancel_at.pop(step, []):
            if scheduler.cancel(rid):
                cancelled.add(rid)
        scheduler.step()
        step += 1
        assert step < 2000
        engine.pool.check()
    assert len(requests) >= 90 and step > 60
    assert engine.pool.used == 0 and engine.pool.reserved == 0
    engine.pool.check()
    assert engine.pool.stats.evictions > 0
    host = engine.host.stats
    assert host.spilled_pages > 0 and host.restored_pages > 0 and host.dropped_pages > 0, host
    finished = {rid: outs[-1] for rid, outs in outputs.items()}
    assert set(finished) == set(requests) and all(o.finished for o in finished.values())
    assert sum(o.cached_tokens > 0 for o in finished.values()) > 20
    assert any(o.finish_reason == "cancelled" for o in finished.values())
    assert {rid: o.error for rid, o in finished.items() if o.finish_reason == "error"} == {}

    ref_scheduler = Scheduler(reference, tok)
    compared = 0
    for rid, (prompt, params) in requests.items():
        if finished[rid].finish_reason == "cancelled":
            assert rid in cancelled
            continue
        reference.reset()
        alone: list[RequestOutput] = []
        ref_scheduler.submit(Request("alone", prompt, params, alone.append))
        ref_scheduler.run_until_idle(max_steps=200)
        assert alone[-1].cached_tokens == 0
        got = (tokens_of(rid), finished[rid].finish_reason)
        assert got == ([t for o in alone for t in o.token_ids], alone[-1].finish_reason), rid
        compared += 1
    assert compared >= 70


def test_an_admitted_request_is_never_refused_for_pages(churn_engines):
    """Two admissions planned against exactly the pages available, the first a partial hit of a cached page nobody
    holds: both must run, none may fail. (The scheduler budgets each admission at pages_needed; an engine that held
    the partly matching page as a copy source on top of the reservation took one page more than planned, and the
    second admission failed with CapacityError.)"""
    engine, _ = churn_engines
    scheduler = Scheduler(engine, make_tiny_tokenizer())
    outputs: dict[str, list[RequestOutput]] = {}

    def submit(rid: str, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        scheduler.submit(Request(rid, prompt, params, lambda o: outputs.setdefault(o.request_id, []).append(o)))

    rng = np.random.default_rng(3)
    a = [int(t) for t in rng.integers(2, 256, 20)]
    submit("a", a, 1)  # cached: one full page and a page holding 4 tokens
    scheduler.run_until_idle(max_steps=10)
    assert engine.pool.cached == 2 and engine.pool.available() == 13
    submit("long", [int(t) for t in rng.integers(2, 256, 10)], 86)  # reserves 6 pages
    scheduler.step()
    assert engine.pool.available() == 7
    r1 = [*a[:18], 5]  # one full page shared, 2 tokens copied from the cached partial page; 3 pages with max_tokens
    submit("r1", r1, 29)
    submit("r2", [9, 8, 7, 6, 5], 59)  # 4 pages: the two fit the 7 available exactly
    assert engine.pages_needed(19, 29) + engine.pages_needed(5, 59) == 7
    plan = scheduler.step()
    assert [adm.request_id for adm in plan.admit] == ["r1", "r2"]
    scheduler.run_until_idle(max_steps=200)
    assert {rid: outs[-1].finish_reason for rid, outs in outputs.items()} == {
        "a": "length", "long": "length", "r1": "length", "r2": "length",
    }, {rid: outs[-1].error for rid, outs in outputs.items()}  # fmt: skip
    assert engine.pool.used == 0 and engine.pool.reserved == 0
    engine.pool.check()


# ----- admission 'grow': preemption when the pool runs dry mid-decode ---------------------------------------------


def test_preemption_keeps_every_request_alive_and_exact(churn_engines):
    """Admission 'grow' takes a request's prompt and one dispatch of pages; twelve requests growing to ~90 tokens
    each outgrow the 13 usable pages, so running requests are preempted (lowest priority, youngest first) and
    resumed from what is cached, in either tier. Every request still finishes with exactly the tokens it gets alone
    (greedy and seeded sampling), and every page is accounted for."""
    _, reference = churn_engines
    cfg = tiny_config()
    host_bytes = 24 * cfg.kv_bytes_per_token(4) * CHURN_CONFIG.page_size
    config = dataclasses.replace(CHURN_CONFIG, admission="grow", host_kv_bytes=host_bytes)
    engine = Engine(cfg, init_params(cfg, jnp.float32), config)
    tok = make_tiny_tokenizer()
    scheduler = Scheduler(engine, tok, prefill_token_budget=16)
    rng = np.random.default_rng(5)
    requests = {}
    for i in range(12):
        prompt = [int(t) for t in rng.integers(2, 256, int(rng.integers(5, 30)))]
        if i % 3 == 1:
            params = SamplingParams(temperature=0.9, seed=100 + i, max_tokens=90 - len(prompt))
        else:
            params = SamplingParams(max_tokens=90 - len(prompt), ignore_eos=True)
        requests[f"r{i}"] = (prompt, params, i % 4)  # priorities 0..3 (lower runs first)
    outputs: dict[str, list[RequestOutput]] = {}
    for rid, (prompt, params, priority) in requests.items():
        sink = lambda o: outputs.setdefault(o.request_id, []).append(o)  # noqa: E731
        scheduler.submit(Request(rid, prompt, params, sink, priority=priority))
    steps = 0
    while scheduler.has_work():
        scheduler.step()
        engine.pool.check()
        steps += 1
        assert steps < 3000
    assert scheduler.stats().preemptions > 0
    assert engine.pool.used == 0 and engine.pool.reserved == 0
    ref_scheduler = Scheduler(reference, tok)
    for rid, (prompt, params, _) in requests.items():
        got = outputs[rid]
        assert got[-1].finished and got[-1].error is None, (rid, got[-1])
        reference.reset()
        alone: list[RequestOutput] = []
        ref_scheduler.submit(Request("alone", prompt, params, alone.append))
        ref_scheduler.run_until_idle(max_steps=300)
        assert [t for o in got for t in o.token_ids] == [t for o in alone for t in o.token_ids], rid
        assert got[-1].completion_tokens == alone[-1].completion_tokens
        assert got[-1].prompt_tokens == len(prompt)
