"""Attention over the paged KV pool, as XLA ops every backend runs (TPU, GPU, CPU).

The KV memory of the engine is one pool of pages per layer, shared by every slot:
- keys   k_pool [Np, K, H, P]  (stored transposed, so the score product is a plain [G, H] x [H, P] per page),
- values v_pool [Np, K, P, H];
Np pages of P positions. A slot's sequence lives in the pages its row of the page table names: position `pos` of
slot b is offset `pos % P` of page `table[b, pos // P]`. Page 0 is never handed out: it is the sink that idle slots
(whose table rows are all 0) write into, and nothing ever reads it unmasked.

Decode (`paged_decode_attention_xla`): each slot's new key/value is written at its `length`, then its one query
attends to positions [0, length] of its pages. Written before read, so XLA updates the donated pool in place. The
Pallas kernels and the CPU kernel (engine.kernels) keep this exact contract and are tested against this function.

Prefill with context (`context_attention_xla`): a packed prefill's queries also attend to pages cached earlier (a
shared prefix, a previous chunk of the same prompt); the pages are visited in blocks in a loop whose trip count is
a runtime value, with an online softmax, so one compiled program serves any amount of context.

Sliding-window layers (Mistral, Gemma) take `window`: a query sees only the `window` positions ending at its own.
Decode then reads only the ceil(window / P) + 1 pages that can hold them; prefill masks what lies before the window
(pages behind every layer's window stay allocated until the sequence ends). Soft-capped scores (Gemma 2) take
`softcap`. Only these XLA formulations implement the two (engine.placement picks them for such models).

An int8 pool (`Int8Pages`, EngineConfig.kv_dtype='int8') holds int8 values in the same layouts plus one scale per
(page, kv head, position): each token's K (and V) vector of a head is quantized on its own as it is written
(absmax / 127), so a token never changes scale after it is stored and a shared page means the same to every reader.
Reading folds the scales into the products instead of dequantizing the pages: scores = (q . k_int8) * k_scale per
position, and out = (softmax * v_scale) . v_int8, so what is materialized is the int8 gather converted in the
compute dtype. The scales are bfloat16 (2 bytes: 1.94x bfloat16's tokens per byte where float32 scales give 1.88x);
quantizing against the rounded scale keeps its rounding out of the error (see `quantize_kv`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from engine.kv.pages import SINK as SINK_PAGE

# Logical axes of the pools (the sharding table maps kv heads over the tensor axis; pages stay whole per device).
K_POOL_AXES = ("kv_pages", "kv_heads", "head_dim", "cache_seq")
V_POOL_AXES = ("kv_pages", "kv_heads", "cache_seq", "head_dim")
SCALE_AXES = ("kv_pages", "kv_heads", "cache_seq")  # an int8 pool's scales, keys and values alike
KV_SCALE_DTYPE = jnp.bfloat16

NEG_INF = -1e30  # large finite: keeps fully-masked rows NaN-free
CONTEXT_BLOCK_POSITIONS = 256
"""Context positions a prefill reads per loop iteration (whole pages): large enough that each dot is a real matrix
product, small enough that a short context does not read much past its end."""


@struct.dataclass
class Int8Pages:
    """An int8 KV pool of one layer: `values` int8 in the float pool's layout (keys [Np, K, H, P], values
    [Np, K, P, H]) and `scale` [Np, K, P] (KV_SCALE_DTYPE): position t of page n of head k holds values * scale."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape


def init_pool(shape: tuple[int, ...], dtype, kv_dtype: str = "auto", *, keys: bool):
    """A zeroed pool of `shape` (K_POOL_AXES' layout if `keys`, else V_POOL_AXES'): an array of `dtype`, or
    Int8Pages for kv_dtype 'int8'."""
    if kv_dtype != "int8":
        return jnp.zeros(shape, dtype)
    p = shape[3] if keys else shape[2]
    return Int8Pages(jnp.zeros(shape, jnp.int8), jnp.zeros((*shape[:2], p), KV_SCALE_DTYPE))


