"""Engine tests on a tiny random model: prefill + paged decode against a full forward, slot isolation in the shared
page pool, seeds, continuous batching, chunked prefill, prefix reuse through the page pool (hits, follow-up turns,
copies of a partly matching page, evictions, failures), compile-free serving after warm-up, bfloat16, the sampler on
hand-made logits, stops, logprobs and input validation.

One warmed engine is shared by the module (float32, 4 slots of 128 positions, pages of 32 positions in a pool of
4 * 4 + 1 pages, prefill calls of 16, 24 and 32 tokens, 4 decode steps per dispatch); every test that uses it starts
from `reset()` (an empty pool, every slot free) and must leave the pool's bookkeeping consistent.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import monitoring

from engine import compile as step_compile
from engine import prefill
from engine.config import tiny_config
from engine.engine import CapacityError, Engine, EngineConfig, Prefix
from engine.model import init_params
from engine.sampling import SamplingParams, SlotSampling, _filter_logits, argmax, sample
from engine.scheduler import FINISH_LENGTH, FINISH_STOP, Request, RequestOutput, Scheduler
from engine.tokenizer import make_tiny_tokenizer
from sharding.rules import single_device_mesh

ENGINE_CONFIG = EngineConfig(
    num_slots=4, max_seq_len=128, max_prefill_len=32, min_prefill_len=16, page_size=32, decode_steps=4, dtype="float32"
)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Seeded random prompts (ids 2..255: never BOS 0 or EOS 1), reused across tests so they read the same model paths.
_RNG = np.random.default_rng(1234)
PROMPTS = {n: [int(t) for t in _RNG.integers(2, 256, n)] for n in (1, 3, 5, 8, 12, 16, 17, 20, 25, 30, 32, 100)}
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def raw_params():
    """The tiny model's weights in the checkpoint's per-layer layout (every engine of the module builds from them)."""
    return init_params(tiny_config(), jnp.float32)


@pytest.fixture(scope="module")
def engine(raw_params) -> Engine:
    eng = Engine(tiny_config(), raw_params, ENGINE_CONFIG)
    eng.warmup()
    return eng


@pytest.fixture(autouse=True)
def fresh_engine(request):
    """A test using the module's engine starts from an empty pool with every slot free, and leaves the pool's
    bookkeeping consistent."""
    if "engine" not in request.fixturenames:
        yield
        return
    eng = request.getfixturevalue("engine")
    eng.reset()
    yield
    eng.pool.check()


@pytest.fixture(scope="module")
def off_engine(raw_params) -> Engine:
    """The module's engine shapes with the prefix cache off."""
    return Engine(tiny_config(), raw_params, dataclasses.replace(ENGINE_CONFIG, prefix_caching=False))


@pytest.fixture(scope="module")
def full_logits(engine):
    """tokens -> logits [len, V] of one full causal forward (padded to max_seq_len: one compile, causal = exact)."""
    s = engine.config.max_seq_len
    fn = jax.jit(lambda p, t: engine.model.apply({"params": p}, t, jnp.arange(s, dtype=jnp.int32)[None])[0][0])

    def run(tokens: list[int]) -> np.ndarray:
        padded = np.zeros((1, s), np.int32)
        padded[0, : len(tokens)] = tokens
        return np.asarray(fn(engine.params, padded))[: len(tokens)]

    return run


@dataclasses.dataclass
class SlotRun:
    """What the engine produced for one slot: tokens, and per token (logprob, top ids, top logprobs) if asked; and
    how many prompt tokens came from cached pages."""

    tokens: list[int]
    logprobs: list[tuple[float, list[int], list[float]]]
    cached: int = 0


def admit(engine: Engine, slot: int, prompt, params: SamplingParams, seed: int, runs: dict) -> Prefix:
    """Prefills `prompt` and arms the (free) `slot` with it, unless its first token already ends it."""
    prefix = engine.prefill(prompt, params, seed)
    lp = prefix.logprobs
    first = [] if lp is None else [(lp.logprob, [i for i, _ in lp.top], [x for _, x in lp.top])]
    runs[slot] = SlotRun([prefix.token], first, prefix.cached)
    if not prefix.finished:
        engine.insert(prefix, slot)
    return prefix


def decode(engine: Engine, runs: dict[int, SlotRun], dispatches: int | None = None) -> None:
    """Runs `generate` until no slot is active (or `dispatches` times), appending each slot's tokens to `runs`."""
    n = 0
    while any(engine.slot_active(s) for s in range(engine.config.num_slots)) and (dispatches is None or n < dispatches):
        out = engine.generate()
        n += 1
        for slot, run in runs.items():
            for t in np.flatnonzero(out.valid[:, slot]):
                run.tokens.append(int(out.tokens[t, slot]))
                run.logprobs.append(
                    (float(out.logprob[t, slot]), out.top_ids[t, slot].tolist(), out.top_logprobs[t, slot].tolist())
                )


def release_all(engine: Engine) -> None:
    for slot in range(engine.config.num_slots):
        engine.release(slot)


def run_alone(engine: Engine, prompt, params: SamplingParams, seed: int = 0, slot: int = 0) -> SlotRun:
    """The request alone on the engine: every slot released first (their pages stay cached), its own after."""
    release_all(engine)
    runs: dict[int, SlotRun] = {}
    admit(engine, slot, prompt, params, seed, runs)
    decode(engine, runs)
    engine.release(slot)
    return runs[slot]


def cold(engine: Engine, prompt, params: SamplingParams, seed: int = 0) -> SlotRun:
    """The request alone, computed in full (the prefix cache emptied first)."""
    release_all(engine)
    engine.clear_prefix_cache()
    run = run_alone(engine, prompt, params, seed)
    assert run.cached == 0
    return run


def assert_same_run(got: SlotRun, want: SlotRun) -> None:
    """The same tokens, and the same logprobs (the token's, the top ids and their values) within LOGPROB_TOL."""
    assert got.tokens == want.tokens
    assert len(got.logprobs) == len(want.logprobs) == len(want.tokens)
    for (lp, ids, top), (lp_w, ids_w, top_w) in zip(got.logprobs, want.logprobs, strict=True):
        np.testing.assert_allclose(lp, lp_w, atol=LOGPROB_TOL)
        assert ids == ids_w
        np.testing.assert_allclose(top, top_w, atol=LOGPROB_TOL)


