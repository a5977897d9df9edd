"""The CPU prefill-attention kernel (engine.kernels.prefill_attention) against `prefill_attention_xla`, the paged
case it replaces: packs of several segments and padding, context pages each seen by some segments only (bit masks),
partly filled pages, a block count shorter than the list, no context, several thousand positions of context; and
pool contents no query may see (NaN or inf) that must never reach the output. Then the model with the kernel as its
prefill attention against the model without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kv_support import int8_pools

from engine import kernels
from engine.attention import PrefillPaging, prefill_attention_xla, write_prefill_kv
from engine.config import tiny_config
from engine.model import Transformer, init_params

pytestmark = pytest.mark.skipif(kernels.compiler() is None, reason="no C++ compiler to build the kernel with")


def bits(rows) -> np.int32:
    """A ctx_rows entry: bit min(r, 31) for each segment r (bit 31 set makes it negative, as the engine writes it)."""
    return np.uint32(sum(1 << r for r in {min(r, 31) for r in rows})).view(np.int32)


def make_case(rng, t, k, g, h, p, segments, n_ctx, block_pages, *, ctx_blocks=None, extra=0, poison=np.nan):
    """(q, k, v, segment_ids, k_pool, v_pool, paging) for one pack, the pools already holding its K/V.

    segments: the tokens of segments 0, 1, ... in order, padding (-1) after them. n_ctx context entries, each seen
    by a random subset of the segments (some by none, a few by segments the pack does not hold), ~30% of them filled
    only in part; one page is listed twice with different fills. ctx_blocks (at least enough for the n_ctx entries)
    defaults to just enough; `extra` more entries follow the counted ones, seen by every segment, naming pages that
    hold only `poison`. Every pool position no counted entry
    names within its fill, and not written by the pack, holds `poison`."""
    n_seg = len(segments)
    seg = np.full(t, -1, np.int32)
    seg[: sum(segments)] = np.repeat(np.arange(n_seg, dtype=np.int32), segments)
    if ctx_blocks is None:
        ctx_blocks = -(-n_ctx // block_pages)
    count = ctx_blocks * block_pages
    assert n_ctx <= count
    c = max(block_pages, -(-(count + extra) // block_pages) * block_pages)
    dest = -(-t // p) + 1  # the pack's own pages
    n_pages = 1 + n_ctx + extra + dest
    ids = rng.permutation(np.arange(1, n_pages))
    ctx_ids, extra_ids, dest_ids = ids[:n_ctx], ids[n_ctx : n_ctx + extra], ids[n_ctx + extra :]
    if n_ctx >= 3:
        ctx_ids[-1] = ctx_ids[0]  # the same page twice (the engine keys entries by page and fill)
    pages, rows, valid = (np.zeros(c, np.int32) for _ in range(3))
    for j in range(n_ctx):
        pages[j] = ctx_ids[j]
        seen = [r for r in range(n_seg) if rng.random() < 0.7]
        if rng.random() < 0.1:
            seen.append(n_seg + 1)  # a segment this pack does not hold
        rows[j] = bits(seen)
        valid[j] = rng.integers(1, p + 1) if rng.random() < 0.3 else p
    if n_ctx >= 3:
        valid[0], valid[n_ctx - 1] = p, max(1, p // 2)
    pages[count : count + extra], rows[count : count + extra], valid[count : count + extra] = extra_ids, -1, p

    q = rng.standard_normal((t, k, g, h), np.float32) / np.sqrt(h)
    k_new, v_new = rng.standard_normal((2, t, k, h), np.float32)
    k_pool = rng.standard_normal((n_pages, k, h, p), np.float32)
    v_pool = rng.standard_normal((n_pages, k, p, h), np.float32)
    finite = np.zeros((n_pages, p), bool)
    for j in range(n_ctx):
        finite[pages[j], : valid[j]] = True
    k_pool[np.broadcast_to(~finite[:, None, None, :], k_pool.shape)] = poison
    v_pool[np.broadcast_to(~finite[:, None, :, None], v_pool.shape)] = poison

    pos = np.arange(t)
    dest_page = np.where(seg >= 0, dest_ids[pos // p], 0).astype(np.int32)  # padding writes the sink
    paging = PrefillPaging(
        dest_page, (pos % p).astype(np.int32), pages, rows, valid, np.int32(ctx_blocks), block_pages=block_pages
    )
    k_pool, v_pool = write_prefill_kv(jnp.asarray(k_pool), jnp.asarray(v_pool), k_new, v_new, paging)
    return q, k_new, v_new, seg, k_pool, v_pool, paging


def run(fn, case) -> np.ndarray:
    return np.asarray(jax.jit(fn)(*case))


def kernel(case) -> np.ndarray:
    kernels.load()
    return run(kernels.prefill_attention, case)


def assert_close(got, want):
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# (T, K, G, H, P, segments, context entries, block_pages): SmolLM2's heads (K=3, G=3, H=64) at page sizes 16 and 64
# (the engine's default), head dims and page sizes that are not multiples of the 16-float vectors (gathered, not read
# in place), a Llama-like head (G=8, H=128), padding, 34 one-token segments (bits past 31 share bit 31), and a pack
# long enough to take several query tiles.
CASES = [
    (32, 3, 3, 64, 16, [20, 12], 40, 16),
    (24, 2, 2, 16, 8, [5, 7, 4], 13, 4),
    (50, 1, 5, 24, 4, [10, 30], 41, 8),
    (40, 2, 4, 64, 64, [10, 25], 9, 4),
    (17, 2, 8, 128, 32, [4, 4, 4], 9, 2),
    (40, 1, 2, 16, 16, [1] * 34, 20, 4),
    (200, 3, 3, 64, 16, [60, 90, 30], 30, 16),
]


@pytest.mark.parametrize(("t", "k", "g", "h", "p", "segments", "n_ctx", "cb"), CASES)
def test_kernel_matches_xla(t, k, g, h, p, segments, n_ctx, cb):
    case = make_case(np.random.default_rng(0), t, k, g, h, p, segments, n_ctx, cb)
    assert_close(kernel(case), run(prefill_attention_xla, case))


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_entries_past_the_block_count_and_stale_positions_are_never_read(poison):
    """Two blocks counted of a list of five: the entries after them (seen by every segment, full pages) name pages
    that hold only `poison`, as do positions past each entry's fill and pages no entry names."""
    case = make_case(np.random.default_rng(1), 32, 3, 3, 64, 16, [20, 12], 16, 8, ctx_blocks=2, extra=24, poison=poison)
    assert case[6].ctx_pages.shape == (40,)
    assert_close(kernel(case), run(prefill_attention_xla, case))


