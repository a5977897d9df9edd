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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logical axes of the pools (the sharding table maps kv heads over the tensor axis; pages stay whole per device).
K_POOL_AXES = ("kv_pages", "kv_heads", "head_dim", "cache_seq")
V_POOL_AXES = ("kv_pages", "kv_heads", "cache_seq", "head_dim")

NEG_INF = -1e30  # large finite: keeps fully-masked rows NaN-free
SINK_PAGE = 0
"""The page idle slots' tables point at; never allocated to a sequence."""


def write_decode_kv(k_pool, v_pool, k_new, v_new, table, lengths):
    """Writes k_new / v_new [B, K, H] at each slot's position `lengths[b]` through its page table [B, W]; a position
    past the table's W * P positions goes to the sink page. Returns the updated pools."""
    p, w = k_pool.shape[3], table.shape[1]
    inside = lengths < w * p
    page = jnp.take_along_axis(table, jnp.clip(lengths // p, 0, w - 1)[:, None], axis=1)[:, 0]
    page = jnp.where(inside, page, SINK_PAGE)
    offset = lengths % p
    # advanced indices on dims 0 and 3 (resp. 0 and 2) split by slices: the update is [B, K, H]
    k_pool = k_pool.at[page, :, :, offset].set(k_new.astype(k_pool.dtype))
    v_pool = v_pool.at[page, :, offset, :].set(v_new.astype(v_pool.dtype))
    return k_pool, v_pool


def paged_attend_xla(q, k_pool, v_pool, table, lengths):
    """q [B, K, G, H] (pre-scaled) attends to positions [0, lengths[b]] of each slot's pages (table [B, W]) ->
    [B, K, G, H] in q's dtype; scores and softmax in float32."""
    b, kh, g, h = q.shape
    w, p = table.shape[1], k_pool.shape[3]
    k = jnp.take(k_pool, table, axis=0)  # [B, W, K, H, P]
    v = jnp.take(v_pool, table, axis=0)  # [B, W, K, P, H]
    scores = jnp.einsum("BKGH,BWKHP->BKGWP", q, k, preferred_element_type=jnp.float32).reshape(b, kh, g, w * p)
    valid = jnp.arange(w * p)[None, :] <= lengths[:, None]  # [B, W * P]
    scores = jnp.where(valid[:, None, None, :], scores, NEG_INF)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kh, g, w, p)
    return jnp.einsum("BKGWP,BWKPH->BKGH", weights, v, preferred_element_type=jnp.float32).astype(q.dtype)


def paged_decode_attention_xla(q, k_new, v_new, k_pool, v_pool, table, lengths):
    """One decode step: write the new K/V (see `write_decode_kv`), then attend (see `paged_attend_xla`). Returns
    (out [B, K, G, H], k_pool, v_pool)."""
    k_pool, v_pool = write_decode_kv(k_pool, v_pool, k_new, v_new, table, lengths)
    return paged_attend_xla(q, k_pool, v_pool, table, lengths), k_pool, v_pool