def greedy_reference(full_logits, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each the argmax of a full forward over everything so far."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(full_logits(seq)[-1])))
    return seq[len(prompt) :]


def assert_matches_full_forward(run: SlotRun, prompt: list[int], full_logits, n_top: int = 5) -> None:
    """A greedy run's tokens are the full forward's, and its top-n logprobs match the full forward's logits at every
    position (the first token's from prefill, the rest from decode)."""
    expected = greedy_reference(full_logits, prompt, len(run.tokens))
    if run.tokens != expected:
        i = next(i for i, (a, b) in enumerate(zip(run.tokens, expected, strict=True)) if a != b)
        top2 = np.sort(full_logits(prompt + expected[:i])[-1])[-2:]
        pytest.fail(f"first divergence at generated token {i}: {run.tokens[i]} vs {expected[i]}, top-2 gap {top2}")
    logits = full_logits(prompt + run.tokens[:-1])[len(prompt) - 1 :]
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    top_ids = np.array([ids[:n_top] for _, ids, _ in run.logprobs])  # decode rows carry all MAX_LOGPROBS
    top_lps = np.array([lps[:n_top] for _, _, lps in run.logprobs])
    np.testing.assert_array_equal(top_ids[:, 0], run.tokens)
    np.testing.assert_allclose(top_lps, np.take_along_axis(ref, top_ids, axis=-1), atol=LOGPROB_TOL)
    np.testing.assert_allclose([lp for lp, _, _ in run.logprobs], ref[np.arange(len(run.tokens)), run.tokens],
                               atol=LOGPROB_TOL)  # fmt: skip


def pool_pages(engine: Engine, pages: list[int]) -> list[np.ndarray]:
    """The contents of `pages` in every layer's key and value pool."""
    return [np.asarray(pool)[np.asarray(pages, np.int32)] for pool in (*engine.state.k, *engine.state.v)]


# ----- prefill + decode == full forward ---------------------------------------------------------------------------


def test_greedy_decode_matches_full_forward(engine, full_logits):
    # 20 prompt + 90 generated tokens: crosses pages 1 -> 2 -> 3 -> 4, so every decode window (1 to 4 pages) runs
    prompt = PROMPTS[20]
    run = run_alone(engine, prompt, SamplingParams(max_tokens=90, ignore_eos=True, logprobs=5))
    assert len(run.tokens) == 90
    assert_matches_full_forward(run, prompt, full_logits)


@pytest.mark.parametrize("attention", ["kernel", "xla"])
def test_model_decode_step_matches_full_forward(engine, full_logits, attention):
    """The model's decode path (one pool per layer, a page table per slot, per-slot lengths) writes each slot's new K/V
    at its length through its table, then attends to positions <= length: it gives the full forward's logits at that
    position, and changes nothing else in the pools."""
    c, p = engine.model_config, engine.config.page_size
    assert engine.attention == "kernel"
    model = engine.model if attention == "kernel" else engine.model.clone(attend=None)  # the XLA formulation
    seqs = [PROMPTS[30] + PROMPTS[32], PROMPTS[12] + PROMPTS[25] + PROMPTS[25]]  # 62 tokens each
    lengths = np.array([9, 40], np.int32)  # slot 1 attends across a page boundary
    # shuffled page ids; entries past a slot's pages name other pages (a sink, a stranger), which must not be read
    table = np.array([[5, 2, 0], [3, 6, 1]], np.int32)
    tokens = np.array(seqs, np.int32)
    # the pools hold the full forward's K/V of *all* 62 positions: positions > length must be masked out ...
    _, kv = engine.model.apply({"params": engine.params}, tokens, np.arange(62)[None].repeat(2, 0))
    rng = np.random.default_rng(5)
    pools = []
    for k, v in kv:  # [B, T, K, H]
        k_pool = rng.standard_normal((7, c.num_kv_heads, c.head_dim, p)).astype(np.float32)
        v_pool = rng.standard_normal((7, c.num_kv_heads, p, c.head_dim)).astype(np.float32)
        for b in range(2):
            for pos in range(62):
                k_pool[table[b, pos // p], :, :, pos % p] = k[b, pos]
                v_pool[table[b, pos // p], :, pos % p, :] = v[b, pos]
            # ... and garbage at position `length` itself: the model must overwrite it before attending
            k_pool[table[b, lengths[b] // p], :, :, lengths[b] % p] = 1e3
            v_pool[table[b, lengths[b] // p], :, lengths[b] % p, :] = -1e3
        pools.append((k_pool, v_pool))
    step_tokens = tokens[np.arange(2), lengths][:, None]
    step = jax.jit(
        lambda params, t, pos, pools, table, lengths: model.apply(
            {"params": params}, t, pos, pool=pools, table=table, lengths=lengths
        )
    )
    logits, new_pools = step(engine.params, step_tokens, lengths[:, None], tuple(pools), table, lengths)
    assert logits.shape == (2, 1, c.vocab_size)
    for b in range(2):
        expected = full_logits(seqs[b][: lengths[b] + 1])[-1]
        np.testing.assert_allclose(np.asarray(logits[b, 0]), expected, atol=1e-4)
    # the updated pools hold the full forward's K/V at each slot's length, and nothing else changed
    at_length = np.zeros((7, p), bool)
    at_length[table[np.arange(2), lengths // p], lengths % p] = True
    for layer in range(c.num_layers):
        (k_old, v_old), (k_new, v_new) = pools[layer], (np.asarray(x) for x in new_pools[layer])
        for b, n in enumerate(lengths):
            page, off = table[b, n // p], n % p
            np.testing.assert_allclose(k_new[page, :, :, off], np.asarray(kv[layer][0][b, n]), atol=1e-5)
            np.testing.assert_allclose(v_new[page, :, off, :], np.asarray(kv[layer][1][b, n]), atol=1e-5)
        np.testing.assert_array_equal((k_new != k_old).any(axis=(1, 2)), at_length)
        np.testing.assert_array_equal((v_new != v_old).any(axis=(1, 3)), at_length)


# ----- slot isolation ---------------------------------------------------------------------------------------------


def test_insert_leaves_other_slots_untouched(engine):
    runs: dict[int, SlotRun] = {}
    for slot, n in enumerate((30, 5, 17, 25)):
        admit(engine, slot, PROMPTS[n], SamplingParams(max_tokens=40, ignore_eos=True), slot, runs)
    decode(engine, runs, dispatches=3)  # the other slots' pages now hold decoded tokens too
    others = [0, 1, 3]
    pages = {b: engine.slot_pages(b) for b in others}
    before = {b: pool_pages(engine, pages[b]) for b in others}
    lengths_before = np.asarray(engine.state.lengths)
    free_before = list(engine.pool._free)
    contents_before = pool_pages(engine, list(range(engine.pool.num_pages)))
    engine.release(2)
    admit(engine, 2, PROMPTS[32], SamplingParams(max_tokens=8), 9, runs)
    mine = engine.slot_pages(2)
    assert mine and set(mine).isdisjoint(pg for b in others for pg in pages[b])
    for b in others:
        assert engine.slot_pages(b) == pages[b]
        for x, y in zip(before[b], pool_pages(engine, pages[b]), strict=True):
            np.testing.assert_array_equal(y, x)  # bitwise: the prefill wrote only slot 2's pages
    after = pool_pages(engine, list(range(engine.pool.num_pages)))
    changed = set()
    for x, y in zip(contents_before, after, strict=True):
        changed |= set(np.flatnonzero((x != y).reshape(len(x), -1).any(axis=1)).tolist())
    assert mine[0] in changed and changed <= {*mine, 0}  # slot 2's own pages were written, and the sink (padding)
    assert set(mine) <= set(free_before)  # fresh pages: the released ones stay cached
    np.testing.assert_array_equal(np.asarray(engine.state.lengths)[others], lengths_before[others])
    assert int(engine.state.lengths[2]) == 32
    release_all(engine)
    assert engine.pool.used == 0 and engine.pool.reserved == 0


@pytest.mark.parametrize("next_request", ["unrelated", "follow-up"])
def test_freed_slot_leaks_nothing_into_the_next_request(engine, next_request):
    """A released slot's pages go back to the pool (cached, or free) and are handed out again. Whatever such a page
    holds where the next request must not look (here NaN: every free page, every cached page it does not match, the
    sink, and the positions of a partly matching page past the match) changes nothing: its tokens and logprobs are
    bit-identical to those of a clean run."""
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3)

    def scenario(poison: bool) -> SlotRun:
        engine.reset()
        runs: dict[int, SlotRun] = {}
        admit(engine, 0, PROMPTS[30], SamplingParams(max_tokens=90, ignore_eos=True), 1, runs)
        decode(engine, runs)
        assert len(runs[0].tokens) == 90  # slot 0's pages are now full of another request's K/V
        history = PROMPTS[30] + runs[0].tokens
        engine.release(0)
        prompt = PROMPTS[5] if next_request == "unrelated" else [*history[:50], 7, 8, 9]
        if poison:
            match = engine.pool.match(prompt, limit=len(prompt) - 1)
            keep = {*match.pages, match.copy_from}
            assert all(engine.pool.refs[pg] == 0 for pg in range(engine.pool.num_pages))  # no page is held
            bad = jnp.asarray([pg for pg in range(engine.pool.num_pages) if pg not in keep], jnp.int32)
            assert len(bad) == engine.pool.num_pages - len(keep - {None})
            k, v = engine.state.k, engine.state.v
            k, v = tuple(x.at[bad].set(jnp.nan) for x in k), tuple(x.at[bad].set(jnp.nan) for x in v)
            if match.copy_from is not None:  # and the positions of the partly matching page past the match
                n = match.copy_tokens
                k = tuple(x.at[match.copy_from, :, :, n:].set(jnp.nan) for x in k)
                v = tuple(x.at[match.copy_from, :, n:, :].set(jnp.nan) for x in v)
            engine._state = engine.state.replace(k=k, v=v)  # a test-only reach into the engine's device state
        runs = {}
        admit(engine, 0, prompt, params, 3, runs)
        decode(engine, runs)
        engine.release(0)
        return runs[0]

    got = scenario(poison=True)
    if next_request == "unrelated":
        engine.reset()
        want = run_alone(engine, PROMPTS[5], params, seed=3)
        assert got.cached == want.cached == 0
    else:
        want = scenario(poison=False)
        assert got.cached == want.cached == 50  # one page shared, 18 positions copied from the freed slot's pages
    assert got.tokens == want.tokens
    assert got.logprobs == want.logprobs  # bit-identical: stale positions are never read, not just down-weighted
    assert all(np.isfinite(lp) for lp, _, _ in got.logprobs)


# ----- seeds ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.3, seed=77, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1.3, top_k=40, top_p=0.9, min_p=0.2, seed=77, max_tokens=24, ignore_eos=True),
    ],
    ids=["plain", "filtered"],
)
def test_seed_reproducible_across_slots_and_companions(engine, params):
    prompt = PROMPTS[12]
    alone = run_alone(engine, prompt, params, seed=params.seed, slot=0)

    runs: dict[int, SlotRun] = {}
    companions = [
        (PROMPTS[30], SamplingParams(max_tokens=50, ignore_eos=True)),
        (PROMPTS[3], SamplingParams(temperature=0.7, top_k=5, max_tokens=9, ignore_eos=True)),
        (PROMPTS[12], SamplingParams(temperature=1.3, seed=78, max_tokens=60, ignore_eos=True)),
    ]
    for slot, (p, sp) in enumerate(companions):
        admit(engine, slot, p, sp, 100 + slot, runs)
    decode(engine, runs, dispatches=2)  # join mid-batch, at a different decode window
    admit(engine, 3, prompt, params, params.seed, runs)
    decode(engine, runs)
    assert runs[3].tokens == alone.tokens
    # the seed matters: the same prompt with another seed (slot 2) goes elsewhere
    other = run_alone(engine, prompt, dataclasses.replace(params, seed=params.seed + 1))
    assert other.tokens != alone.tokens


# ----- continuous batching ----------------------------------------------------------------------------------------


def collect(scheduler: Scheduler, requests: list[tuple[list[int], SamplingParams]], prefix: str = "r"):
    outputs: dict[str, list[RequestOutput]] = {}
    for i, (prompt, params) in enumerate(requests):
        rid = f"{prefix}{i}"
        scheduler.submit(Request(rid, prompt, params, lambda o: outputs.setdefault(o.request_id, []).append(o)))
    return outputs


def summary(outs: list[RequestOutput]) -> tuple[list[int], str, str | None]:
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1].finish_reason


def test_continuous_batching_matches_one_at_a_time(engine):
    tok = make_tiny_tokenizer()
    lengths = (3, 30, 12, 17, 1, 25, 8, 20)
    max_tokens = (20, 9, 60, 5, 33, 14, 70, 40)
    requests = [
        (PROMPTS[n], SamplingParams(max_tokens=m, ignore_eos=True)) for n, m in zip(lengths, max_tokens, strict=True)
    ]
    scheduler = Scheduler(engine, tok, prefills_per_step=2)
    batched = collect(scheduler, requests)
    scheduler.run_until_idle(max_steps=500)
    for i, req in enumerate(requests):
        one = collect(scheduler, [req], prefix=f"alone{i}-")
        scheduler.run_until_idle(max_steps=500)
        tokens, text, reason = summary(batched[f"r{i}"])
        assert (tokens, text, reason) == summary(one[f"alone{i}-0"])
        assert len(tokens) == req[1].max_tokens and reason == FINISH_LENGTH
    assert engine.pool.used == 0 and engine.pool.reserved == 0


def test_dispatch_length_is_a_runtime_argument(engine):
    """generate(steps) runs `steps` tokens per slot with the same program; mixed lengths give the same tokens."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    full = run_alone(engine, PROMPTS[12], params)
    runs: dict[int, SlotRun] = {}
    admit(engine, 1, PROMPTS[12], params, 0, runs)
    lengths = []
    for steps in (1, 3, 1, 4, 2, 4, 4, 4, 4, 4):
        out = engine.generate(steps)
        assert not out.valid[steps:].any()  # rows past `steps` carry nothing
        lengths.append(int(out.valid[:, 1].sum()))
        runs[1].tokens += [int(t) for t in out.tokens[out.valid[:, 1], 1]]
    assert runs[1].tokens == full.tokens
    assert lengths[:6] == [1, 3, 1, 4, 2, 4]
    for bad in (0, engine.config.decode_steps + 1):
        with pytest.raises(ValueError, match="steps must be in"):
            engine.generate(bad)
    engine.release(1)


def test_short_dispatches_while_a_slot_is_free(engine):
    tok = make_tiny_tokenizer()
    requests = [
        (PROMPTS[n], SamplingParams(max_tokens=m, ignore_eos=True))
        for n, m in ((3, 20), (12, 9), (25, 30), (8, 14), (1, 7), (17, 11))
    ]
    reference = Scheduler(engine, tok, prefills_per_step=2)
    want = collect(reference, requests)
    reference.run_until_idle(max_steps=500)
    scheduler = Scheduler(engine, tok, prefills_per_step=2, free_slot_decode_steps=1)
    got = collect(scheduler, requests)
    plans = []
    while scheduler.has_work() and len(plans) < 500:
        plans.append(scheduler.step())
    # 6 requests, 4 slots: short dispatches until the slots fill, full ones while all are busy, short as they free
    kinds = [p.decode_steps for p in plans if p.decode]
    assert kinds[0] == 1 and None in kinds and kinds[-1] == 1
    assert {k: summary(v) for k, v in got.items()} == {k: summary(v) for k, v in want.items()}
    with pytest.raises(ValueError, match="free_slot_decode_steps"):
        Scheduler(engine, tok, free_slot_decode_steps=engine.config.decode_steps + 1)


# ----- packed and chunked prefill ---------------------------------------------------------------------------------


def test_packs_respect_length_and_row_limits(engine, raw_params):
    # max_prefill_len 32: 8 prompts per call at most; a pack closes when the next prompt would overflow either
    assert engine.packs([30, 3, 32, 1, 1, 1, 1, 1, 1, 1, 1, 1, 20, 13]) == [
        [0], [1], [2], [3, 4, 5, 6, 7, 8, 9, 10], [11, 12], [13],
    ]  # fmt: skip
    # a call of T >= 64 tokens takes up to T // 8 prompts (16 at 128), within prefill_segments
    config = dataclasses.replace(ENGINE_CONFIG, max_prefill_len=128, prefill_segments=12)
    wide = Engine(engine.model_config, raw_params, config)
    assert [wide.prefill_rows(t) for t in (16, 64, 128)] == [8, 8, 12]
    assert wide.packs([1] * 10 + [70] + [1] * 12) == [list(range(8)), [8, 9, 10, *range(11, 20)], [20, 21, 22]]


def test_prefill_buckets_step_by_half_powers_of_two():
    """Buckets at powers of two and 1.5x them: past the smallest, a call computes less than 1.5x its tokens (powers
    of two alone approach 2x); decode windows follow the same series in pages."""
    fine, coarse = EngineConfig(), EngineConfig(fine_prefill_buckets=False)
    assert fine.prefill_buckets == (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
    assert coarse.prefill_buckets == (16, 32, 64, 128, 256, 512, 1024)
    assert dataclasses.replace(fine, max_prefill_len=100).prefill_buckets == (16, 24, 32, 48, 64, 96, 100)
    assert dataclasses.replace(fine, min_prefill_len=8, max_prefill_len=32).prefill_buckets == (8, 12, 16, 24, 32)
    assert fine.windows == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # 2048 / 64 pages
    for config, bound in ((fine, 1.5), (coarse, 2.0)):
        sizes = {n: prefill.bucket_for(config, n) for n in range(17, 1025)}
        assert all(n <= b < bound * n for n, b in sizes.items())
        assert set(sizes.values()) == set(config.prefill_buckets[1:])
    assert prefill.bucket_for(fine, 41) == 48 and prefill.bucket_for(coarse, 41) == 64  # W1's chat prompt


def test_a_prompt_computes_the_same_in_a_smaller_bucket(engine, raw_params, monkeypatch):
    """The module's engine runs 17-24 tokens in a bucket of 24; with powers of two only they run in 32, with the same
    tokens and logprobs."""
    coarse = Engine(tiny_config(), raw_params, dataclasses.replace(ENGINE_CONFIG, fine_prefill_buckets=False))
    fine_calls, coarse_calls = prefill_calls(engine, monkeypatch), prefill_calls(coarse, monkeypatch)
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3)
    for n in (17, 20):
        assert_same_run(cold(engine, PROMPTS[n], params), cold(coarse, PROMPTS[n], params))
    assert fine_calls == [24, 24] and coarse_calls == [32, 32]


@pytest.fixture(scope="module")
def small_pages_engine(raw_params) -> Engine:
    """Pages of 8 positions: one packed prompt spans several pages, starting mid-pack."""
    config = dataclasses.replace(ENGINE_CONFIG, page_size=8, max_seq_len=64, prefill_segments=4)
    return Engine(tiny_config(), raw_params, config)


@pytest.mark.parametrize("which", ["engine", "small_pages_engine"])
def test_packed_prefill_matches_one_at_a_time(which, request):
    """Prompts packed into shared prefill calls give each its own first token, logprobs and continuation."""
    engine = request.getfixturevalue(which)
    engine.reset()
    lengths = (5, 12, 1, 8, 3, 17, 30)
    settings = [
        SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True),
    ]
    requests = [(PROMPTS[n], settings[i % 3], 100 + i) for i, n in enumerate(lengths)]
    assert any(len(p) > 1 for p in engine.packs(lengths))  # several prompts do share a call
    prefixes = engine.prefill_batch(requests)
    assert [p.cached for p in prefixes] == [0] * 7
    for (prompt, params, seed), packed in zip(requests, prefixes, strict=True):
        engine.clear_prefix_cache()  # alone: computed in full, not read from the packed prompts' pages
        alone = engine.prefill(prompt, params, seed)
        assert alone.cached == 0
        assert packed.token == alone.token and packed.length == len(prompt)
        if params.logprobs is not None:
            assert [i for i, _ in packed.logprobs.top] == [i for i, _ in alone.logprobs.top]
            np.testing.assert_allclose(packed.logprobs.logprob, alone.logprobs.logprob, atol=1e-5)
        engine.discard(alone)
    # each packed row, inserted into its own slot and decoded alongside the others, continues as it does alone
    for group in (range(0, 4), range(4, 7)):
        runs: dict[int, SlotRun] = {}
        release_all(engine)
        for slot, i in enumerate(group):
            runs[slot] = SlotRun([prefixes[i].token], [])
            engine.insert(prefixes[i], slot)
        decode(engine, runs)
        for slot, i in enumerate(group):
            prompt, params, seed = requests[i]
            assert runs[slot].tokens == cold(engine, prompt, params, seed).tokens, f"prompt {i}"
    release_all(engine)
    assert engine.pool.used == 0 and engine.pool.reserved == 0
    engine.pool.check()


def prefill_calls(engine: Engine, monkeypatch) -> list[int]:
    """Records the bucket of every prefill call the engine dispatches from now on."""
    calls: list[int] = []
    real = engine._compile

    def recording(kind: str, size: int):
        if kind == "prefill":
            calls.append(size)
        return real(kind, size)

    monkeypatch.setattr(engine, "_compile", recording)
    return calls


def test_long_prompt_is_prefilled_in_chunks(engine, full_logits, monkeypatch):
    """A prompt of 100 tokens (max_prefill_len 32) is computed in four calls, each chunk attending to the pages the
    earlier ones wrote; it continues exactly as the full forward."""
    prompt = PROMPTS[100]
    calls = prefill_calls(engine, monkeypatch)
    run = run_alone(engine, prompt, SamplingParams(max_tokens=28, ignore_eos=True, logprobs=5))
    assert calls == [32, 32, 32, 16] and run.cached == 0 and len(run.tokens) == 28
    assert_matches_full_forward(run, prompt, full_logits)


def test_token_budget_spreads_a_prompt_over_calls(engine, full_logits, monkeypatch):
    """With a token budget of 16 the 100-token prompt comes back unfinished after each call, and is continued where
    it stopped until done; the result is the full forward's."""
    prompt = PROMPTS[100]
    params = SamplingParams(max_tokens=28, ignore_eos=True, logprobs=5)
    calls = prefill_calls(engine, monkeypatch)
    (prefix,) = engine.prefill_batch([(prompt, params, 0)], token_budget=16)
    computed = [prefix.computed]
    while not prefix.done:
        assert prefix.token == -1 and prefix.logprobs is None
        (again,) = engine.prefill_batch([prefix], token_budget=16)
        assert again is prefix
        computed.append(prefix.computed)
    # the budget counts a token at a longer context as dearer (its attention): each call takes the most tokens whose
    # cost fits 16, so the chunks shrink as the prompt grows
    expected = [0]
    while expected[-1] < 100:
        n = min(100 - expected[-1], engine._tokens_within(16, expected[-1]))
        assert (
            engine._prefill_cost(n, expected[-1]) <= 16 < engine._prefill_cost(n + 1, expected[-1])
            or n == 100 - expected[-1]
        )
        expected.append(expected[-1] + n)
    chunks = np.diff(expected).tolist()
    assert computed == expected[1:] and calls == [16] * len(chunks)  # each call runs in the 16-token bucket
    assert chunks[-2] < chunks[0] <= 16
    runs: dict[int, SlotRun] = {}
    lp = prefix.logprobs
    runs[2] = SlotRun([prefix.token], [(lp.logprob, [i for i, _ in lp.top], [x for _, x in lp.top])])
    engine.insert(prefix, 2)
    decode(engine, runs)
    engine.release(2)
    assert_matches_full_forward(runs[2], prompt, full_logits)
    # a budget shared by two prompts: whole prompts first come first, the long one continues in later calls
    calls.clear()
    engine.clear_prefix_cache()
    short, long_ = engine.prefill_batch([(PROMPTS[12], params, 0), (prompt, params, 0)], token_budget=40)
    left = 40 - engine._prefill_cost(12, 0)
    assert short.done and short.token >= 0 and (long_.computed, long_.done) == (engine._tokens_within(left, 0), False)
    while not long_.done:
        engine.prefill_batch([long_], token_budget=40)
    assert long_.token == prefix.token
    np.testing.assert_allclose(long_.logprobs.logprob, prefix.logprobs.logprob, atol=LOGPROB_TOL)
    engine.discard(short)
    engine.discard(long_)
    assert engine.pool.used == 0 and engine.pool.reserved == 0


# ----- prefix reuse through the page pool -------------------------------------------------------------------------


def test_identical_prompt_reuses_cached_pages(engine):
    prompt = PROMPTS[20] + PROMPTS[25]  # 45 tokens: prefilled in two chunks
    params = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=5)
    ref = cold(engine, prompt, params)
    before = dataclasses.replace(engine.prefix_stats)
    warm = run_alone(engine, prompt, params)
    # one page shared, 12 positions copied from the next; the last prompt token is always computed (its logits)
    assert warm.cached == len(prompt) - 1 == 44
    assert engine.prefix_stats.hit_tokens - before.hit_tokens == 44
    assert engine.prefix_stats.hit_prompts - before.hit_prompts == 1
    assert_same_run(warm, ref)


def test_follow_up_turn_computes_only_the_new_tail(engine):
    """The next turn of a chat (prompt + completion + new tokens) reads the first turn's pages, prompt and
    completion, and computes only the new tail."""
    prompt, params = PROMPTS[20], SamplingParams(max_tokens=30, ignore_eos=True, logprobs=5)
    first = run_alone(engine, prompt, params)
    follow = prompt + first.tokens[:-1] + PROMPTS[8]  # the last completion token was never fed back: not cached
    params = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=5)
    warm = run_alone(engine, follow, params)
    assert warm.cached == len(prompt) + len(first.tokens) - 1 == 49
    assert_same_run(warm, cold(engine, follow, params))


def test_prompt_diverging_mid_page_reuses_the_matching_part(engine):
    """A prompt that diverges from a cached one inside a page reuses the full pages before it and the matching head
    of that page (token-granular reuse: here the page nobody holds is taken over; a page a running sequence holds is
    copied, see test_prompts_copy_what_a_running_sequence_holds)."""
    p = engine.config.page_size
    base = PROMPTS[20] + PROMPTS[25]
    params = SamplingParams(max_tokens=16, ignore_eos=True, logprobs=5)
    run_alone(engine, base, params)
    branch = [*base[:40], 7, 8, 9]  # diverges 8 positions into the second page
    warm = run_alone(engine, branch, params)
    assert warm.cached == 40 and warm.cached % p
    # a prompt that was partly copied is cached in full, its copied positions included
    again = [*branch[:42], 5, 6]
    warm_again = run_alone(engine, again, params)
    assert warm_again.cached == 42
    assert_same_run(warm, cold(engine, branch, params))
    assert_same_run(warm_again, cold(engine, again, params))


def opening_batch(opening: int) -> list[tuple[list[int], SamplingParams, int]]:
    """Three prompts: two sharing an `opening`-token start, and an unrelated one."""
    start = (PROMPTS[12] + PROMPTS[30])[:opening]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)
    return [(p, params, i) for i, p in enumerate([[*start, 3, 4, 5], [*start, 7, 8, 9], PROMPTS[5]])]


@pytest.mark.parametrize("opening", [9, 40])
def test_prompts_sharing_an_opening_wait_for_the_first(engine, off_engine, opening):
    """A batch whose prompts would share calls, two of them sharing an opening: the second waits for the first to be
    cached (a later call), while the unrelated prompt still shares the first one's (last) call. Each continues exactly
    as a cold prefill."""
    requests = opening_batch(opening)
    if opening == 9:
        assert engine.packs([len(p) for p, _, _ in requests]) == [[0, 1, 2]]  # without waiting: one call
    prefixes = engine.prefill_batch(requests)
    assert prefixes[0].device is prefixes[2].device and prefixes[1].device is not prefixes[0].device
    for i, (prompt, params, seed) in enumerate(requests):
        ref = cold(engine, prompt, params, seed)
        assert prefixes[i].token == ref.tokens[0]
        np.testing.assert_allclose(prefixes[i].logprobs.logprob, ref.logprobs[0][0], atol=LOGPROB_TOL)
        runs = {i: SlotRun([prefixes[i].token], [])}
        engine.insert(prefixes[i], i)
        decode(engine, runs)
        engine.release(i)
        assert runs[i].tokens == ref.tokens, f"prompt {i}"
    # with the cache off nothing waits: all three share one call when they fit one
    off_engine.reset()
    off = off_engine.prefill_batch(requests)
    assert [p.cached for p in off] == [0, 0, 0]
    if opening == 9:
        assert len({id(p.device) for p in off}) == 1
    assert [p.token for p in off] == [p.token for p in prefixes]
    for p in off:
        off_engine.discard(p)
    assert off_engine.pool.used == 0 and off_engine.pool.cached == 0


@pytest.mark.parametrize("opening", [9, 40, "cached"])
def test_a_prompt_that_waited_reads_the_opening_from_the_cache(engine, opening):
    """The point of waiting: the later prompts read the shared opening from the first one's pages. "cached": four
    prompts whose 20-token opening an earlier prompt left in a partly filled page nobody holds: the first takes that
    page over (un-indexing it), the other three wait for the first and read it from there."""
    if opening == "cached":
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        engine.discard(engine.prefill([*PROMPTS[20], 11], params, 0))
        requests = [([*PROMPTS[20], *tail], params, i) for i, tail in enumerate([[3, 4, 5], [9, 8], [40, 41], [77]])]
        expected = [20, 20, 20, 20]
    else:
        requests = opening_batch(opening)
        expected = [0, opening, 0]
    prefixes = engine.prefill_batch(requests)
    try:
        assert [p.cached for p in prefixes] == expected
    finally:
        for p in prefixes:
            engine.discard(p)


def test_prompts_copy_what_a_running_sequence_holds(engine):
    """Prompts sharing the opening of a sequence that is still decoding copy the head of its partly filled page into
    pages of their own (it keeps writing into it), compute only their rest, packed together in one call, and
    continue exactly as when computed in full; the running sequence is not disturbed. Logprobs of a hit match the
    cold ones."""
    base = PROMPTS[20]
    tails = [[3, 4, 5, 6, 7], [9, 8], [40, 41, 42], [77]]
    settings = [
        SamplingParams(max_tokens=10, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=10, ignore_eos=True),
    ]
    requests = [(base + t, settings[i % 2], 50 + i) for i, t in enumerate(tails)]
    runs: dict[int, SlotRun] = {}
    running = SamplingParams(max_tokens=60, ignore_eos=True)
    admit(engine, 3, [*base, 11], running, 1, runs)  # its first page holds base + 11, then its decoded tokens
    decode(engine, runs, dispatches=1)
    source = engine.slot_pages(3)[0]
    before = dataclasses.replace(engine.prefix_stats)
    prefixes = engine.prefill_batch(requests)
    assert [p.cached for p in prefixes] == [20, 20, 20, 20]
    assert all(source not in p.pages for p in prefixes)  # copied, not shared: the running sequence writes there
    assert len({id(p.device) for p in prefixes}) == 1  # their rests share one call
    assert engine.prefix_stats.hit_tokens - before.hit_tokens == 80
    for slot, prefix in enumerate(prefixes[:3]):
        runs[slot] = SlotRun([prefix.token], [])
        engine.insert(prefix, slot)
    decode(engine, runs)
    release_all(engine)
    last = {0: SlotRun([prefixes[3].token], [])}
    engine.insert(prefixes[3], 0)
    decode(engine, last)
    engine.release(0)
    got = [runs[0], runs[1], runs[2], last[0]]
    for i, (prompt, params, seed) in enumerate(requests):
        assert got[i].tokens == cold(engine, prompt, params, seed).tokens, f"prompt {i}"
    assert runs[3].tokens == cold(engine, [*base, 11], running, 1).tokens
    # logprobs of a hit match the cold ones (each hit copies from a page an earlier prefix still holds)
    engine.clear_prefix_cache()
    prompt = requests[0][0]
    first = engine.prefill(prompt, settings[0], 0)
    warm = engine.prefill([*prompt[:-1], 11], settings[0], 0)
    again = engine.prefill(prompt, settings[0], 0)
    assert (first.cached, warm.cached, again.cached) == (0, 24, 24)
    assert again.token == first.token and [i for i, _ in again.logprobs.top] == [i for i, _ in first.logprobs.top]
    np.testing.assert_allclose(again.logprobs.logprob, first.logprobs.logprob, atol=1e-5)
    for p in (first, warm, again):
        engine.discard(p)


def test_a_cached_page_nobody_holds_is_taken_over(engine):
    """A partly matching cached page that no sequence holds becomes the new prompt's own page as it is (no copy,
    no new page); the prompt continues exactly as a cold one."""
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=5)
    run_alone(engine, [*PROMPTS[20], 11], params)
    prompt = [*PROMPTS[20], 3, 4]
    match = engine.pool.match(prompt, limit=len(prompt) - 1)
    assert match.pages == () and match.copy_tokens == 20 and engine.pool.refs[match.copy_from] == 0
    free = engine.pool.free
    runs: dict[int, SlotRun] = {}
    prefix = admit(engine, 1, prompt, params, 0, runs)
    assert prefix.cached == 20 and prefix.pages == [match.copy_from] and prefix.copy_from is None
    assert engine.pool.free == free  # 22 + 8 positions: the one page it took over
    decode(engine, runs)
    engine.release(1)
    assert_same_run(runs[1], cold(engine, prompt, params))


def test_evictions_keep_runs_exact(raw_params):
    """A pool of 5 pages (a full-context request takes 4): each finished request's pages stay cached until a later
    request needs them, least recently used first; a hit after evictions, and a miss where the pages went, still
    continue exactly as cold runs."""
    engine = Engine(tiny_config(), raw_params, dataclasses.replace(ENGINE_CONFIG, kv_pages=6))
    assert engine.pool.usable == 5
    params = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=5)
    a, b, c = PROMPTS[30] + PROMPTS[12], PROMPTS[25] + PROMPTS[17], PROMPTS[32] + PROMPTS[8]  # 42, 42, 40 tokens
    first = {name: run_alone(engine, p, params) for name, p in (("a", a), ("b", b), ("c", c))}
    assert [r.cached for r in first.values()] == [0, 0, 0]
    # each left 2 pages cached (61 positions); c took the last free page and a's first, evicted (its second page,
    # unreachable without the first, went free with it)
    assert engine.pool.stats.evictions == 1 and engine.pool.cached == 4
    again_b = run_alone(engine, b, params)
    assert again_b.cached == len(b) - 1  # one page shared, 9 positions copied
    again_a = run_alone(engine, a, params)
    assert again_a.cached == 0  # evicted: computed again, taking the free page and c's (the least recently used)
    assert engine.pool.stats.evictions == 2
    assert_same_run(again_b, first["b"])
    assert_same_run(again_a, first["a"])
    assert engine.pool.used == 0 and engine.pool.reserved == 0
    engine.pool.check()


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failed_prefill_forgets_the_cache_and_gives_every_page_back(engine, monkeypatch, fail_at):
    """A prefill call that fails (the first chunk of a long prompt, or the second after the first was dispatched and
    indexed) leaves nothing cached and nothing taken; a slot decoding meanwhile carries on unharmed."""
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    a = PROMPTS[20] + PROMPTS[25]
    run_alone(engine, a, params)
    probe = engine.prefill([*a, 3], params, 0)
    assert probe.cached == 45
    engine.discard(probe)
    runs: dict[int, SlotRun] = {}
    bystander = SamplingParams(max_tokens=40, ignore_eos=True)
    admit(engine, 1, PROMPTS[12], bystander, 5, runs)
    decode(engine, runs, dispatches=1)
    held = (engine.pool.used, engine.pool.reserved)
    real, calls = engine._compile, []

    def failing(kind, size):
        if kind == "prefill":
            calls.append(size)
            if len(calls) == fail_at:
                raise RuntimeError("injected prefill failure")
        return real(kind, size)

    monkeypatch.setattr(engine, "_compile", failing)
    with pytest.raises(RuntimeError, match="injected"):
        engine.prefill(PROMPTS[100], params, 0)
    monkeypatch.undo()
    engine.pool.check()
    assert (engine.pool.used, engine.pool.reserved) == held and engine.pool.cached == 0
    probe = engine.prefill([*a, 3], params, 0)
    assert probe.cached == 0  # nothing cached before the failure is trusted
    engine.discard(probe)
    decode(engine, runs)
    engine.release(1)
    assert engine.pool.used == 0 and engine.pool.reserved == 0
    assert runs[1].tokens == cold(engine, PROMPTS[12], bystander, 5).tokens


# ----- no compile after warm-up -----------------------------------------------------------------------------------


def test_nothing_compiles_after_warmup(engine, caplog):
    compiles: list[str] = []
    counting = [True]

    def listener(event: str, duration: float, **kwargs) -> None:
        if counting[0] and event == COMPILE_EVENT:
            compiles.append(event)

    jax.clear_caches()  # as in a fresh process: whatever earlier tests compiled eagerly must not hide a compile
    monitoring.register_event_duration_secs_listener(listener)
    try:
        with jax.log_compiles(), caplog.at_level(logging.WARNING):
            engine.warmup()
            engine.reset()  # start-up allocation, before serving
            compiles.clear()
            caplog.clear()
            tok = make_tiny_tokenizer()
            scheduler = Scheduler(engine, tok, prefills_per_step=3, free_slot_decode_steps=1, prefill_token_budget=24)
            settings = [
                SamplingParams(max_tokens=90, ignore_eos=True),
                SamplingParams(temperature=0.8, seed=1, max_tokens=40),
                SamplingParams(temperature=1.0, top_k=7, max_tokens=30, stop_token_ids=(5, 9)),
                SamplingParams(temperature=1.0, top_p=0.8, max_tokens=20, logprobs=4),
                SamplingParams(temperature=1.0, min_p=0.1, max_tokens=60, stop=("ab",)),
                SamplingParams(max_tokens=1, logprobs=0),
            ]
            # every prefill bucket (16, 32), every slot, every window (1 to 4 pages: up to 30 + 90 positions)
            lengths = (1, 16, 17, 32, 30, 5, 25, 12)
            requests = [(PROMPTS[n], settings[i % len(settings)]) for i, n in enumerate(lengths)]
            requests.append((PROMPTS[25] + [3, 4], settings[0]))  # read from the prefix cache
            requests.append((PROMPTS[100], settings[3]))  # chunked, under the step's token budget
            # distinct prompts whose pages outgrow the pool: cached pages are evicted
            evicting = SamplingParams(max_tokens=60, ignore_eos=True)  # ~4 pages each, 16 in the pool
            requests += [(PROMPTS[n][::-1] + PROMPTS[32], evicting) for n in (30, 32, 25, 20, 17, 16)]
            hits, evictions = engine.prefix_stats.hit_prompts, engine.pool.stats.evictions
            outputs = collect(scheduler, requests)
            for _ in range(3):
                scheduler.step()
            scheduler.cancel("r0")  # release a slot mid-generation
            scheduler.run_until_idle(max_steps=500)
            evicted = engine.pool.stats.evictions - evictions  # (a reset starts a new pool, and new counts)
            engine.reset()  # a reset (the scheduler's recovery path) must not compile either
            runs: dict[int, SlotRun] = {}
            admit(engine, 3, PROMPTS[20], SamplingParams(max_tokens=100, ignore_eos=True), 0, runs)
            decode(engine, runs)
            engine.release(3)
            admit(engine, 0, PROMPTS[20] + runs[3].tokens[:50], SamplingParams(max_tokens=4), 0, runs)  # a hit
            decode(engine, runs)
            engine.release(0)
            counting[0] = False
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert set(engine.compiled_shapes) == set(engine.shapes) == {
        ("prefill", 16), ("prefill", 24), ("prefill", 32), ("insert", 16), ("generate", 1), ("generate", 2),
        ("generate", 3), ("generate", 4), ("release", 0), ("init", 0),
    }  # fmt: skip
    assert len(outputs) == len(requests) and all(outs[-1].finished for outs in outputs.values())
    assert engine.prefix_stats.hit_prompts > hits and runs[0].cached == 69
    assert evicted > 0
    compiled = [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert compiles == [], f"{len(compiles)} compiles after warm-up: {compiled}"


def _ynn_fusions(hlo: str, op: str) -> int:
    """YNNPACK fusions in optimized HLO text whose fused computation holds an `op` (dot, reduce)."""
    bodies = dict(re.findall(r"^(%[\w.-]+) .*?\{\n(.*?)^\}", hlo, flags=re.M | re.S))
    fusions = [line for line in hlo.splitlines() if "__ynn_fusion" in line and " fusion(" in line]
    called = [re.search(r"calls=(%[\w.-]+)", line).group(1) for line in fusions]
    return sum(f" {op}(" in bodies.get(name, "") for name in called)


def test_cpu_steps_keep_the_logits_argmax_out_of_ynnpack():
    """On CPU the steps compile with CPU_COMPILER_OPTIONS: over SmolLM2's 49152-token vocabulary XLA's defaults make
    the greedy argmax's reductions YNNPACK fusions (at 64 slots 2.8 ms against 1.8 in XLA's loop on a Zen 3 VM);
    the engine's step keeps them XLA's, and YNNPACK keeps the dots (XLA's products, as here)."""
    config = dataclasses.replace(tiny_config(), vocab_size=49152)
    eng = Engine(config, init_params(config, jnp.float32), dataclasses.replace(ENGINE_CONFIG, linear="xla"))
    assert eng.compiler.compiler_options == step_compile.CPU_COMPILER_OPTIONS
    default = eng.compiler.lower("generate", 1).compile().as_text()
    assert _ynn_fusions(default, "reduce") > 0  # so this test can tell the two apart
    compiled = eng.compiler.get("generate", 1).as_text()
    assert _ynn_fusions(compiled, "reduce") == 0
    assert _ynn_fusions(compiled, "dot") == _ynn_fusions(default, "dot") > 0


def test_an_option_this_xla_lacks_is_left_out_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(step_compile, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
    step_compile._cpu_options_known.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="engine.compile"):
            assert step_compile.compiler_options(single_device_mesh()) == {}
        assert "xla_cpu_no_such_option" in caplog.text
    finally:
        step_compile._cpu_options_known.cache_clear()


# ----- bfloat16 (the XLA paths) -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_engine(raw_params) -> Engine:
    """The module's shapes in bfloat16 (XLA attention and products: the TPU/GPU paths), with the f32 weights rounded."""
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), raw_params)
    config = dataclasses.replace(ENGINE_CONFIG, dtype="bfloat16", attention="xla", linear="xla")
    eng = Engine(tiny_config(), params, config)
    assert (eng.attention, eng.linear, eng.dtype) == ("xla", "xla", jnp.bfloat16)
    return eng


def test_bfloat16_paged_engine_follows_the_full_forward(bf16_engine, full_logits):
    """Greedy runs of the bf16 paged engine (short prompts, a chunked one, a prefix hit and a partial one) give the
    float32 full forward's tokens until a position where its two best logits are within bf16 rounding (0.05), and
    logprobs within 2e-2 of a bf16 full forward's."""
    engine = bf16_engine
    engine.reset()
    s = engine.config.max_seq_len
    fn = jax.jit(lambda p, t: engine.model.apply({"params": p}, t, jnp.arange(s, dtype=jnp.int32)[None])[0][0])

    def bf16_logits(tokens: list[int]) -> np.ndarray:
        padded = np.zeros((1, s), np.int32)
        padded[0, : len(tokens)] = tokens
        return np.asarray(fn(engine.params, padded), np.float32)[: len(tokens)]

    long_ = PROMPTS[20] + PROMPTS[25]
    prompts = [PROMPTS[5], PROMPTS[12], long_, long_, [*long_[:40], 7, 8, 9], PROMPTS[17]]
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=5)
    runs = [run_alone(engine, p, params) for p in prompts]
    assert [r.cached for r in runs] == [0, 0, 0, 44, 40, 0]
    for prompt, run in zip(prompts, runs, strict=True):
        expected = greedy_reference(full_logits, prompt, len(run.tokens))
        same = next((i for i, (a, b) in enumerate(zip(run.tokens, expected, strict=True)) if a != b), len(expected))
        if same < len(expected):
            top2 = np.sort(full_logits(prompt + expected[:same])[-1])[-2:]
            assert top2[1] - top2[0] < 0.05, f"diverged at token {same} where the f32 margin is {top2[1] - top2[0]}"
        ref = np.asarray(jax.nn.log_softmax(bf16_logits(prompt + run.tokens[:-1])[len(prompt) - 1 :], axis=-1))
        got = np.array([lp for lp, _, _ in run.logprobs])
        np.testing.assert_allclose(got, ref[np.arange(len(run.tokens)), run.tokens], atol=2e-2)
    assert engine.pool.used == 0 and engine.pool.reserved == 0
    engine.pool.check()


# ----- the sampler on hand-made logits ----------------------------------------------------------------------------

PROBS = np.array([0.1, 0.5, 0.05, 0.2, 0.15], np.float32)  # sorted: 0.5 (id 1), 0.2 (3), 0.15 (4), 0.1 (0), 0.05 (2)


def knobs(b: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None) -> SlotSampling:
    seeds = range(b) if seeds is None else seeds
    return SlotSampling(
        temperature=jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,)),
        top_k=jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (b,)),
        top_p=jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,)),
        min_p=jnp.broadcast_to(jnp.asarray(min_p, jnp.float32), (b,)),
        key=jax.random.key_data(jax.vmap(jax.random.key)(jnp.asarray(list(seeds), jnp.uint32))).astype(jnp.uint32),
        stop_ids=jnp.full((b, 8), -1, jnp.int32),
    )


