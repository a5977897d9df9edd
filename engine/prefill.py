"""Prompt packing: how prompts are grouped into prefill calls, and the host arrays one packed call runs on.

A prefill call of T tokens (a bucket of `EngineConfig.prefill_buckets`) holds up to `prefill_rows(T)` prompts side
by side, each a segment of the one row of tokens; each token's K/V goes to a page of its prompt (`dest_page`,
`dest_offset`), and each prompt attends to the cached pages of its own opening through one context list shared by
the pack (a page names the rows that see it in a bit mask). With a token budget a long prompt is read over several
calls, and a token at a long context counts for more (`prefill_cost`). Plain numpy: engine.steps.prefill runs the
arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from engine.api import CapacityError, EngineConfig, Prefix
from engine.attention import SINK_PAGE, PrefillPaging, context_block_pages
from engine.config import ModelConfig
from engine.kv import Match
from engine.sampling import SamplingParams, SlotSampling

# A packed prefill of T tokens computes logits (and samples) for at most max(MIN_PREFILL_ROWS, T //
# PREFILL_TOKENS_PER_ROW) prompts, and prefill_segments: each row costs a column of the output head and a row of
# sampling, which a lone prompt pays for every empty row. Measured on the AVX-512 VM (SmolLM2, a 41-token prompt in
# the 64 bucket): 32 rows 67-70 ms TTFT, 8 rows 59-62 ms.
MIN_PREFILL_ROWS = 8
PREFILL_TOKENS_PER_ROW = 8
MIN_SHARED_TOKENS = 8
"""A prompt waits for an earlier prompt of the same batch to be cached when they share at least this many more
tokens than the cache already holds (see `ready`)."""


def prefill_rows(config: EngineConfig, bucket: int) -> int:
    """Prompts a prefill call of `bucket` tokens packs at most (see PREFILL_TOKENS_PER_ROW)."""
    return min(config.prefill_segments, max(MIN_PREFILL_ROWS, bucket // PREFILL_TOKENS_PER_ROW))


def bucket_for(config: EngineConfig, length: int) -> int:
    """The prefill bucket a call of `length` tokens runs in."""
    for t in config.prefill_buckets:
        if length <= t:
            return t
    raise CapacityError(
        f"a prefill call of {length} tokens exceeds max_prefill_len={config.max_prefill_len}"
    )  # prompts longer than that are chunked before they get here


def insert_bucket(config: EngineConfig, bucket: int) -> int:
    """The smallest bucket with as many rows as `bucket` (inserts compile once per row count)."""
    r = prefill_rows(config, bucket)
    return min(t for t in config.prefill_buckets if prefill_rows(config, t) == r)


def packs(config: EngineConfig, lengths: Sequence[int]) -> list[list[int]]:
    """How prompts computing these many tokens are grouped into prefill calls, in order: as many per call as fit,
    their total within `max_prefill_len` and their count within `prefill_rows` of the bucket that total runs in."""
    out: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        fits = bool(out) and total + n <= config.max_prefill_len
        if not fits or len(out[-1]) >= prefill_rows(config, bucket_for(config, total + n)):
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


# ----- the token budget ---------------------------------------------------------------------------------------------


def attention_crossover(model_config: ModelConfig) -> float:
    """Context length at which a prompt token's attention FLOPs equal its weight FLOPs (SmolLM2: ~3,900)."""
    c = model_config
    return 2 * c.num_params / (4 * c.num_layers * c.num_heads * c.head_dim)


def prefill_cost(model_config: ModelConfig, n: int, start: int) -> int:
    """What computing positions [start, start + n) costs, in tokens at no context: attention over a long context
    makes a token dearer (the token budget bounds the time a step spends in prefill, not the token count)."""
    return int(np.ceil(n * (1 + (start + n / 2) / attention_crossover(model_config))))


def tokens_within(model_config: ModelConfig, budget: int, start: int) -> int:
    """Most tokens from position `start` whose `prefill_cost` fits `budget` (at least 1 when budget > 0)."""
    if budget <= 0:
        return 0
    x = attention_crossover(model_config)
    # n (1 + (start + n/2) / x) <= budget: the positive root of n^2 / (2x) + n (1 + start / x) - budget = 0
    a, b = 1 / (2 * x), 1 + start / x
    n = int((-b + np.sqrt(b * b + 4 * a * budget)) / (2 * a))
    while n > 1 and prefill_cost(model_config, n, start) > budget:
        n -= 1
    return max(n, 1)


# ----- which prompts run together -----------------------------------------------------------------------------------


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def ready(
    todo: list[int], prefixes: list[Prefix], peek: Callable[[Prefix], Match], prefix_caching: bool
) -> tuple[list[int], dict[int, Match]]:
    """Prefixes in `todo` that should run now, and what the index holds of those not started (`peek`): a prompt
    that shares at least MIN_SHARED_TOKENS more tokens with an earlier prompt of the batch than the index holds of
    it waits until that prompt is indexed (a later pack finds it), so a burst of prompts with a common system
    prompt or template computes it once, not once per pack row."""
    out, leaders, peeks = [], [], {}
    for i in todo:
        p = prefixes[i]
        if not p.attached:
            peeks[i] = peek(p)
            if prefix_caching:
                shared = max((common_prefix(p.tokens[: p.length - 1], lead) for lead in leaders), default=0)
                if shared - peeks[i].tokens >= MIN_SHARED_TOKENS:
                    del peeks[i]
                    continue
        out.append(i)
        leaders.append(p.tokens)
    return out, peeks


