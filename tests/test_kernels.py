"""The CPU kernels (engine.kernels) against what they replace, over shapes that take each of their code paths, and
the engine's choice between them: decode attention against the XLA formulation, the packed-weight products against
float64 numpy and, through the engine, against XLA's dots.

Most engine tests (test_engine, test_parity, test_sharding, ...) already decode through the attention kernel, since
'auto' picks it on CPU in float32; test_parity also runs the packed products against HF. These tests pin each
kernel's contract on its own and the rules for when it is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kv_support import int8_pools

from engine import kernels
from engine.attention import paged_decode_attention_xla
from engine.config import tiny_config
from engine.engine import ATTENTION_CHOICES, Engine, EngineConfig
from engine.model import Packed, init_params, one_token_products, unfuse_layer, unpack_head
from engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(kernels.compiler() is None, reason="no C++ compiler to build the kernel with")


def page_tables(rng, lengths, p, window, pages, shared=()):
    """Page tables [B, W] as the engine builds them: each slot's pages (distinct ids, shuffled, never the sink) for
    positions [0, length], then sink entries (0); `shared` pairs (a, b, n): slot b's first n pages are slot a's (a
    prefix held by both, full pages before both lengths). A length of -1 makes an idle row (all sink)."""
    ids = list(rng.permutation(np.arange(1, pages)))
    table = np.zeros((len(lengths), window), np.int32)
    for s, n in enumerate(lengths):
        if n >= 0:
            for c in range(min(window, n // p + 1)):
                table[s, c] = ids.pop()
    for a, b, n in shared:
        assert lengths[a] >= n * p and lengths[b] >= n * p
        table[b, :n] = table[a, :n]
    return table


def random_case(rng, b, k, g, h, p, window, lengths, pages=None, shared=()):
    """q, k_new, v_new, pools of random contents and the page table for `lengths` (see `page_tables`)."""
    pages = pages or b * window + 3
    q = rng.standard_normal((b, k, g, h), np.float32) / np.sqrt(h)
    k_new, v_new = rng.standard_normal((2, b, k, h), np.float32)
    k_pool = rng.standard_normal((pages, k, h, p), np.float32)
    v_pool = rng.standard_normal((pages, k, p, h), np.float32)
    table = page_tables(rng, lengths, p, window, pages, shared)
    return q, k_new, v_new, k_pool, v_pool, table, np.maximum(np.asarray(lengths, np.int32), 0)


def run(fn, case):
    """(out, k_pool, v_pool) as numpy, from `fn` jitted; the pools are donated as the engine donates them."""
    q, k_new, v_new, k_pool, v_pool, table, lengths = case
    pools = jax.device_put((k_pool, v_pool))
    out, k_out, v_out = jax.jit(fn, donate_argnums=(3, 4))(q, k_new, v_new, *pools, table, lengths)
    return np.asarray(out), np.asarray(k_out), np.asarray(v_out)


def kernel(case):
    kernels.load()
    return run(kernels.decode_attention, case)


def live_rows(case) -> np.ndarray:
    """Slots whose table row names a page: an idle row (all sink) writes and reads only the sink, and the engine
    drops its output."""
    return np.flatnonzero((case[5] != 0).any(axis=1))


def assert_same(got, want, case):
    rows = live_rows(case)
    np.testing.assert_allclose(got[0][rows], want[0][rows], rtol=2e-5, atol=2e-6)
    # the pools: the same positions written with the same values; the sink (page 0) takes what idle rows and
    # positions past a row's window write (the XLA path; the kernel writes nothing there) and is never read unmasked
    np.testing.assert_array_equal(got[1][1:], want[1][1:])
    np.testing.assert_array_equal(got[2][1:], want[2][1:])


def written(case) -> set[tuple[int, int]]:
    """(page, offset) of each live slot's write: its length, where inside its window."""
    table, lengths, p = case[5], case[6], case[3].shape[3]
    rows = set(live_rows(case).tolist())
    return {(int(table[s, n // p]), int(n % p)) for s, n in enumerate(lengths) if s in rows and n < table.shape[1] * p}


# (B, K, G, H, P, window, lengths, shared): G over the 1-4 register blocks (3: SmolLM2, 8: Llama 3 70B, 5: 4 + 1),
# head dims and page sizes that are and are not multiples of the vector blocks (P = 16 and 64 among them), lengths
# at 0, inside a page, on a page's last and first positions, on the window's last position and past the window
# (nothing written, all positions visible), idle rows (-1: all sink), and pages shared by two slots.
CASES = [
    (3, 3, 3, 64, 64, 2, [0, 70, 127], ()),
    (2, 1, 8, 128, 16, 3, [47, 5], ()),
    (2, 2, 5, 72, 24, 2, [23, 30], ()),
    (4, 2, 1, 64, 128, 1, [1, 64, 127, 500], ()),
    (1, 4, 2, 32, 32, 4, [100], ()),
    (5, 2, 3, 64, 16, 4, [15, 16, 31, 63, -1], ((1, 2, 1),)),
    (4, 2, 4, 64, 64, 3, [64, 191, 130, -1], ((1, 2, 2), (1, 0, 1))),
    (6, 1, 3, 32, 16, 6, [95, -1, 40, 96, 17, -1], ((0, 2, 2), (0, 4, 1))),
]


@pytest.mark.parametrize(("b", "k", "g", "h", "p", "window", "lengths", "shared"), CASES)
def test_kernel_matches_xla_decode_attention(b, k, g, h, p, window, lengths, shared):
    case = random_case(np.random.default_rng(0), b, k, g, h, p, window, lengths, shared=shared)
    got, want = kernel(case), run(paged_decode_attention_xla, case)
    assert_same(got, want, case)
    # each live slot's new K/V went exactly where its length points, and nowhere else outside the sink
    k_pool, v_pool, k_new, v_new = case[3], case[4], case[1], case[2]
    k_changed = (got[1] != k_pool).any(axis=(1, 2))  # [Np, P]
    assert {(int(pg), int(off)) for pg, off in zip(*np.nonzero(k_changed), strict=True) if pg} == written(case)
    for s in live_rows(case):
        n = case[6][s]
        if n < window * p:
            page, off = case[5][s, n // p], n % p
            np.testing.assert_array_equal(got[1][page, :, :, off], k_new[s])
            np.testing.assert_array_equal(got[2][page, :, off, :], v_new[s])
    np.testing.assert_array_equal((got[2] != v_pool).any(axis=(1, 3))[1:], k_changed[1:])


def poisoned(case, value=np.nan):
    """The case with every pool position no live slot may see (past each slot's length, pages no table names, the
    sink) set to `value`; the positions a slot writes are poisoned too (the write must come before the read)."""
    q, k_new, v_new, k_pool, v_pool, table, lengths = case
    p, w = k_pool.shape[3], table.shape[1]
    visible = np.zeros((k_pool.shape[0], p), bool)
    for s in live_rows(case):
        for pos in range(min(int(lengths[s]), w * p)):  # the position `length` itself is written, then read
            visible[table[s, pos // p], pos % p] = True
    k_pool, v_pool = k_pool.copy(), v_pool.copy()
    k_pool[np.broadcast_to(~visible[:, None, None, :], k_pool.shape)] = value
    v_pool[np.broadcast_to(~visible[:, None, :, None], v_pool.shape)] = value
    return q, k_new, v_new, k_pool, v_pool, table, lengths


@pytest.mark.parametrize("fn", ["kernel", "xla"])
@pytest.mark.parametrize(("b", "k", "g", "h", "p", "window", "lengths", "shared"), CASES[5:] + CASES[:2])
def test_positions_past_a_slots_length_are_never_read(fn, b, k, g, h, p, window, lengths, shared):
    """Stale pool contents (here NaN, and inf) past a slot's length, in pages no slot holds and in the sink change
    nothing: a finished sequence's old K/V, pages the next request has not reached yet, idle rows' writes."""
    attend = kernel if fn == "kernel" else lambda case: run(paged_decode_attention_xla, case)
    case = random_case(np.random.default_rng(1), b, k, g, h, p, window, lengths, shared=shared)
    clean = attend(case)
    rows = live_rows(case)
    for value in (np.nan, np.inf):
        out, k_out, v_out = attend(poisoned(case, value))
        assert np.isfinite(out[rows]).all()
        np.testing.assert_array_equal(out[rows], clean[0][rows])
        for s in rows:  # what was written is what the clean run wrote
            n = case[6][s]
            if n < window * p:
                page, off = case[5][s, n // p], n % p
                np.testing.assert_array_equal(k_out[page, :, :, off], clean[1][page, :, :, off])
                np.testing.assert_array_equal(v_out[page, :, off, :], clean[2][page, :, off, :])


def int8_case(case, hide=None):
    """The case with its pools as an int8 KV cache (see `kv_support.int8_pools`)."""
    q, k_new, v_new, k_pool, v_pool, table, lengths = case
    return q, k_new, v_new, *int8_pools(k_pool, v_pool, hide), table, lengths


def run_int8(fn, case):
    """(out, k_pool, v_pool) of `fn` jitted on an int8 case, the pools as Int8Pages of numpy arrays."""
    q, k_new, v_new, k_pool, v_pool, table, lengths = case
    pools = jax.tree.map(jnp.copy, (k_pool, v_pool))  # donated, as the engine donates them; the case stays whole
    out, k_out, v_out = jax.jit(fn, donate_argnums=(3, 4))(q, k_new, v_new, *pools, table, lengths)
    return np.asarray(out), jax.tree.map(np.asarray, k_out), jax.tree.map(np.asarray, v_out)


@pytest.mark.parametrize(("b", "k", "g", "h", "p", "window", "lengths", "shared"), CASES)
def test_int8_kernel_matches_xla_decode_attention(b, k, g, h, p, window, lengths, shared):
    """An int8 KV cache: the kernel reads the int8 values and their bfloat16 scales in place, and gives what XLA's
    formulation gives on the same pools (XLA writes the new K/V for both, so the pools come out bit-equal)."""
    kernels.load()
    case = int8_case(random_case(np.random.default_rng(3), b, k, g, h, p, window, lengths, shared=shared))
    got, want = run_int8(kernels.decode_attention, case), run_int8(paged_decode_attention_xla, case)
    rows = live_rows(case)
    np.testing.assert_allclose(got[0][rows], want[0][rows], rtol=2e-5, atol=2e-6)
    for a, b_ in ((got[1], want[1]), (got[2], want[2])):
        np.testing.assert_array_equal(a.values, b_.values)
        np.testing.assert_array_equal(a.scale, b_.scale)
    # not the float32 answer under another name: the int8 rounding shows, within its reach
    f32 = run(paged_decode_attention_xla, random_case(np.random.default_rng(3), b, k, g, h, p, window, lengths,
                                                       shared=shared))  # fmt: skip
    assert 0 < np.abs(got[0][rows] - f32[0][rows]).max() < 0.1


@pytest.mark.parametrize(("b", "k", "g", "h", "p", "window", "lengths", "shared"), CASES[5:] + CASES[:2])
def test_int8_kernel_never_reads_past_a_slots_length(b, k, g, h, p, window, lengths, shared):
    """NaN scales at every position no live slot may see (past each length, unheld pages, the sink) change nothing."""
    kernels.load()
    base = random_case(np.random.default_rng(4), b, k, g, h, p, window, lengths, shared=shared)
    table, lens = base[5], base[6]
    hide = np.ones((base[3].shape[0], p), bool)
    for s in live_rows(base):
        for pos in range(min(int(lens[s]), window * p)):  # the position `length` is written before the read
            hide[table[s, pos // p], pos % p] = False
    clean = run_int8(kernels.decode_attention, int8_case(base))
    out = run_int8(kernels.decode_attention, int8_case(base, hide))[0]
    rows = live_rows(base)
    assert np.isfinite(out[rows]).all()
    np.testing.assert_array_equal(out[rows], clean[0][rows])


def test_softmax_stays_exact_at_large_scores():
    """Scores far apart (softmax weights down to ~e-80, which the kernel's exp flushes to 0) and one dominant key."""
    q, *rest = random_case(np.random.default_rng(2), 2, 1, 3, 64, 64, 2, [100, 127])
    case = (q * 40.0, *rest)
    assert_same(kernel(case), run(paged_decode_attention_xla, case), case)


ENGINE_CONFIG = EngineConfig(
    num_slots=3, max_seq_len=128, max_prefill_len=32, min_prefill_len=16, page_size=32, decode_steps=4, dtype="float32"
)


def decode_three(config: EngineConfig, max_tokens: int, seed: int, **model: object):
    """(engine, greedy tokens, logprobs) of three requests on a tiny random model: a short one decoding alone first
    (a window of 1 page), then a 40-token prompt (prefilled in two chunks) and one sharing its first 36 tokens (one
    page shared through the prefix index, 4 positions copied from a cached page); decoding then runs through windows
    of 2 to 4 pages."""
    cfg = tiny_config(**model)
    eng = Engine(cfg, init_params(cfg, jnp.float32), config)
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=True)
    long = [int(t) for t in rng.integers(2, 256, 40)]
    prompts = [
        [int(t) for t in rng.integers(2, 256, 5)],
        long,
        [*long[:36], *(int(t) for t in rng.integers(2, 256, 5))],
    ]
    tokens, logprobs, cached = [[] for _ in range(3)], [], []

    def step() -> None:
        out = eng.generate()
        for s in range(3):
            tokens[s] += [int(t) for t, ok in zip(out.tokens[:, s], out.valid[:, s], strict=True) if ok]
        logprobs.append(np.where(out.valid, out.logprob, 0.0)[:, :3])

    for slot, prompt in enumerate(prompts):
        prefix = eng.prefill(prompt, params, seed=slot)
        cached.append(prefix.cached)
        eng.insert(prefix, slot)
        if slot == 0:
            step()
            step()
    assert cached == [0, 0, 36]
    while any(eng.slot_active(s) for s in range(3)):
        step()
    for s in range(3):
        eng.release(s)
    assert eng.pool.used == 0 and eng.pool.reserved == 0
    eng.pool.check()
    return eng, tokens, np.concatenate(logprobs)


def run_engine(attention: str) -> tuple[str, list[list[int]], np.ndarray]:
    eng, tokens, logprobs = decode_three(dataclasses.replace(ENGINE_CONFIG, attention=attention), 70, 3)
    return eng.attention, tokens, logprobs


def test_engine_decodes_the_same_with_the_kernel_and_with_xla():
    kind_k, tokens_k, logprobs_k = run_engine("kernel")
    kind_x, tokens_x, logprobs_x = run_engine("xla")
    assert (kind_k, kind_x) == ("kernel", "xla")
    assert all(len(t) == 69 for t in tokens_k)
    assert tokens_k == tokens_x
    np.testing.assert_allclose(logprobs_k, logprobs_x, atol=1e-4)


def test_auto_picks_the_kernel_on_cpu_in_float32_only():
    cfg = tiny_config()
    assert Engine(cfg, init_params(cfg, jnp.float32), ENGINE_CONFIG).attention == "kernel"
    bf16 = dataclasses.replace(ENGINE_CONFIG, dtype="bfloat16")
    assert Engine(cfg, init_params(cfg, jnp.bfloat16), bf16).attention == "xla"
    with pytest.raises(ValueError, match=r"takes float32.*attention='xla'"):
        Engine(cfg, init_params(cfg, jnp.bfloat16), dataclasses.replace(bf16, attention="kernel"))
    with pytest.raises(ValueError, match=f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got 'flash'"):
        dataclasses.replace(ENGINE_CONFIG, attention="flash")


def test_without_a_compiler_auto_warns_and_kernel_refuses(monkeypatch, caplog):
    def unavailable():
        raise kernels.KernelUnavailable("no C++ compiler found (set $CXX, or use --attention=xla)")

    monkeypatch.setattr(kernels, "load", unavailable)
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    cfg = tiny_config()
    with caplog.at_level(logging.WARNING, logger="engine.engine"):
        assert Engine(cfg, init_params(cfg, jnp.float32), ENGINE_CONFIG).attention == "xla"
    assert "no C++ compiler found" in caplog.text
    with pytest.raises(kernels.KernelUnavailable, match="no C\\+\\+ compiler"):
        Engine(cfg, init_params(cfg, jnp.float32), dataclasses.replace(ENGINE_CONFIG, attention="kernel"))


def test_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    """A fresh cache directory gets one library, named by the hash of what it was built from."""
    monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path))
    path = kernels.library_path(kernels.compiler())
    assert path.parent == tmp_path / "kernels" and not path.exists()
    kernels._build(kernels.compiler(), path)
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [path.name]


def test_pages_the_caller_keeps_are_left_alone():
    """Without donation XLA copies the pools before the kernel writes into them: the caller's arrays keep their
    contents, and the results still carry the new K/V."""
    case = random_case(np.random.default_rng(4), 2, 3, 3, 64, 64, 2, [5, 90])
    q, k_new, v_new, k_pool, v_pool, table, lengths = case
    kept = jax.device_put((k_pool, v_pool))
    kernels.load()
    out, k_out, v_out = jax.jit(kernels.decode_attention)(q, k_new, v_new, *kept, table, lengths)
    want = run(paged_decode_attention_xla, case)
    assert_same((np.asarray(out), np.asarray(k_out), np.asarray(v_out)), want, case)
    for x, original in zip(kept, (k_pool, v_pool), strict=True):
        np.testing.assert_array_equal(np.asarray(x), original)


PACKED = Packed(kernels.PANEL_ROWS, kernels.linear)


# (N, K, M): rows that do and do not fill the last panel, tokens through 64-token tiles, 16-token tiles and a last
# tile of whole vectors or partly zeros (1 to 4 vectors: M = 3, 17, 41, 47, 57 with either width), more tokens than
# one work item's block (256), SmolLM2's decode shapes and its W1 prompt (41 tokens); M = 1 (one-slot decode) has its
# own path: panels read flat in 48-float periods, with K x 6 a whole number of periods or not (the scalar tail).
@pytest.mark.parametrize(
    ("n", "k", "m"),
    [
        (7, 5, 3),
        (13, 32, 17),
        (13, 32, 47),
        (13, 32, 57),
        (960, 576, 41),
        (6, 64, 1),
        (13, 5, 1),
        (49, 37, 1),
        (960, 576, 1),
        (576, 1536, 1),
        (100, 48, 80),
        (12, 8, 600),
        (960, 576, 64),
        (576, 1536, 64),
    ],
)
def test_linear_kernel_matches_numpy(n, k, m):
    rng = np.random.default_rng(n * 1000 + m)
    w, x = rng.standard_normal((n, k), np.float32), rng.standard_normal((k, m), np.float32)
    residual = rng.standard_normal((n, m), np.float32)
    wp = PACKED.pack(jnp.asarray(w))
    assert wp.shape == (-(-n // 6), k, 6)
    np.testing.assert_array_equal(np.asarray(Packed.unpack(wp, n)), w)
    kernels.load()
    want = w.astype(np.float64) @ x.astype(np.float64)
    tol = dict(rtol=1e-5, atol=1e-5 * np.sqrt(k))
    got = np.asarray(jax.jit(kernels.linear, static_argnums=2)(wp, jnp.asarray(x), n))
    assert got.shape == (n, m)
    np.testing.assert_allclose(got, want, **tol)
    with_residual = jax.jit(lambda w, x, r: kernels.linear(w, x, n, residual=r), donate_argnums=2)
    np.testing.assert_allclose(
        np.asarray(with_residual(wp, jnp.asarray(x), jnp.asarray(residual))), want + residual, **tol
    )
    # gated: w's rows as a gate and an up weight of n // 2 rows each; y = silu(gate x) * (up x)
    f = n // 2
    if f:
        gp = PACKED.pack_gated(jnp.asarray(w[: 2 * f]))
        assert gp.shape == (-(-f // 3), k, 6)
        np.testing.assert_array_equal(np.asarray(Packed.unpack_gated(gp, f)), w[: 2 * f])
        # each row sums in the same order as in the plain product: only the epilogue's silu may round differently
        plain = np.asarray(kernels.linear(PACKED.pack(jnp.asarray(w[: 2 * f])), jnp.asarray(x), 2 * f), np.float64)
        gate, up = plain[:f], plain[f:]
        swiglu = gate / (1 + np.exp(-gate)) * up
        got = np.asarray(jax.jit(lambda w, x: kernels.linear(w, x, f, gated=True))(gp, jnp.asarray(x)))
        np.testing.assert_allclose(got, swiglu, rtol=1e-5, atol=1e-6 * np.abs(swiglu).max())


@pytest.mark.parametrize(("n", "k"), [(49, 37), (960, 576)])
def test_one_token_product_is_the_same_with_and_without_prefetching(n, k):
    """The one-token product's loop compiled both ways (the engine picks one per model and machine): the same bits,
    plain, with a residual and gated."""
    kernels.load()
    rng = np.random.default_rng(n)
    w, x, r = (rng.standard_normal(s, np.float32) for s in ((n, k), (k, 1), (n, 1)))
    wp, gp, f = PACKED.pack(jnp.asarray(w)), PACKED.pack_gated(jnp.asarray(w[: n // 2 * 2])), n // 2

    def products(prefetch):
        return jax.jit(
            lambda wp, gp, x, r: (
                kernels.linear(wp, x, n, prefetch=prefetch),
                kernels.linear(wp, x, n, residual=r, prefetch=prefetch),
                kernels.linear(gp, x, f, gated=True, prefetch=prefetch),
            )
        )

    runs = {on: [np.asarray(y) for y in products(on)(wp, gp, jnp.asarray(x), jnp.asarray(r))] for on in (False, True)}
    for a, b in zip(runs[False], runs[True], strict=True):
        np.testing.assert_array_equal(a, b)
    want = w.astype(np.float64) @ x.astype(np.float64)
    np.testing.assert_allclose(runs[False][0], want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_prefetch_is_probed_once_per_model_or_forced(tmp_path, monkeypatch):
    """The probe streams a model's one-token products with and without prefetching and keeps what it measured beside
    the library, per thread count and shapes; asking again reads it back, other shapes probe again; a malformed file
    is probed again; a cache that cannot be written costs only a warning; a small model is not probed;
    $MESHSERVE_KERNEL_PREFETCH overrides it, and a bad value is refused."""
    kernels.load()
    lib = kernels._loaded[0]
    monkeypatch.setattr(kernels, "_loaded", (lib, tmp_path / "meshserve_kernels-test.so"))
    monkeypatch.setattr(kernels, "PROBE_BYTES", 8 << 20)
    monkeypatch.setattr(kernels, "PROBE_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(kernels, "PROBE_ROUNDS", 3)
    monkeypatch.delenv(kernels.PREFETCH_ENV, raising=False)
    smollm2 = tiny_config(
        dim=576, num_heads=9, num_kv_heads=3, head_dim=64, mlp_dim=1536, num_layers=30, vocab_size=49152
    )
    model = one_token_products(smollm2, kernels.PANEL_ROWS)  # qkv, o, gated gate/up, down per layer; the head
    assert model == [(160, 576, 30), (96, 576, 30), (512, 576, 30), (96, 1536, 30), (8192, 576, 1)]
    probed = kernels.one_token_prefetch(model)
    assert probed["source"] == "probe" and probed["gb_s_without"] > 0 and probed["gb_s_with"] > 0
    assert probed["prefetch"] == (probed["gb_s_with"] > kernels.PREFETCH_MARGIN * probed["gb_s_without"])
    (cache,) = tmp_path.glob(f"meshserve_kernels-test.prefetch-{probed['threads']}t-*.json")
    assert json.loads(cache.read_text()) == probed

    def no_probe(lib, threads, products, int8):
        raise AssertionError("probed twice")

    with monkeypatch.context() as m:
        m.setattr(kernels, "_probe_prefetch", no_probe)
        assert kernels.one_token_prefetch(model) == probed
        with pytest.raises(AssertionError, match="probed twice"):  # other shapes: their own probe
            kernels.one_token_prefetch([(96, 1024, 30)])
    # decided again from the kept measurements with today's margin
    monkeypatch.setattr(kernels, "PREFETCH_MARGIN", probed["gb_s_with"] / probed["gb_s_without"] * 2)
    assert kernels.one_token_prefetch(model) == {**probed, "prefetch": False}
    monkeypatch.setattr(kernels, "PREFETCH_MARGIN", probed["gb_s_with"] / probed["gb_s_without"] / 2)
    assert kernels.one_token_prefetch(model) == {**probed, "prefetch": True}
    cache.write_text('{"prefetch": "yes"}')  # not a probe's result: probed again and rewritten
    assert kernels.one_token_prefetch(model)["source"] == "probe"
    assert json.loads(cache.read_text())["source"] == "probe"
    cache.unlink()
    missing = tmp_path / "missing"  # no such directory: no lock, no cache file, still a choice
    with monkeypatch.context() as m:
        m.setattr(kernels, "_loaded", (lib, missing / "meshserve_kernels-test.so"))
        assert kernels.one_token_prefetch(model)["source"] == "probe" and not missing.exists()
    monkeypatch.setattr(kernels.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(OSError("read-only")))
    assert kernels.one_token_prefetch(model)["source"] == "probe" and not cache.exists()  # a warning, still chosen
    int8 = kernels.one_token_prefetch(one_token_products(smollm2, kernels.INT8_PANEL_ROWS), int8=True)
    assert int8["source"] == "probe" and int8["gb_s_without"] > 0 and int8["gb_s_with"] > 0  # the int8 loop's own
    small = kernels.one_token_prefetch([(16, 64, 2)])
    assert small["prefetch"] is False and small["source"].startswith("not probed")
    for value in ("on", "off"):
        monkeypatch.setenv(kernels.PREFETCH_ENV, value)
        assert kernels.one_token_prefetch(model) == {"prefetch": value == "on", "source": kernels.PREFETCH_ENV}
    monkeypatch.setenv(kernels.PREFETCH_ENV, "yes")
    with pytest.raises(ValueError, match="MESHSERVE_KERNEL_PREFETCH must be 'on' or 'off', got 'yes'"):
        kernels.one_token_prefetch(model)
    with pytest.raises(ValueError, match="triples of positive sizes"):
        kernels.one_token_prefetch([(0, 576, 1)])


def test_linear_kernel_rejects_mismatched_shapes():
    kernels.load()
    wp = jnp.zeros((2, 8, 6), jnp.float32)
    with pytest.raises(ValueError, match=r"cannot multiply a packed weight \(2, 8, 6\) \(N=13, gated=False\)"):
        kernels.linear(wp, jnp.zeros((8, 4), jnp.float32), 13)  # 13 rows need 3 panels
    with pytest.raises(ValueError, match="cannot multiply"):
        kernels.linear(wp, jnp.zeros((9, 4), jnp.float32), 12)
    with pytest.raises(ValueError, match="cannot multiply"):
        kernels.linear(wp, jnp.zeros((8, 4), jnp.float32), 12, gated=True)  # 12 gated rows need 4 panels
    with pytest.raises(ValueError, match=r"the residual must be \(12, 4\)"):
        kernels.linear(wp, jnp.zeros((8, 4), jnp.float32), 12, residual=jnp.zeros((12, 5), jnp.float32))
    with pytest.raises(TypeError, match="float32"):
        kernels.linear(wp.astype(jnp.bfloat16), jnp.zeros((8, 4), jnp.bfloat16), 12)


def run_packed(linear: str, num_slots: int, **model: object):
    return decode_three(dataclasses.replace(ENGINE_CONFIG, num_slots=num_slots, linear=linear), 40, 5, **model)


# decode through the padded tail and through one 16-token tile; an untied head with q/k/v biases (Qwen2) and a
# head tied to the embedding (SmolLM2), whose rows the model then gathers from the packed head
@pytest.mark.parametrize(("num_slots", "model"), [(3, {}), (16, {}), (16, {"tie_embeddings": True, "qkv_bias": True})])
def test_engine_decodes_the_same_with_packed_weights_and_with_xla_dots(num_slots, model):
    eng_k, tokens_k, logprobs_k = run_packed("kernel", num_slots, **model)
    eng_x, tokens_x, logprobs_x = run_packed("xla", num_slots, **model)
    assert (eng_k.linear, eng_x.linear) == ("kernel", "xla")
    assert "wqkv_packed" in eng_k.params["layer_0"] and "wqkv" not in eng_k.params["layer_0"]
    assert all(len(t) == 39 for t in tokens_k)
    assert tokens_k == tokens_x
    np.testing.assert_allclose(logprobs_k, logprobs_x, atol=1e-4)
    # the packed copy unpacks to exactly the weights the XLA engine runs
    cfg = eng_k.model_config
    for name, a in unfuse_layer(eng_x.params["layer_1"], cfg).items():
        np.testing.assert_array_equal(np.asarray(unfuse_layer(eng_k.params["layer_1"], cfg)[name]), a)
    head = "embed_packed" if cfg.tie_embeddings else "lm_head_packed"
    assert head in eng_k.params
    top = {k: v for k, v in eng_k.params.items() if not k.startswith("layer_")}
    for name, a in unpack_head(top, cfg).items():
        np.testing.assert_array_equal(np.asarray(a), eng_x.params[name])


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_an_engine_chooses_prefetching_for_its_model_and_decodes_the_same_either_way(quantize, monkeypatch):
    """At one slot every product is a one-token one (and at any slot count a prefill's head): the engine asks
    kernels.one_token_prefetch for its model and weight format (a tiny model is not probed: off), hands the answer
    to its products, and a forced choice decodes the same tokens and log-probabilities, bit for bit. An engine on
    XLA's products asks nothing."""
    cfg = tiny_config()
    params = init_params(cfg, jnp.float32)
    sampling = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=True)
    prompt = [int(t) for t in np.random.default_rng(5).integers(2, 256, 11)]

    def decode() -> tuple[dict | None, list[int], list[float]]:
        config = dataclasses.replace(ENGINE_CONFIG, num_slots=1, linear="kernel", quantize=quantize)
        eng = Engine(cfg, params, config)
        eng.insert(eng.prefill(prompt, sampling, seed=0), 0)
        tokens, logprobs = [], []
        while True:
            out = eng.generate()
            tokens += [int(t) for t, ok in zip(out.tokens[:, 0], out.valid[:, 0], strict=True) if ok]
            logprobs += [float(p) for p, ok in zip(out.logprob[:, 0], out.valid[:, 0], strict=True) if ok]
            if not out.active.any():
                assert eng.model.packed.product.keywords == {"prefetch": eng.kernel_prefetch["prefetch"]}
                return eng.kernel_prefetch, tokens, logprobs

    monkeypatch.delenv(kernels.PREFETCH_ENV, raising=False)
    choice, tokens, logprobs = decode()
    assert choice["prefetch"] is False and choice["source"].startswith("not probed")
    monkeypatch.setenv(kernels.PREFETCH_ENV, "on")
    choice_on, tokens_on, logprobs_on = decode()
    assert choice_on == {"prefetch": True, "source": kernels.PREFETCH_ENV}
    assert len(tokens) == 23 and tokens_on == tokens and logprobs_on == logprobs
    assert Engine(cfg, params, dataclasses.replace(ENGINE_CONFIG, num_slots=16, linear="kernel")).kernel_prefetch == {
        "prefetch": True,
        "source": kernels.PREFETCH_ENV,
    }
    assert Engine(cfg, params, dataclasses.replace(ENGINE_CONFIG, num_slots=2, linear="xla")).kernel_prefetch is None


def test_auto_packs_weights_at_one_slot_and_from_16_slots_on_one_cpu_device_in_float32():
    cfg = tiny_config()
    params = init_params(cfg, jnp.float32)
    assert Engine(cfg, params, dataclasses.replace(ENGINE_CONFIG, num_slots=1)).linear == "kernel"
    assert Engine(cfg, params, dataclasses.replace(ENGINE_CONFIG, num_slots=2)).linear == "xla"
    assert Engine(cfg, params, dataclasses.replace(ENGINE_CONFIG, num_slots=15)).linear == "xla"
    assert Engine(cfg, params, dataclasses.replace(ENGINE_CONFIG, num_slots=16)).linear == "kernel"
    bf16 = dataclasses.replace(ENGINE_CONFIG, num_slots=16, dtype="bfloat16")
    assert Engine(cfg, init_params(cfg, jnp.bfloat16), bf16).linear == "xla"
    with pytest.raises(ValueError, match=r"linear='kernel' cannot be used here: it takes float32.*linear='xla'"):
        Engine(cfg, init_params(cfg, jnp.bfloat16), dataclasses.replace(bf16, linear="kernel"))
    with pytest.raises(ValueError, match="linear must be one of auto, kernel, xla"):
        dataclasses.replace(ENGINE_CONFIG, linear="onednn")