def kept(logits: np.ndarray, s: SlotSampling) -> list[set[int]]:
    out = np.asarray(_filter_logits(jnp.asarray(logits), s))
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in out]


@pytest.mark.parametrize("v", [49152, 1000, 129, 7])
def test_argmax_is_jnp_argmax(v):
    x = np.random.default_rng(v).standard_normal((4, v)).astype(np.float32)
    x[1, :] = -np.inf  # all filtered
    x[2, [v // 3, v // 2, v - 1]] = 9.0  # ties: the first index wins
    x[3, :] = 0.0
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(x)), np.argmax(x, axis=-1))


def test_top_k_one_is_greedy():
    logits = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32)
    drawn = sample(jnp.asarray(logits), knobs(64, temperature=2.0, top_k=1), jnp.arange(64))
    np.testing.assert_array_equal(np.asarray(drawn), logits.argmax(-1))


def test_top_p_keeps_exactly_the_nucleus():
    logits = np.log(np.tile(PROBS, (5, 1)))
    top_p = [0.3, 0.6, 0.8, 0.9, 1.0]
    # smallest set of most likely tokens whose mass reaches top_p: 0.5 | 0.5+0.2 | +0.15 = 0.85 | +0.1 = 0.95 | all
    assert kept(logits, knobs(5, top_p=top_p)) == [{1}, {1, 3}, {1, 3, 4}, {1, 3, 4, 0}, {0, 1, 2, 3, 4}]
    # top-p applies to the top-k survivors renormalized: top-3 -> 0.59, 0.24, 0.18, so 0.8 needs only two
    assert kept(logits[:2], knobs(2, top_k=3, top_p=[0.8, 0.9])) == [{1, 3}, {1, 3, 4}]