def quantize_kv(x):
    """x [..., H] -> (int8 [..., H], scale [...] KV_SCALE_DTYPE): one absmax scale per vector. The scale is rounded
    to its dtype first and x divided by the rounded value, so the only error is int8's rounding (at most scale / 2
    per element; the clip takes the 127.5 that a scale rounded down can give)."""
    x = x.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(x), axis=-1) / 127.0).astype(KV_SCALE_DTYPE)
    s = scale.astype(jnp.float32)
    q = jnp.round(x / jnp.where(s > 0, s, 1.0)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def as_stored(x, kv_dtype: str):
    """x [..., H] as a pool of `kv_dtype` gives it back: quantized and dequantized for 'int8' (in x's dtype), x
    itself otherwise."""
    if kv_dtype != "int8":
        return x
    values, scale = quantize_kv(x)
    return (values.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(x.dtype)


def dequantize_pool(pool, dtype=jnp.float32, *, keys: bool):
    """A pool's values as `dtype` (tests; keys: K_POOL_AXES' layout, else V_POOL_AXES'): Int8Pages -> values * scale
    (over leading axes too: the host tier's [L, W, ...] pages)."""
    if not isinstance(pool, Int8Pages):
        return pool.astype(dtype)
    scale = pool.scale.astype(jnp.float32)
    scale = scale[..., None, :] if keys else scale[..., None]
    return (pool.values.astype(jnp.float32) * scale).astype(dtype)


def _store(pool, page, offset, new, *, keys: bool):
    """new [N, K, H] written at offset[n] of page[n] of a pool (keys: K_POOL_AXES' layout, else V_POOL_AXES')."""

    # advanced indices on dims 0 and 3 (resp. 0 and 2) split by slices: the update is [N, K, H]
    def put(a, x):
        return a.at[page, :, :, offset].set(x) if keys else a.at[page, :, offset, :].set(x)

    if isinstance(pool, Int8Pages):
        values, scale = quantize_kv(new)
        return Int8Pages(put(pool.values, values), pool.scale.at[page, :, offset].set(scale))
    return put(pool, new.astype(pool.dtype))


def _gather(pool, pages, dtype):
    """The pool's pages (`pages` any shape S) -> (values [*S, ...], scale [*S, K, P] float32, or None for a float
    pool, whose values keep the pool's dtype); an int8 pool's values come converted to `dtype`."""
    if isinstance(pool, Int8Pages):
        scale = jnp.take(pool.scale, pages, axis=0).astype(jnp.float32)
        return jnp.take(pool.values, pages, axis=0).astype(dtype), scale
    return jnp.take(pool, pages, axis=0), None


def write_decode_kv(k_pool, v_pool, k_new, v_new, table, lengths):
    """Writes k_new / v_new [B, K, H] at each slot's position `lengths[b]` through its page table [B, W]; a position
    past the table's W * P positions goes to the sink page. Returns the updated pools."""
    p, w = k_pool.shape[3], table.shape[1]
    inside = lengths < w * p
    page = jnp.take_along_axis(table, jnp.clip(lengths // p, 0, w - 1)[:, None], axis=1)[:, 0]
    page = jnp.where(inside, page, SINK_PAGE)
    offset = lengths % p
    return _store(k_pool, page, offset, k_new, keys=True), _store(v_pool, page, offset, v_new, keys=False)


def paged_attend_xla(q, k_pool, v_pool, table, lengths, *, window=None, softcap=None):
    """q [B, K, G, H] (pre-scaled) attends to positions [0, lengths[b]] of each slot's pages (table [B, W]) ->
    [B, K, G, H] in q's dtype; scores and softmax in float32.

    window: only positions (lengths[b] - window, lengths[b]] are seen, and only the ceil(window / P) + 1 pages
    that can hold them are read (from a per-slot first page), not the whole table. softcap: scores become
    softcap * tanh(score / softcap) before the mask."""
    b, kh, g, _ = q.shape
    w, p = table.shape[1], k_pool.shape[3]
    if window is not None and (span := min(w, -(-window // p) + 1)) < w:
        # a window of `window` positions spans at most ceil(window / P) + 1 pages; the first is clipped so the span
        # stays inside the table (an earlier start only adds pages the mask hides)
        first = jnp.clip((lengths - window + 1) // p, 0, w - span)  # [B]
        table = jnp.take_along_axis(table, first[:, None] + jnp.arange(span)[None, :], axis=1)  # [B, span]
        positions = first[:, None] * p + jnp.arange(span * p)[None, :]  # [B, span * P]
        w = span
    else:
        positions = jnp.arange(w * p)[None, :]  # [1, W * P]
    k, k_scale = _gather(k_pool, table, q.dtype)  # [B, W, K, H, P] (scales [B, W, K, P])
    v, v_scale = _gather(v_pool, table, q.dtype)  # [B, W, K, P, H]
    scores = jnp.einsum("BKGH,BWKHP->BKGWP", q, k, preferred_element_type=jnp.float32)
    if k_scale is not None:
        scores = scores * k_scale.transpose(0, 2, 1, 3)[:, :, None]
    scores = scores.reshape(b, kh, g, w * p)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    valid = positions <= lengths[:, None]  # [B, W * P]
    if window is not None:
        valid = valid & (positions > (lengths - window)[:, None])
    scores = jnp.where(valid[:, None, None, :], scores, NEG_INF)
    weights = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        weights = weights * v_scale.transpose(0, 2, 1, 3).reshape(b, kh, 1, w * p)
    weights = weights.astype(v.dtype).reshape(b, kh, g, w, p)
    # a zero weight times a stale NaN/inf is still NaN: what lies past a slot's length never enters the sum
    v = jnp.where(valid.reshape(b, w, 1, p, 1), v, jnp.zeros((), v.dtype))
    return jnp.einsum("BKGWP,BWKPH->BKGH", weights, v, preferred_element_type=jnp.float32).astype(q.dtype)


def paged_decode_attention_xla(q, k_new, v_new, k_pool, v_pool, table, lengths, *, window=None, softcap=None):
    """One decode step: write the new K/V (see `write_decode_kv`), then attend (see `paged_attend_xla`, which
    takes `window` and `softcap`). Returns (out [B, K, G, H], k_pool, v_pool)."""
    k_pool, v_pool = write_decode_kv(k_pool, v_pool, k_new, v_new, table, lengths)
    out = paged_attend_xla(q, k_pool, v_pool, table, lengths, window=window, softcap=softcap)
    return out, k_pool, v_pool


@struct.dataclass
class PrefillPaging:
    """Where a packed prefill's new K/V go and which cached pages its queries also see.

    Token t of the pack is written at offset dest_offset[t] of page dest_page[t] (padding: the sink). The context is
    a list of distinct pages, each seen by the pack's rows whose bit is set in ctx_rows (bit r: segment r) up to its
    first ctx_valid positions; only the first ctx_blocks blocks of `block_pages` pages are read (a runtime count, so
    one compiled program serves any context). ctx_start gives each context page's first position in its sequence,
    which a sliding-window layer needs to hide what lies before its window (None where no layer has one)."""

    dest_page: jax.Array  # [T]
    dest_offset: jax.Array  # [T]
    ctx_pages: jax.Array  # [C]
    ctx_rows: jax.Array  # [C] int32 bit mask over segments
    ctx_valid: jax.Array  # [C]
    ctx_blocks: jax.Array  # [] number of blocks to read
    block_pages: int = struct.field(pytree_node=False, default=1)
    ctx_start: jax.Array | None = None  # [C]


def write_prefill_kv(k_pool, v_pool, k_new, v_new, paging: PrefillPaging):
    """Scatters a pack's new K/V [T, K, H] to (dest_page, dest_offset) of the pools."""
    page, offset = paging.dest_page, paging.dest_offset
    return _store(k_pool, page, offset, k_new, keys=True), _store(v_pool, page, offset, v_new, keys=False)


def _online_update(carry, scores, visible, values, value_scale=None):
    """One block of an online softmax: scores [K, G, T, S] (float32), visible [T, S], values [K, S, H], and an int8
    pool's value scales [K, S] (None: values are the values)."""
    m, denom, acc = carry
    scores = jnp.where(visible[None, None], scores, NEG_INF)
    m_new = jnp.maximum(m, scores.max(axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(scores - m_new[..., None]) * visible[None, None]  # a fully masked block adds exactly nothing
    denom = denom * correction + p.sum(axis=-1)
    weights = p if value_scale is None else p * value_scale[:, None, None, :]
    acc = acc * correction[..., None] + jnp.einsum(
        "KGTS,KSH->KGTH", weights.astype(values.dtype), values, preferred_element_type=jnp.float32
    )
    return m_new, denom, acc


def prefill_attention_xla(
    q,
    k,
    v,
    segment_ids,
    k_pool=None,
    v_pool=None,
    paging: PrefillPaging | None = None,
    *,
    window=None,
    positions=None,
    softcap=None,
):
    """q [T, K, G, H] (pre-scaled), k/v [T, K, H] of one packed row -> [T, K, G, H]. Query t sees the keys <= t of
    its own segment (segment_ids [T]) and, with `paging`, the cached positions its segment may see (see
    PrefillPaging), read from the pools block by block.

    window: query t sees only keys less than `window` positions before it; with `paging` that needs the queries'
    positions [T] and paging.ctx_start. softcap: scores become softcap * tanh(score / softcap) before the mask."""
    t, kh, g, h = q.shape
    seg = segment_ids
    m = jnp.full((kh, g, t), NEG_INF, jnp.float32)
    carry = (m, jnp.zeros((kh, g, t), jnp.float32), jnp.zeros((kh, g, t, h), jnp.float32))
    if paging is not None:
        cb = paging.block_pages
        p = k_pool.shape[3]
        if window is not None and (positions is None or paging.ctx_start is None):
            raise ValueError("a sliding window over cached pages needs the query positions and paging.ctx_start")

        def block(i, carry):
            pages = jax.lax.dynamic_slice_in_dim(paging.ctx_pages, i * cb, cb)
            rows = jax.lax.dynamic_slice_in_dim(paging.ctx_rows, i * cb, cb)
            valid = jax.lax.dynamic_slice_in_dim(paging.ctx_valid, i * cb, cb)
            kb, k_scale = _gather(k_pool, pages, q.dtype)  # [C, K, H, P] (scales [C, K, P])
            vb, v_scale = _gather(v_pool, pages, q.dtype)  # [C, K, P, H]
            scores = jnp.einsum("TKGH,CKHP->KGTCP", q, kb, preferred_element_type=jnp.float32)
            if k_scale is not None:
                scores = scores * k_scale.transpose(1, 0, 2)[:, None, None]
            if softcap is not None:
                scores = jnp.tanh(scores / softcap) * softcap
            sees = ((rows[None, :] >> jnp.clip(seg, 0, 31)[:, None]) & 1).astype(bool) & (seg >= 0)[:, None]
            inside = jnp.arange(p)[None, :] < valid[:, None]  # [C, P]
            visible = (sees[:, :, None] & inside[None]).reshape(t, cb * p)
            if window is not None:
                start = jax.lax.dynamic_slice_in_dim(paging.ctx_start, i * cb, cb)
                key_pos = (start[:, None] + jnp.arange(p)[None, :]).reshape(cb * p)
                visible = visible & (positions[:, None] - key_pos[None, :] < window)
            vb = jnp.where(inside[:, None, :, None], vb, jnp.zeros((), vb.dtype))  # stale NaN/inf never enter
            values = vb.transpose(1, 0, 2, 3).reshape(kh, cb * p, h)
            value_scale = None if v_scale is None else v_scale.transpose(1, 0, 2).reshape(kh, cb * p)
            return _online_update(carry, scores.reshape(kh, g, t, cb * p), visible, values, value_scale)

        carry = jax.lax.fori_loop(0, paging.ctx_blocks, block, carry)
    causal = jnp.tril(jnp.ones((t, t), bool)) & (seg[:, None] == seg[None, :])
    if window is not None:
        # a segment's tokens sit side by side at consecutive positions: index distance is position distance
        causal = causal & (jnp.arange(t)[:, None] - jnp.arange(t)[None, :] < window)
    scores = jnp.einsum("TKGH,SKH->KGTS", q, k, preferred_element_type=jnp.float32)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    _, denom, acc = _online_update(carry, scores, causal, v.transpose(1, 0, 2))
    return (acc / denom[..., None]).transpose(2, 0, 1, 3).astype(q.dtype)


def context_block_pages(page_size: int) -> int:
    """Pages a prefill reads per context block (see CONTEXT_BLOCK_POSITIONS)."""
    return max(1, CONTEXT_BLOCK_POSITIONS // page_size)


__all__ = [
    "KV_SCALE_DTYPE",
    "K_POOL_AXES",
    "SCALE_AXES",
    "V_POOL_AXES",
    "Int8Pages",
    "PrefillPaging",
    "as_stored",
    "context_block_pages",
    "dequantize_pool",
    "init_pool",
    "paged_attend_xla",
    "paged_decode_attention_xla",
    "prefill_attention_xla",
    "quantize_kv",
    "write_decode_kv",
    "write_prefill_kv",
]