def context_pages(p: Prefix, page_size: int) -> list[tuple[int, int, int]]:
    """(page, positions it holds, its first position) of a prefix's computed positions, as its next prefill call
    reads them. A page still to be copied is read from its source: rows copying the same positions of the same page
    share one context entry (a burst of prompts with a common opening reads one page, not one each); the same page
    seen to different lengths is two entries, so no row sees past its own."""
    pages = p.pages[: -(-p.computed // page_size)]
    if p.copy_from is not None:
        pages[p.computed // page_size] = p.copy_from
    return [(page, min(page_size, p.computed - k * page_size), k * page_size) for k, page in enumerate(pages)]


def fit_context(pack: list[tuple[int, int]], prefixes: list[Prefix], config: EngineConfig) -> list[tuple[int, int]]:
    """The longest head of `pack` whose rows' cached pages, together, fit one call's context list."""
    seen: set[int] = set()
    for j, (i, _) in enumerate(pack):
        ctx = set(context_pages(prefixes[i], config.page_size))
        if j and len(seen | ctx) > config.context_pages:
            return pack[:j]
        seen |= ctx
    return pack


# ----- one call's arrays --------------------------------------------------------------------------------------------


class PackedPrefill(NamedTuple):
    """The arguments of one packed prefill call after (params, state), in `engine.steps.prefill`'s order."""

    tokens: np.ndarray  # [1, T] the rows' tokens side by side
    positions: np.ndarray  # [1, T] each token's position in its own prompt
    segments: np.ndarray  # [1, T] each token's row (-1: padding)
    paging: PrefillPaging  # where each token's K/V goes; the context pages and the rows that see each one
    copy_src: np.ndarray  # [R] the page a row starts from by copy (the sink when none)
    copy_dst: np.ndarray  # [R] the row's own page it is copied into
    last: np.ndarray  # [R] index in T of each row's last token (its logits pick the first token)
    remaining: np.ndarray  # [R] max_tokens - 1
    generated: np.ndarray  # [R] tokens the request generated before (a resumed request's random stream)
    want_logprobs: np.ndarray  # [R] bool
    sampling: SlotSampling  # [R] each row's sampling knobs


def pack_arrays(
    pack: list[tuple[int, int]], prefixes: list[Prefix], config: EngineConfig, bucket: int, eos: Sequence[int]
) -> PackedPrefill:
    """The arrays of one packed prefill of (prefix index, tokens to compute) rows, in a call of `bucket` tokens.
    Every row's pages must already hold the positions it computes (see HostBook._grow)."""
    e, p_size = config, config.page_size
    r = prefill_rows(config, bucket)
    tokens_row = np.zeros((1, bucket), np.int32)
    positions = np.zeros((1, bucket), np.int32)
    segments = np.full((1, bucket), -1, np.int32)
    dest_page = np.full((bucket,), SINK_PAGE, np.int32)
    dest_offset = np.zeros((bucket,), np.int32)
    last, remaining, generated, copy_src, copy_dst = (np.zeros((r,), np.int32) for _ in range(5))
    want = np.zeros((r,), bool)
    rows = [SlotSampling.from_params(SamplingParams(), 0, eos)] * r
    ctx: dict[tuple[int, int, int], int] = {}  # (page, valid positions, first position) -> row bit mask
    at = 0
    for row, (i, n) in enumerate(pack):
        p = prefixes[i]
        start = p.computed
        end = start + n
        pos = np.arange(start, end)
        tokens_row[0, at : at + n] = p.tokens[start:end]
        positions[0, at : at + n] = pos
        segments[0, at : at + n] = row
        dest_page[at : at + n] = np.asarray(p.pages, np.int32)[pos // p_size]
        dest_offset[at : at + n] = pos % p_size
        last[row], remaining[row], generated[row] = at + n - 1, p.params.max_tokens - 1, p.generated
        want[row] = p.params.logprobs is not None
        rows[row] = SlotSampling.from_params(p.params, p.seed, eos)
        src = p.copy_from
        if src is not None:
            copy_src[row], copy_dst[row] = src, p.pages[start // p_size]
        for entry in context_pages(p, p_size):
            ctx[entry] = ctx.get(entry, 0) | 1 << row
        at += n
    if len(ctx) > e.context_pages:
        raise AssertionError(f"{len(ctx)} context pages exceed the call's {e.context_pages}")  # fit_context
    ctx_pages, ctx_rows, ctx_valid, ctx_start = (np.zeros((e.context_pages,), np.int32) for _ in range(4))
    for j, ((page, valid, first), mask) in enumerate(ctx.items()):
        ctx_pages[j], ctx_rows[j], ctx_valid[j] = page, np.int32(np.uint32(mask).view(np.int32)), valid
        ctx_start[j] = first
    cb = context_block_pages(p_size)
    paging = PrefillPaging(dest_page, dest_offset, ctx_pages, ctx_rows, ctx_valid, np.int32(-(-len(ctx) // cb)),
                           block_pages=cb, ctx_start=ctx_start)  # fmt: skip
    sampling = jax.tree.map(lambda *a: np.concatenate(a), *rows)
    return PackedPrefill(tokens_row, positions, segments, paging, copy_src, copy_dst, last, remaining, generated, want,
                         sampling)  # fmt: skip