def test_min_p_threshold():
    logits = np.log(np.tile(PROBS, (4, 1)))
    # threshold = min_p * 0.5
    assert kept(logits, knobs(4, min_p=[0.0, 0.25, 0.35, 0.9])) == [{0, 1, 2, 3, 4}, {1, 3, 4}, {1, 3}, {1}]


def test_temperature_with_fixed_key_is_deterministic():
    logits = jnp.zeros((1, 1000))  # uniform: the draw is decided by the key alone
    s = knobs(1, temperature=1.0, seeds=[42])
    draws = [int(sample(logits, s, jnp.array([i]))[0]) for i in (0, 0, 1, 2, 3)]
    assert draws[0] == draws[1]  # same key, same token index
    assert len(set(draws[1:])) > 1  # the token index moves the stream
    greedy = sample(jnp.asarray(np.log(PROBS))[None], knobs(1, temperature=0.0), jnp.array([0]))
    assert int(greedy[0]) == 1


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (2.0, 0), (1.0, 3)])
def test_sampled_frequencies_follow_softmax(temperature, top_k):
    n = 4000
    logits = np.log(PROBS)
    expected = np.exp(logits / temperature)
    if top_k:
        expected[np.argsort(-logits)[top_k:]] = 0
    expected /= expected.sum()
    draws = sample(jnp.tile(jnp.asarray(logits), (n, 1)), knobs(n, temperature, top_k), jnp.zeros(n, jnp.int32))
    counts = np.bincount(np.asarray(draws), minlength=5)
    assert counts[expected == 0].sum() == 0
    nz = expected > 0
    chi2 = float(np.sum((counts[nz] - n * expected[nz]) ** 2 / (n * expected[nz])))
    assert chi2 < 20.0, (counts, n * expected)  # df <= 4: p < 0.001 at 18.5; deterministic seeds