def test_pages_no_segment_of_the_pack_sees_are_never_read():
    """Entries whose bits name no segment of this pack (another pack's) are skipped, even within their fill; the XLA
    formulation multiplies them by zero weights, so it is compared on the clean pools."""
    rng = np.random.default_rng(2)
    case = make_case(rng, 24, 2, 2, 16, 16, [10, 6], 16, 4)
    q, k, v, seg, k_pool, v_pool, paging = case
    rows = np.asarray(paging.ctx_rows).copy()
    other = np.arange(16) % 3 == 0
    rows[other] = bits([5, 31])  # segments this pack does not hold
    paging = paging.replace(ctx_rows=rows)
    clean = (q, k, v, seg, k_pool, v_pool, paging)
    k_bad, v_bad = np.asarray(k_pool).copy(), np.asarray(v_pool).copy()
    for page in np.asarray(paging.ctx_pages)[:16][other]:
        k_bad[page], v_bad[page] = np.nan, np.nan
    assert not set(np.asarray(paging.ctx_pages)[:16][other]) & set(np.asarray(paging.ctx_pages)[:16][~other])
    assert_close(kernel((q, k, v, seg, k_bad, v_bad, paging)), run(prefill_attention_xla, clean))


def test_without_context():
    """No blocks counted (every listed page poisoned), and no entries at all: attention inside the pack only."""
    case = make_case(np.random.default_rng(3), 32, 3, 3, 64, 16, [7, 9, 10], 0, 16, ctx_blocks=0, extra=16)
    assert_close(kernel(case), run(prefill_attention_xla, case))
    q, k, v, seg, k_pool, v_pool, paging = case
    empty = np.zeros((0,), np.int32)
    paging = paging.replace(ctx_pages=empty, ctx_rows=empty, ctx_valid=empty, ctx_blocks=np.int32(3))
    assert_close(kernel((q, k, v, seg, k_pool, v_pool, paging)), run(prefill_attention_xla, case))


