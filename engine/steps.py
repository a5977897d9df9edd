"""The engine's device steps: pure functions of (model, config, params, state, arrays) over an explicit state pytree.

`DecodeState` is everything the device carries between calls (the KV pools and one row per slot); each step takes
it as an argument and returns the new one (engine.compile jits them with the state donated, so the pools are
updated in place). No step knows the host's bookkeeping: page tables, copy lists and paging arrays come in as plain
arrays (engine.prefill builds a prefill's, engine.engine the decode page table).

- `prefill`: a pack of prompts side by side -> their K/V written into pages, each one's first token (`DevicePrefix`).
- `insert`: one row of a `DevicePrefix` -> a slot of the state; `release`: stops a slot.
- `generate`: up to `decode_steps` decode steps in one loop on device.
- `spill` / `restore`: a fixed number of pages of every layer out of / into the pools (the host KV tier).
- `init_state`: the empty state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from engine.api import EngineConfig
from engine.attention import PrefillPaging, init_pool
from engine.config import ModelConfig
from engine.model import Transformer, rope_angles
from engine.sampling import MAX_LOGPROBS, SlotSampling, hits_stop, sample, token_logprobs


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries on device: the KV pools and one row per slot."""

    k: tuple  # [L] of k_pool [Np, K, H, P] (an array, or engine.attention.Int8Pages)
    v: tuple  # [L] of v_pool [Np, K, P, H]
    lengths: jax.Array  # [B] tokens in the cache = position of the next input token
    tokens: jax.Array  # [B] next input token (the last one sampled)
    active: jax.Array  # [B] bool: still generating
    remaining: jax.Array  # [B] tokens the request may still generate
    generated: jax.Array  # [B] tokens generated so far (the request's random stream index)
    want_logprobs: jax.Array  # [B] bool
    sampling: SlotSampling


@struct.dataclass
class DevicePrefix:
    """One packed prefill's per-row results on device, ready for `insert` (row r: the r-th prompt of the pack)."""

    token: jax.Array  # [R] first sampled token
    remaining: jax.Array  # [R] max_tokens - 1
    generated: jax.Array  # [R] tokens generated before the prompt was read (a resumed request's), plus its first
    want_logprobs: jax.Array  # [R] bool
    sampling: SlotSampling  # [R]


def init_state(model_config: ModelConfig, config: EngineConfig, kv_pages: int, dtype: jnp.dtype) -> DecodeState:
    """An empty pool of `kv_pages` pages per layer, every slot idle."""
    c, e = model_config, config
    k_pool = (kv_pages, c.num_kv_heads, c.head_dim, e.page_size)
    v_pool = (kv_pages, c.num_kv_heads, e.page_size, c.head_dim)
    b = e.num_slots
    i32 = functools.partial(jnp.zeros, dtype=jnp.int32)
    return DecodeState(
        k=tuple(init_pool(k_pool, dtype, e.kv_dtype, keys=True) for _ in range(c.num_layers)),
        v=tuple(init_pool(v_pool, dtype, e.kv_dtype, keys=False) for _ in range(c.num_layers)),
        lengths=i32((b,)),
        tokens=i32((b,)),
        active=jnp.zeros((b,), bool),
        remaining=i32((b,)),
        generated=i32((b,)),
        want_logprobs=jnp.zeros((b,), bool),
        sampling=SlotSampling.empty(b),
    )