# ----- stops through the scheduler --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def observed(engine):
    """A prompt's greedy continuation (60 tokens, EOS ignored) and its text, to set stops from."""
    scheduler = Scheduler(engine, make_tiny_tokenizer())
    outs = collect(scheduler, [(PROMPTS[8], SamplingParams(max_tokens=60, ignore_eos=True))])
    scheduler.run_until_idle(max_steps=200)
    tokens, text, _ = summary(outs["r0"])
    return tokens, text


def run_one(engine, prompt, params, tok=None) -> tuple[list[int], str, str | None]:
    scheduler = Scheduler(engine, tok or make_tiny_tokenizer())
    outs = collect(scheduler, [(prompt, params)])
    scheduler.run_until_idle(max_steps=200)
    return summary(outs["r0"])


def first_new_token(tokens: list[int]) -> int:
    """Index of the first token (past 5) not seen before it, so a stop on it ends exactly there."""
    return next(i for i in range(5, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_token_ids(engine, observed):
    tokens, _ = observed
    j = first_new_token(tokens)
    params = SamplingParams(max_tokens=60, ignore_eos=True, stop_token_ids=(tokens[j],))
    got, _, reason = run_one(engine, PROMPTS[8], params)
    assert got == tokens[: j + 1] and reason == FINISH_STOP


def test_max_tokens_and_eos(engine, observed, monkeypatch):
    tokens, _ = observed
    got, _, reason = run_one(engine, PROMPTS[8], SamplingParams(max_tokens=7, ignore_eos=True))
    assert got == tokens[:7] and reason == FINISH_LENGTH
    # make a token this prompt reaches the model's EOS: it ends the request unless ignore_eos
    j = first_new_token(tokens)
    monkeypatch.setattr(engine, "model_config", dataclasses.replace(engine.model_config, eos_token_ids=(tokens[j],)))
    got, _, reason = run_one(engine, PROMPTS[8], SamplingParams(max_tokens=60))
    assert got == tokens[: j + 1] and reason == FINISH_STOP
    got, _, reason = run_one(engine, PROMPTS[8], SamplingParams(max_tokens=60, ignore_eos=True))
    assert got == tokens and reason == FINISH_LENGTH


def test_stop_string_cuts_text(engine, observed):
    tokens, text = observed
    # a two-character ASCII stop string from the observed text, first seen well after the start
    start = next(
        i for i in range(6, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2] not in text[: i + 1]
    )
    stop = text[start : start + 2]
    got, got_text, reason = run_one(engine, PROMPTS[8], SamplingParams(max_tokens=60, ignore_eos=True, stop=(stop,)))
    assert reason == FINISH_STOP
    assert got_text == text[:start]
    assert got == tokens[: len(got)] and len(got) < len(tokens)


def test_stop_string_cuts_ids_logprobs_and_usage_whatever_the_load(engine, observed):
    """A stop string completed mid-dispatch ends the request at the token that completed it: the same ids, logprobs
    and completion count alone and with every slot busy (tokens decoded after it in the dispatch are dropped)."""
    tokens, text = observed
    tok = make_tiny_tokenizer()
    start = next(
        i for i in range(6, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2] not in text[: i + 1]
    )
    stop = text[start : start + 2]
    # the token whose text completes the stop string
    k = next(j for j in range(len(tokens)) if stop in tok.decode(tokens[: j + 1], skip_special_tokens=True))
    params = SamplingParams(max_tokens=60, ignore_eos=True, stop=(stop,), logprobs=2)
    for others in (0, engine.config.num_slots - 1):
        scheduler = Scheduler(engine, tok)
        busy = [(PROMPTS[n], SamplingParams(max_tokens=40, ignore_eos=True)) for n in (5, 12, 20)[:others]]
        outs = collect(scheduler, [(PROMPTS[8], params), *busy])
        scheduler.run_until_idle(max_steps=200)
        got, got_text, reason = summary(outs["r0"])
        assert reason == FINISH_STOP and got_text == text[:start]
        assert got == tokens[: k + 1], (others, got, tokens[: k + 1])
        assert sum(len(o.logprobs or []) for o in outs["r0"]) == k + 1
        assert outs["r0"][-1].completion_tokens == k + 1


def test_device_seconds_add_up_to_the_engine_busy_time(engine, monkeypatch):
    busy = []

    def timed(fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                busy.append(time.perf_counter() - start)

        return call

    monkeypatch.setattr(engine, "prefill_batch", timed(engine.prefill_batch))
    monkeypatch.setattr(engine, "generate", timed(engine.generate))
    scheduler = Scheduler(engine, make_tiny_tokenizer(), prefills_per_step=2, prefill_token_budget=16)
    lengths, max_tokens = (3, 30, 12, 17, 100, 25), (20, 9, 30, 5, 12, 14)
    outs = collect(
        scheduler,
        [(PROMPTS[n], SamplingParams(max_tokens=m, ignore_eos=True)) for n, m in zip(lengths, max_tokens, strict=True)],
    )
    scheduler.run_until_idle(max_steps=300)
    shares = [o[-1].device_seconds for o in outs.values()]
    assert all(x > 0 for x in shares)
    assert sum(shares) == pytest.approx(sum(busy), rel=0.05)
    # the scheduler's own count (the meshserve_engine_busy_seconds_total counter) measures the same calls
    assert scheduler.stats().busy_seconds == pytest.approx(sum(busy), rel=0.05)


# ----- logprobs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 3, 20])
def test_logprobs_match_full_forward(engine, full_logits, n):
    prompt = PROMPTS[17]
    # sampled at temperature 1.5: the reported logprob is still the model's own distribution (before temperature)
    params = SamplingParams(temperature=1.5, seed=5, max_tokens=30, ignore_eos=True, logprobs=n)
    scheduler = Scheduler(engine, make_tiny_tokenizer())
    outs = collect(scheduler, [(prompt, params)])
    scheduler.run_until_idle(max_steps=200)
    tokens = [t for o in outs["r0"] for t in o.token_ids]
    lps = [lp for o in outs["r0"] for lp in o.logprobs]
    assert len(tokens) == len(lps) == 30
    ref = np.asarray(jax.nn.log_softmax(full_logits(prompt + tokens[:-1])[len(prompt) - 1 :], axis=-1))
    np.testing.assert_allclose([lp.logprob for lp in lps], ref[np.arange(30), tokens], atol=1e-4)
    for lp, row in zip(lps, ref, strict=True):
        assert len(lp.top) == n
        ids, values = [i for i, _ in lp.top], [x for _, x in lp.top]
        assert values == sorted(values, reverse=True)
        np.testing.assert_array_equal(ids, np.argsort(-row)[:n])
        np.testing.assert_allclose(values, row[ids], atol=1e-4)


# ----- bad input --------------------------------------------------------------------------------------------------


def test_prompt_limits(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.check_request(0, SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.prefill([], SamplingParams(), 0)
    # longer than max_prefill_len (32): computed in chunks
    long_ = engine.prefill([5] * 33, SamplingParams(max_tokens=2), 0)
    assert long_.done and long_.length == 33 and long_.token >= 0
    engine.discard(long_)
    with pytest.raises(CapacityError, match=r"max_tokens \(99\).*128 tokens.*at most 98"):
        engine.check_request(30, SamplingParams(max_tokens=99))
    engine.check_request(30, SamplingParams(max_tokens=98))  # exactly fills the context: allowed
    with pytest.raises(CapacityError, match=r"prompt has 128 tokens but the context holds 128 .*shorten the prompt"):
        engine.prefill([5] * 128, SamplingParams(max_tokens=1), 0)
    with pytest.raises(ValueError, match="token id 256"):
        engine.prefill([5, 256], SamplingParams(max_tokens=4), 0)
    assert engine.pool.used == 0 and engine.pool.reserved == 0  # refusals take nothing


def test_kv_memory_limits(engine, monkeypatch):
    # more pages than are available now: refused by open_prompt having taken nothing (the scheduler makes it wait)
    runs: dict[int, SlotRun] = {}
    for slot, n in enumerate((30, 25, 20)):
        admit(engine, slot, PROMPTS[n], SamplingParams(max_tokens=128 - n, ignore_eos=True), slot, runs)  # 4 pages
    held = engine.prefill(PROMPTS[17], SamplingParams(max_tokens=100), 0)  # 4 pages: the 16 are all taken
    assert engine.pool.available() == 0 and not engine.can_admit(1)
    before = (engine.pool.free, engine.pool.cached, engine.pool.used, engine.pool.reserved)
    with pytest.raises(CapacityError, match=r"the KV memory has 0 pages available and this request needs 1"):
        engine.open_prompt(PROMPTS[3], SamplingParams(max_tokens=4), 0)
    assert (engine.pool.free, engine.pool.cached, engine.pool.used, engine.pool.reserved) == before
    engine.discard(held)
    assert engine.can_admit(4) and not engine.can_admit(5)
    engine.discard(engine.prefill(PROMPTS[3], SamplingParams(max_tokens=4), 0))
    release_all(engine)
    assert engine.pool.used == 0 and engine.pool.reserved == 0


@pytest.fixture(scope="module")
def idle_scheduler(engine):
    """A scheduler that is only ever asked to validate (it never steps, so sharing it is safe)."""
    return Scheduler(engine, make_tiny_tokenizer())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_k", 257),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.01),
        ("seed", -1),
        ("seed", 2**32),
        ("max_tokens", 0),
        ("stop", ("",)),
        ("stop", ("x" * 257,)),
        ("stop", tuple("abcdefghi")),
        ("stop_token_ids", (256,)),
        ("stop_token_ids", (-1,)),
        ("stop_token_ids", tuple(range(2, 10))),
        ("logprobs", -1),
        ("logprobs", 21),
    ],
)
def test_invalid_sampling_values(engine, idle_scheduler, field, value):
    params = dataclasses.replace(SamplingParams(), **{field: value})
    name = {"stop": "stop string"}.get(field, field)
    with pytest.raises(ValueError, match=name):
        engine.check_request(5, params)
    scheduler = idle_scheduler
    with pytest.raises(ValueError, match=name):
        scheduler.submit(Request("bad", [5, 6], params, lambda o: None))
    assert not scheduler.has_work()


def test_capacity_refusals(raw_params):
    cfg = tiny_config()
    # 2**30 slots: a pool of 2**32 + 1 pages of 32 x 512 B: refused in __init__, before anything is allocated
    huge = dataclasses.replace(ENGINE_CONFIG, num_slots=2**30)
    with pytest.raises(
        CapacityError, match=r"KV pool of 4294967297 pages need .* GiB per device.*use at most \d+ kv_pages"
    ):
        Engine(cfg, raw_params, huge)
    with pytest.raises(CapacityError, match=r"KV pool of 68719476736 pages.*use at most \d+ kv_pages"):
        Engine(cfg, raw_params, dataclasses.replace(ENGINE_CONFIG, kv_pages=2**36))
    # a pool smaller than one full-context request
    with pytest.raises(CapacityError, match=r"holds 3 pages of 32 positions, fewer than one full-context request needs "
                                            r"\(4 pages for max_seq_len=128\)"):  # fmt: skip
        Engine(cfg, raw_params, dataclasses.replace(ENGINE_CONFIG, kv_pages=4))
    with pytest.raises(CapacityError, match="kv_pages must be >= 2"):
        dataclasses.replace(ENGINE_CONFIG, kv_pages=1)
    assert Engine(cfg, raw_params, dataclasses.replace(ENGINE_CONFIG, kv_pages=5)).pool.usable == 4  # exactly one
    with pytest.raises(CapacityError, match="multiple of page_size"):
        dataclasses.replace(ENGINE_CONFIG, max_seq_len=100)
    with pytest.raises(CapacityError, match="exceeds the model's context"):
        Engine(cfg, raw_params, dataclasses.replace(ENGINE_CONFIG, max_seq_len=1024, max_prefill_len=32))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1])
def test_host_built_key_is_jax_key_of_seed(seed):
    # SlotSampling builds the key on the host (no compile per request); it must be the same key JAX would build
    built = SlotSampling.from_params(SamplingParams(temperature=1.0), seed, eos_token_ids=()).key[0]
    np.testing.assert_array_equal(built, np.asarray(jax.random.key_data(jax.random.key(seed))))