def test_thousands_of_positions_of_context():
    """A ~20-token chunk of a long prompt with ~4,800 positions before it, and a second prompt sharing half of them."""
    case = make_case(np.random.default_rng(4), 32, 3, 3, 64, 16, [20, 12], 300, 16)
    assert_close(kernel(case), run(prefill_attention_xla, case))


def as_int8(case, hide=None):
    """The case with its pools as an int8 KV cache (see `kv_support.int8_pools`)."""
    q, k, v, seg, k_pool, v_pool, paging = case
    return q, k, v, seg, *int8_pools(k_pool, v_pool, hide), paging


@pytest.mark.parametrize(("t", "k", "g", "h", "p", "segments", "n_ctx", "cb"), CASES)
def test_int8_kernel_matches_xla(t, k, g, h, p, segments, n_ctx, cb):
    """An int8 KV cache: context pages dequantized as they are gathered give what XLA's formulation gives on the same
    int8 pools (clean pools: stale positions hold zeros here, NaN scales in the next test)."""
    case = as_int8(make_case(np.random.default_rng(0), t, k, g, h, p, segments, n_ctx, cb, poison=0.0))
    assert_close(kernel(case), run(prefill_attention_xla, case))


def test_int8_kernel_never_reads_what_no_query_may_see():
    """NaN scales at every position no counted entry names within its fill (and past the block count) change
    nothing, and the int8 rounding shows against the float32 pools, within its reach."""
    rng_case = dict(t=32, k=3, g=3, h=64, p=16, segments=[20, 12], n_ctx=16, block_pages=8)
    clean = make_case(np.random.default_rng(1), **rng_case, ctx_blocks=2, extra=24, poison=0.0)
    k_pool, paging = clean[4], clean[6]
    hide = np.ones((k_pool.shape[0], 16), bool)
    pages, valid = np.asarray(paging.ctx_pages), np.asarray(paging.ctx_valid)
    for j in range(16):
        hide[pages[j], : valid[j]] = False
    hide[np.asarray(paging.dest_page), np.asarray(paging.dest_offset)] = False  # the pack's own K/V
    want = kernel(as_int8(clean))
    assert_close(kernel(as_int8(clean, hide)), want)
    f32 = kernel(clean)
    assert 0 < np.abs(want - f32).max() < 0.05


def test_float32_only():
    case = make_case(np.random.default_rng(5), 8, 1, 2, 16, 16, [8], 2, 2)
    q, *rest = case
    with pytest.raises(TypeError, match="float32"):
        kernels.prefill_attention(jnp.asarray(q, jnp.bfloat16), *rest)


def test_model_prefills_the_same_with_the_kernel():
    """A tiny random model's packed prefill over cached context pages: the logits and the pools it writes are the
    ones it computes without the kernel."""
    kernels.load()
    cfg = tiny_config()
    params = init_params(cfg, jnp.float32)
    rng = np.random.default_rng(6)
    t, p = 24, 16
    _, _, _, seg, _, _, paging = make_case(rng, t, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim, p, [9, 11], 6, 4)
    n_pages = int(max(np.asarray(paging.dest_page).max(), np.asarray(paging.ctx_pages).max())) + 1
    shape_k = (n_pages, cfg.num_kv_heads, cfg.head_dim, p)
    shape_v = (n_pages, cfg.num_kv_heads, p, cfg.head_dim)
    pools = tuple(
        (rng.standard_normal(shape_k, np.float32), rng.standard_normal(shape_v, np.float32))
        for _ in range(cfg.num_layers)
    )
    tokens = rng.integers(2, cfg.vocab_size, (1, t)).astype(np.int32)
    positions = (np.arange(t) + 40).astype(np.int32)[None]

    def prefill(model):
        fn = jax.jit(
            lambda pools: model.apply(
                {"params": params}, tokens, positions, pool=pools, segment_ids=seg[None], paging=paging
            )
        )
        logits, pools_out = fn(pools)
        return np.asarray(logits), [np.asarray(a) for layer in pools_out for a in layer]

    want_logits, want_pools = prefill(Transformer(cfg, jnp.float32))
    got_logits, got_pools = prefill(Transformer(cfg, jnp.float32, prefill_attend=kernels.prefill_attention))
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    # layer 0 writes the same K/V; later layers' differ by the rounding of the attention before them
    np.testing.assert_array_equal(got_pools[0], want_pools[0])
    np.testing.assert_array_equal(got_pools[1], want_pools[1])
    for got, want in zip(got_pools, want_pools, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