def row_logprobs(logits: jax.Array, token: jax.Array, want: jax.Array) -> tuple:
    """token_logprobs of vocab-major logits [V, R], computed only when some row `want`s them (zeros else)."""
    r = token.shape[0]
    return jax.lax.cond(
        jnp.any(want),
        lambda: token_logprobs(logits, token, MAX_LOGPROBS, vocab_axis=0),
        lambda: (
            jnp.zeros((r,), jnp.float32),
            jnp.zeros((r, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((r, MAX_LOGPROBS), jnp.float32),
        ),
    )


def prefill(model: Transformer, params, state: DecodeState, tokens, positions, segments, paging: PrefillPaging,
            copy_src, copy_dst, last, remaining, generated, want_logprobs, sampling):  # fmt: skip
    """Packed prefill: tokens/positions/segments [1, T] hold up to R prompts (segment r). First the pages a row
    starts from by copy (copy_src -> copy_dst, [R]; unused entries copy the sink onto itself) are copied; then
    every layer writes its K/V where `paging` says and attends inside each segment and to the cached pages the
    segment may see; the logits at each prompt's last token (`last` [R]) pick its first token."""
    pools = jax.tree.map(lambda a: a.at[copy_dst].set(a[copy_src]), tuple(zip(state.k, state.v, strict=True)))
    logits, pools = model.apply(
        {"params": params},
        tokens,
        positions,
        pool=pools,
        segment_ids=segments,
        paging=paging,
        logits_index=last[None],
        vocab_major=True,
    )
    logits = logits[:, 0]  # [V, R]
    token = sample(logits, sampling, generated, vocab_axis=0)  # a resumed request continues its random stream
    logprob, top_ids, top_vals = row_logprobs(logits, token, want_logprobs)
    state = state.replace(k=tuple(k for k, _ in pools), v=tuple(v for _, v in pools))
    prefix = DevicePrefix(token, remaining, generated + 1, want_logprobs, sampling)
    return state, prefix, (logprob, top_ids, top_vals)


def insert(prefix: DevicePrefix, state: DecodeState, slot, row, length) -> DecodeState:
    """Arms `slot` with row `row` of a packed prefix: its length, first token and knobs (its K/V are already in
    its pages)."""
    token = prefix.token[row]
    sampling_row = jax.tree.map(lambda a: a[row][None], prefix.sampling)
    first_stops = hits_stop(token[None], sampling_row.stop_ids)[0]
    sampling = jax.tree.map(lambda all_, one: all_.at[slot].set(one[0]), state.sampling, sampling_row)
    remaining = prefix.remaining[row]
    return state.replace(
        lengths=state.lengths.at[slot].set(length),
        tokens=state.tokens.at[slot].set(token),
        active=state.active.at[slot].set(~first_stops & (remaining > 0)),
        remaining=state.remaining.at[slot].set(remaining),
        generated=state.generated.at[slot].set(prefix.generated[row]),
        want_logprobs=state.want_logprobs.at[slot].set(prefix.want_logprobs[row]),
        sampling=sampling,
    )


def release(state: DecodeState, slot) -> DecodeState:
    """Stops `slot` generating (its pages are the host's business)."""
    return state.replace(active=state.active.at[slot].set(False))


def spill(state: DecodeState, pages) -> tuple:
    """The pools' pages [W] of every layer, a copy (the pools stay): one array [L, W, ...] per leaf of a layer's
    (k_pool, v_pool): k [L, W, K, H, P] and v [L, W, K, P, H], each followed by its scales [L, W, K, P] for an
    int8 pool."""
    layers = [jax.tree.leaves(kv) for kv in zip(state.k, state.v, strict=True)]
    return tuple(jnp.stack([leaf[pages] for leaf in leaves]) for leaves in zip(*layers, strict=True))


def restore(state: DecodeState, pages, *arrays) -> DecodeState:
    """Writes pages [W] of every layer from `spill`'s arrays."""
    layers = list(zip(state.k, state.v, strict=True))
    treedef = jax.tree.structure(layers[0])
    restored = [
        jax.tree.unflatten(
            treedef,
            [leaf.at[pages].set(x[i].astype(leaf.dtype)) for leaf, x in zip(jax.tree.leaves(kv), arrays, strict=True)],
        )
        for i, kv in enumerate(layers)
    ]
    return state.replace(k=tuple(k for k, _ in restored), v=tuple(v for _, v in restored))


def generate(model: Transformer, config: EngineConfig, params, state: DecodeState, table, steps, *, window: int):
    """`steps` (<= decode_steps, a runtime value) decode steps through the page table [B, window]; outputs have
    decode_steps rows, the rows past `steps` marked invalid."""
    b, n = config.num_slots, config.decode_steps

    # The rotary angles of every position the window holds, computed once outside the loop: each step gathers its
    # rows. Computed inside, XLA:CPU fused cos/sin into every layer's q and k rotation, per element (SmolLM2 at
    # 64 slots: those fusions took 5.7 ms of a ~85 ms step, 2.1 ms after).
    cos, sin = rope_angles(jnp.arange(window * config.page_size), model.config)

    def step(i, carry):
        st, outs = carry
        at = st.lengths[:, None]  # [B, 1]; past the window only for idle slots, whose output is dropped
        logits, pools = model.apply(
            {"params": params},
            st.tokens[:, None],
            at,
            pool=tuple(zip(st.k, st.v, strict=True)),
            table=table,
            lengths=st.lengths,
            vocab_major=True,
            rope=(jnp.take(cos, at, axis=0, mode="clip"), jnp.take(sin, at, axis=0, mode="clip")),
        )
        logits = logits[:, :, 0]  # [V, B]
        token = sample(logits, st.sampling, st.generated, vocab_axis=0)
        lp = row_logprobs(logits, token, st.want_logprobs & st.active)
        live = st.active
        step_int = live.astype(jnp.int32)
        remaining = st.remaining - step_int
        st = st.replace(
            k=tuple(k for k, _ in pools),  # the model wrote each slot's new K/V at its length
            v=tuple(v for _, v in pools),
            lengths=st.lengths + step_int,
            tokens=jnp.where(live, token, st.tokens),
            active=live & ~hits_stop(token, st.sampling.stop_ids) & (remaining > 0),
            remaining=remaining,
            generated=st.generated + step_int,
        )
        outs = tuple(o.at[i].set(x) for o, x in zip(outs, (token, live, *lp), strict=True))
        return st, outs

    outs = (
        jnp.zeros((n, b), jnp.int32),
        jnp.zeros((n, b), bool),
        jnp.zeros((n, b), jnp.float32),
        jnp.zeros((n, b, MAX_LOGPROBS), jnp.int32),
        jnp.zeros((n, b, MAX_LOGPROBS), jnp.float32),
    )
    # a while loop with a runtime trip count: one compiled program serves every dispatch length
    state, outs = jax.lax.fori_loop(0, jnp.clip(steps, 1, n), step, (state, outs))
    tokens, valid, logprob, top_ids, top_vals = outs
    return state, (tokens, valid, state.active, logprob, top_ids, top_vals)
