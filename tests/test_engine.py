"""Engine tests on a tiny random model: prefill + paged decode against a full forward, slot isolation, seeds,
continuous batching, compile-free serving after warm-up, the sampler on hand-made logits, stops, logprobs and
input validation.

One warmed engine is shared by the module (float32, 4 slots of 128 positions in 4 pages of 32, prefill buckets 16
and 32, 4 decode steps per dispatch); every test starts from its own `init_state()`.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import monitoring

from engine.config import tiny_config
from engine.engine import CapacityError, DecodeState, Engine, EngineConfig
from engine.model import init_params
from engine.sampling import SamplingParams, SlotSampling, _filter_logits, argmax, sample
from engine.scheduler import FINISH_LENGTH, FINISH_STOP, Request, RequestOutput, Scheduler
from engine.tokenizer import make_tiny_tokenizer

ENGINE_CONFIG = EngineConfig(
    num_slots=4, max_seq_len=128, max_prefill_len=32, min_prefill_len=16, page_size=32, decode_steps=4, dtype="float32"
)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Seeded random prompts (ids 2..255: never BOS 0 or EOS 1), reused across tests so they read the same model paths.
_RNG = np.random.default_rng(1234)
PROMPTS = {n: [int(t) for t in _RNG.integers(2, 256, n)] for n in (1, 3, 5, 8, 12, 16, 17, 20, 25, 30, 32)}


@pytest.fixture(scope="module")
def engine() -> Engine:
    cfg = tiny_config()
    eng = Engine(cfg, init_params(cfg, jnp.float32), ENGINE_CONFIG)
    eng.warmup()
    return eng


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
    """What the engine produced for one slot: tokens, and per token (logprob, top ids, top logprobs) if asked."""

    tokens: list[int]
    logprobs: list[tuple[float, list[int], list[float]]]


def admit(engine: Engine, state: DecodeState, slot: int, prompt, params: SamplingParams, seed: int, runs: dict):
    prefix = engine.prefill(prompt, params, seed)
    lp = prefix.logprobs
    runs[slot] = SlotRun(
        [prefix.token], [] if lp is None else [(lp.logprob, [i for i, _ in lp.top], [x for _, x in lp.top])]
    )
    return engine.insert(prefix, state, slot)


def decode(engine: Engine, state: DecodeState, runs: dict[int, SlotRun], dispatches: int | None = None):
    """Runs `generate` until no slot is active (or `dispatches` times), appending each slot's tokens to `runs`."""
    n = 0
    while any(engine.slot_active(s) for s in range(engine.config.num_slots)) and (dispatches is None or n < dispatches):
        state, out = engine.generate(state)
        n += 1
        for slot, run in runs.items():
            for t in np.flatnonzero(out.valid[:, slot]):
                run.tokens.append(int(out.tokens[t, slot]))
                run.logprobs.append(
                    (float(out.logprob[t, slot]), out.top_ids[t, slot].tolist(), out.top_logprobs[t, slot].tolist())
                )
    return state


def run_alone(engine: Engine, prompt, params: SamplingParams, seed: int = 0, slot: int = 0) -> SlotRun:
    runs: dict[int, SlotRun] = {}
    state = admit(engine, engine.init_state(), slot, prompt, params, seed, runs)
    decode(engine, state, runs)
    return runs[slot]


def greedy_reference(full_logits, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each the argmax of a full forward over everything so far."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(full_logits(seq)[-1])))
    return seq[len(prompt) :]


def page_arrays(state: DecodeState) -> list[np.ndarray]:
    return [np.asarray(p) for layer in (*state.k, *state.v) for p in layer]


# ----- prefill + decode == full forward ---------------------------------------------------------------------------


def test_greedy_decode_matches_full_forward(engine, full_logits):
    # 20 prompt + 90 generated tokens: crosses pages 1 -> 2 -> 3 -> 4, so every decode window (1, 2, 4 pages) runs
    prompt = PROMPTS[20]
    run = run_alone(engine, prompt, SamplingParams(max_tokens=90, ignore_eos=True, logprobs=5))
    expected = greedy_reference(full_logits, prompt, 90)
    if run.tokens != expected:
        i = next(i for i, (a, b) in enumerate(zip(run.tokens, expected, strict=True)) if a != b)
        top2 = np.sort(full_logits(prompt + expected[:i])[-1])[-2:]
        pytest.fail(f"first divergence at generated token {i}: {run.tokens[i]} vs {expected[i]}, top-2 gap {top2}")
    # the engine's logits, seen through its top-5 logprobs, match the full forward's at every position
    logits = full_logits(prompt + run.tokens[:-1])[len(prompt) - 1 :]
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    top_ids = np.array([ids[:5] for _, ids, _ in run.logprobs])  # decode rows carry all MAX_LOGPROBS
    top_lps = np.array([lps[:5] for _, _, lps in run.logprobs])
    np.testing.assert_array_equal(top_ids[:, 0], run.tokens)
    np.testing.assert_allclose(top_lps, np.take_along_axis(ref, top_ids, axis=-1), atol=1e-4)


def test_model_decode_step_matches_full_forward(engine, full_logits):
    """The model's decode path (paged cache, per-slot lengths) writes each slot's new K/V at its length, then
    attends to positions <= length: it gives the full forward's logits at that position."""
    c, p = engine.model_config, engine.config.page_size
    seqs = [PROMPTS[30] + PROMPTS[32], PROMPTS[12] + PROMPTS[25] + PROMPTS[25]]  # 62 tokens each
    lengths = np.array([9, 40], np.int32)  # slot 1 attends across the page boundary
    tokens = np.array(seqs, np.int32)
    # the cache holds the full forward's K/V of *all* 62 positions: positions > length must be masked out ...
    _, kv = engine.model.apply({"params": engine.params}, tokens, np.arange(62)[None].repeat(2, 0))
    # ... and garbage at position `length` itself: the model must overwrite it before attending
    at_length = np.zeros((2, 2 * p), bool)
    at_length[np.arange(2), lengths] = True
    cache = []
    for k, v in kv:  # [B, T, K, H]
        k = jnp.pad(k, ((0, 0), (0, 2 * p - 62), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 2 * p - 62), (0, 0), (0, 0)))
        k = jnp.where(at_length[:, :, None, None], 1e3, k)
        v = jnp.where(at_length[:, :, None, None], -1e3, v)
        k_pages = tuple(jnp.transpose(k[:, i * p : (i + 1) * p], (0, 2, 3, 1)) for i in range(2))  # [B, K, H, P]
        v_pages = tuple(jnp.transpose(v[:, i * p : (i + 1) * p], (0, 2, 1, 3)) for i in range(2))  # [B, K, P, H]
        cache.append((k_pages, v_pages))
    step_tokens = tokens[np.arange(2), lengths][:, None]
    logits, new_cache = engine.model.apply(
        {"params": engine.params}, step_tokens, lengths[:, None], cache=tuple(cache), lengths=jnp.asarray(lengths)
    )
    assert logits.shape == (2, 1, c.vocab_size)
    for b in range(2):
        expected = full_logits(seqs[b][: lengths[b] + 1])[-1]
        np.testing.assert_allclose(np.asarray(logits[b, 0]), expected, atol=1e-4)
    # the updated pages hold the full forward's K/V at each slot's length, and nothing else changed
    for layer in (0, c.num_layers - 1):
        (k_old, v_old), (k_new, v_new) = cache[layer], new_cache[layer]
        for b, n in enumerate(lengths):
            page, off = divmod(int(n), p)
            np.testing.assert_allclose(np.asarray(k_new[page][b, :, :, off]), np.asarray(kv[layer][0][b, n]), atol=1e-5)
            np.testing.assert_allclose(np.asarray(v_new[page][b, :, off]), np.asarray(kv[layer][1][b, n]), atol=1e-5)
        for old, new, seq_axis, other in ((k_old, k_new, 3, (1, 2)), (v_old, v_new, 2, (1, 3))):
            changed = np.concatenate([np.asarray(a) != np.asarray(o) for o, a in zip(old, new, strict=True)], seq_axis)
            assert np.array_equal(changed.any(axis=other), at_length)


# ----- slot isolation ---------------------------------------------------------------------------------------------


def test_insert_leaves_other_slots_untouched(engine):
    runs: dict[int, SlotRun] = {}
    state = engine.init_state()
    for slot, n in enumerate((30, 5, 17, 25)):
        state = admit(engine, state, slot, PROMPTS[n], SamplingParams(max_tokens=40, ignore_eos=True), slot, runs)
    state = decode(engine, state, runs, dispatches=3)  # the other slots' caches now hold decoded tokens too
    before = page_arrays(state)
    lengths_before = np.asarray(state.lengths)
    state = admit(engine, state, 2, PROMPTS[32], SamplingParams(max_tokens=8), 9, runs)
    after = page_arrays(state)
    for b, a in zip(before, after, strict=True):
        others = [0, 1, 3]
        np.testing.assert_array_equal(a[others], b[others])
    assert not all(
        np.array_equal(a[2], b[2]) for b, a in zip(before, after, strict=True)
    )  # slot 2 itself was rewritten
    np.testing.assert_array_equal(np.asarray(state.lengths)[[0, 1, 3]], lengths_before[[0, 1, 3]])
    assert int(state.lengths[2]) == 32


def test_freed_slot_leaks_nothing_into_the_next_request(engine):
    short, params = PROMPTS[5], SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3)
    fresh = run_alone(engine, short, params, seed=3)

    runs: dict[int, SlotRun] = {}
    state = admit(engine, engine.init_state(), 0, PROMPTS[30], SamplingParams(max_tokens=90, ignore_eos=True), 1, runs)
    state = decode(engine, state, runs)
    assert len(runs[0].tokens) == 90  # slot 0's cache is now full of another request's K/V
    state = engine.release(state, 0)
    state = admit(engine, state, 0, short, params, 3, runs)
    decode(engine, state, runs)
    assert runs[0].tokens == fresh.tokens
    assert runs[0].logprobs == fresh.logprobs  # bit-identical: stale positions are masked, not just down-weighted


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
    state = engine.init_state()
    companions = [
        (PROMPTS[30], SamplingParams(max_tokens=50, ignore_eos=True)),
        (PROMPTS[3], SamplingParams(temperature=0.7, top_k=5, max_tokens=9, ignore_eos=True)),
        (PROMPTS[12], SamplingParams(temperature=1.3, seed=78, max_tokens=60, ignore_eos=True)),
    ]
    for slot, (p, sp) in enumerate(companions):
        state = admit(engine, state, slot, p, sp, 100 + slot, runs)
    state = decode(engine, state, runs, dispatches=2)  # join mid-batch, at a different decode window
    state = admit(engine, state, 3, prompt, params, params.seed, runs)
    decode(engine, state, runs)
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


def test_dispatch_length_is_a_runtime_argument(engine):
    """generate(state, steps) runs `steps` tokens per slot with the same program; mixed lengths give the same tokens."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    full = run_alone(engine, PROMPTS[12], params)
    runs: dict[int, SlotRun] = {}
    state = admit(engine, engine.init_state(), 1, PROMPTS[12], params, 0, runs)
    lengths = []
    for steps in (1, 3, 1, 4, 2, 4, 4, 4, 4, 4):
        state, out = engine.generate(state, steps)
        assert not out.valid[steps:].any()  # rows past `steps` carry nothing
        lengths.append(int(out.valid[:, 1].sum()))
        runs[1].tokens += [int(t) for t in out.tokens[out.valid[:, 1], 1]]
    assert runs[1].tokens == full.tokens
    assert lengths[:6] == [1, 3, 1, 4, 2, 4]
    for bad in (0, engine.config.decode_steps + 1):
        with pytest.raises(ValueError, match="steps must be in"):
            engine.generate(state, bad)


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


# ----- packed prefill ---------------------------------------------------------------------------------------------


def test_packs_respect_length_and_row_limits(engine):
    # max_prefill_len 32: 8 prompts per call at most; a pack closes when the next prompt would overflow either
    assert engine.packs([30, 3, 32, 1, 1, 1, 1, 1, 1, 1, 1, 1, 20, 13]) == [
        [0], [1], [2], [3, 4, 5, 6, 7, 8, 9, 10], [11, 12], [13],
    ]  # fmt: skip
    # a call of T >= 64 tokens takes up to T // 8 prompts (16 at 128), within prefill_segments
    cfg = engine.model_config
    wide = Engine(cfg, engine.params, dataclasses.replace(ENGINE_CONFIG, max_prefill_len=128, prefill_segments=12))
    assert [wide.prefill_rows(t) for t in (16, 64, 128)] == [8, 8, 12]
    assert wide.packs([1] * 10 + [70] + [1] * 12) == [list(range(8)), [8, 9, 10, *range(11, 20)], [20, 21, 22]]


@pytest.fixture(scope="module")
def small_pages_engine() -> Engine:
    """Pages of 8 positions: one packed prompt spans several pages, starting mid-pack."""
    cfg = tiny_config()
    config = dataclasses.replace(ENGINE_CONFIG, page_size=8, max_seq_len=64, prefill_segments=4)
    return Engine(cfg, init_params(cfg, jnp.float32), config)


@pytest.mark.parametrize("which", ["engine", "small_pages_engine"])
def test_packed_prefill_matches_one_at_a_time(which, request):
    """Prompts packed into shared prefill calls give each its own first token, logprobs and continuation."""
    engine = request.getfixturevalue(which)
    lengths = (5, 12, 1, 8, 3, 17, 30)
    settings = [
        SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True),
    ]
    requests = [(PROMPTS[n], settings[i % 3], 100 + i) for i, n in enumerate(lengths)]
    assert any(len(p) > 1 for p in engine.packs(lengths))  # several prompts do share a call
    prefixes = engine.prefill_batch(requests)
    for (prompt, params, seed), packed in zip(requests, prefixes, strict=True):
        alone = engine.prefill(prompt, params, seed)
        assert packed.token == alone.token and packed.length == len(prompt)
        if params.logprobs is not None:
            assert [i for i, _ in packed.logprobs.top] == [i for i, _ in alone.logprobs.top]
            np.testing.assert_allclose(packed.logprobs.logprob, alone.logprobs.logprob, atol=1e-5)
    # each packed row, inserted into its own slot and decoded alongside the others, continues as it does alone
    for group in (range(0, 4), range(4, 7)):
        runs: dict[int, SlotRun] = {}
        state = engine.init_state()
        for slot, i in enumerate(group):
            runs[slot] = SlotRun([prefixes[i].token], [])
            state = engine.insert(prefixes[i], state, slot)
        decode(engine, state, runs)
        for slot, i in enumerate(group):
            prompt, params, seed = requests[i]
            assert runs[slot].tokens == run_alone(engine, prompt, params, seed).tokens, f"prompt {i}"


# ----- prefix cache -----------------------------------------------------------------------------------------------


def _cold(engine: Engine, prompt, params: SamplingParams, seed: int) -> SlotRun:
    """The prompt computed in full (the prefix cache emptied first)."""
    engine.clear_prefix_cache()
    return run_alone(engine, prompt, params, seed)


def test_prefix_cache_hits_give_what_a_cold_prefill_gives(engine):
    """Prompts sharing a cached prefix compute only their rest (packed together, in a later pack of the same batch)
    and continue exactly as when computed in full."""
    base = PROMPTS[20]
    tails = [[3, 4, 5, 6, 7], [9, 8], [40, 41, 42], [77]]
    prompts = [base + t for t in tails]
    settings = [
        SamplingParams(max_tokens=10, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=10, ignore_eos=True),
    ]
    requests = [(p, settings[i % 2], 50 + i) for i, p in enumerate(prompts)]
    engine.clear_prefix_cache()
    before = dataclasses.replace(engine.prefix_stats)
    prefixes = engine.prefill_batch(requests)
    # max_prefill_len 32: the first prompt runs alone and is cached; the other three share the next call
    assert [p.cached for p in prefixes] == [0, 20, 20, 20]
    assert prefixes[1].device is prefixes[3].device and prefixes[0].device is not prefixes[1].device
    assert engine.prefix_stats.hit_tokens - before.hit_tokens == 60
    runs: dict[int, SlotRun] = {}
    state = engine.init_state()
    for slot, prefix in enumerate(prefixes):
        runs[slot] = SlotRun([prefix.token], [])
        state = engine.insert(prefix, state, slot)
    decode(engine, state, runs)
    for slot, (prompt, params, seed) in enumerate(requests):
        assert runs[slot].tokens == _cold(engine, prompt, params, seed).tokens, f"prompt {slot}"
    # logprobs of a hit match the cold ones
    engine.clear_prefix_cache()
    cold = engine.prefill(prompts[0], settings[0], 0)
    warm = engine.prefill([*prompts[0][:-1], 11], settings[0], 0)
    again = engine.prefill(prompts[0], settings[0], 0)
    assert (cold.cached, warm.cached, again.cached) == (0, 24, 24)
    assert again.token == cold.token and [i for i, _ in again.logprobs.top] == [i for i, _ in cold.logprobs.top]
    np.testing.assert_allclose(again.logprobs.logprob, cold.logprobs.logprob, atol=1e-5)


def test_prompts_sharing_an_opening_wait_for_the_first_to_be_cached(engine):
    """A batch whose prompts would fit one pack, two of them sharing a 9-token opening: the second waits for the
    first to be cached and computes only its tail, while an unrelated prompt still shares the first one's call;
    with the cache off all three share one call. Either way each continues exactly as a cold prefill."""
    opening = PROMPTS[12][:9]
    prompts = [[*opening, 3, 4, 5], [*opening, 7, 8, 9], PROMPTS[5]]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)
    requests = [(p, params, i) for i, p in enumerate(prompts)]
    assert engine.packs([len(p) for p in prompts]) == [[0, 1, 2]]  # without waiting: one call, nothing cached
    engine.clear_prefix_cache()
    prefixes = engine.prefill_batch(requests)
    assert [p.cached for p in prefixes] == [0, 9, 0]
    assert prefixes[0].device is prefixes[2].device and prefixes[1].device is not prefixes[0].device
    off = Engine(engine.model_config, engine.params, dataclasses.replace(ENGINE_CONFIG, prefix_cache_len=0))
    off_prefixes = off.prefill_batch(requests)
    assert len({id(p.device) for p in off_prefixes}) == 1 and [p.cached for p in off_prefixes] == [0, 0, 0]
    for i, (prompt, params_i, seed) in enumerate(requests):
        cold = _cold(engine, prompt, params_i, seed)
        np.testing.assert_allclose(prefixes[i].logprobs.logprob, cold.logprobs[0][0], atol=1e-5)
        state = engine.insert(prefixes[i], engine.init_state(), i)
        runs = {i: SlotRun([prefixes[i].token], [])}
        decode(engine, state, runs)
        assert runs[i].tokens == cold.tokens, f"prompt {i}"


def test_prefix_cache_stores_prompts_that_were_partly_cached(engine):
    """A prompt that read a third of itself from the cache is cached in full (its cached part copied from the cache,
    at a non-zero offset), and a prompt hitting it continues exactly as a cold prefill."""
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2)
    engine.clear_prefix_cache()
    b = PROMPTS[12]
    x = b[:10] + PROMPTS[17][:14]
    y = [*x[:22], 5, 6]
    assert [engine.prefill(p, params, 0).cached for p in (PROMPTS[16], b, x)] == [0, 0, 10]
    warm = engine.prefill(y, params, 0)
    assert warm.cached == 22
    runs: dict[int, SlotRun] = {}
    state = engine.insert(warm, engine.init_state(), 1)
    runs[1] = SlotRun([warm.token], [])
    decode(engine, state, runs)
    engine.clear_prefix_cache()
    cold = engine.prefill(y, params, 0)
    np.testing.assert_allclose(warm.logprobs.logprob, cold.logprobs.logprob, atol=1e-5)
    assert runs[1].tokens == run_alone(engine, y, params).tokens


def test_prefix_cache_starts_over_after_a_failed_prefill(engine, monkeypatch):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.clear_prefix_cache()
    engine.prefill(PROMPTS[20], params, 0)
    assert engine.prefill([*PROMPTS[20], 3], params, 0).cached == 20
    real = engine._compile

    def failing(kind, size):
        if kind == "store":
            raise RuntimeError("injected store failure")
        return real(kind, size)

    monkeypatch.setattr(engine, "_compile", failing)
    with pytest.raises(RuntimeError, match="injected"):
        engine.prefill(PROMPTS[30], params, 0)
    monkeypatch.undo()
    assert engine.prefill([*PROMPTS[20], 3], params, 0).cached == 0  # nothing cached before the failure is trusted


def test_prefix_cache_is_a_ring_that_forgets_the_oldest():
    """A cache of 40 positions holds one 25-token prompt: the next one overwrites it, and a prompt mostly cached
    already is not stored again; hits after the wrap still continue exactly as cold prefills."""
    cfg = tiny_config()
    engine = Engine(cfg, init_params(cfg, jnp.float32), dataclasses.replace(ENGINE_CONFIG, prefix_cache_len=40))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    a, b = PROMPTS[25], PROMPTS[20] + PROMPTS[5]
    assert engine.prefill(a, params, 0).cached == 0
    assert engine.prefill([*a[:20], 1, 2], params, 0).cached == 20  # 20 of 22 cached: not stored again
    assert engine.prefill(b, params, 0).cached == 0  # wraps to position 0, overwriting a
    hit = [*b[:24], 5]
    prefix = engine.prefill(hit, params, 0)
    assert prefix.cached == 24
    assert engine.prefill([*a[:20], 1, 2], params, 0).cached == 0  # a is gone
    runs: dict[int, SlotRun] = {}
    state = engine.insert(prefix, engine.init_state(), 2)
    runs[2] = SlotRun([prefix.token], [])
    decode(engine, state, runs)
    assert runs[2].tokens == _cold(engine, hit, params, 0).tokens
    # off: nothing is cached, and the engine runs as before
    off = Engine(cfg, engine.params, dataclasses.replace(ENGINE_CONFIG, prefix_cache_len=0))
    assert [off.prefill(a, params, 0).cached for _ in range(2)] == [0, 0]
    assert run_alone(off, hit, params).tokens == runs[2].tokens
    assert off.budget.prefix_cache_bytes == 0 and engine.budget.prefix_cache_bytes > 0


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
            state = engine.init_state()  # start-up allocation, before serving
            compiles.clear()
            caplog.clear()
            tok = make_tiny_tokenizer()
            scheduler = Scheduler(engine, tok, prefills_per_step=3, free_slot_decode_steps=1)
            settings = [
                SamplingParams(max_tokens=90, ignore_eos=True),
                SamplingParams(temperature=0.8, seed=1, max_tokens=40),
                SamplingParams(temperature=1.0, top_k=7, max_tokens=30, stop_token_ids=(5, 9)),
                SamplingParams(temperature=1.0, top_p=0.8, max_tokens=20, logprobs=4),
                SamplingParams(temperature=1.0, min_p=0.1, max_tokens=60, stop=("ab",)),
                SamplingParams(max_tokens=1, logprobs=0),
            ]
            # every prefill bucket (16, 32), every slot, every window (1, 2, 4 pages: up to 30 + 90 positions)
            lengths = (1, 16, 17, 32, 30, 5, 25, 12)
            requests = [(PROMPTS[n], settings[i % len(settings)]) for i, n in enumerate(lengths)]
            requests.append((PROMPTS[25] + [3, 4], settings[0]))  # read from the prefix cache
            hits = engine.prefix_stats.hit_prompts
            outputs = collect(scheduler, requests)
            for _ in range(3):
                scheduler.step()
            scheduler.cancel("r0")  # release a slot mid-generation
            scheduler.run_until_idle(max_steps=500)
            state = engine.init_state()  # a reset (the scheduler's recovery path) must not compile either
            state = admit(engine, state, 3, PROMPTS[20], SamplingParams(max_tokens=100, ignore_eos=True), 0, {})
            state = decode(engine, state, {})
            engine.release(state, 3)
            counting[0] = False
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert set(engine.compiled_shapes) >= {
        ("prefill", 16), ("prefill", 32), ("insert", 16), ("insert", 32), ("prefill_context", 16), ("store", 32),
        ("generate", 1), ("generate", 2), ("generate", 4), ("release", 0),
    }  # fmt: skip
    assert len(outputs) == len(requests) and all(outs[-1].finished for outs in outputs.values())
    assert engine.prefix_stats.hit_prompts > hits
    compiled = [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert compiles == [], f"{len(compiles)} compiles after warm-up: {compiled}"


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
    with pytest.raises(CapacityError, match=r"33 tokens.*max_prefill_len"):
        engine.prefill([5] * 33, SamplingParams(max_tokens=2), 0)
    with pytest.raises(CapacityError, match=r"max_tokens \(99\).*128 tokens.*at most 98"):
        engine.check_request(30, SamplingParams(max_tokens=99))
    engine.check_request(30, SamplingParams(max_tokens=98))  # exactly fills the context: allowed
    with pytest.raises(ValueError, match="token id 256"):
        engine.prefill([5, 256], SamplingParams(max_tokens=4), 0)


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


def test_capacity_refusals():
    cfg = tiny_config()
    params = init_params(cfg, jnp.float32)
    # 2**30 slots x 128 tokens x 512 B/token = 64 TiB: refused in __init__, before anything is allocated
    huge = dataclasses.replace(ENGINE_CONFIG, num_slots=2**30)
    with pytest.raises(CapacityError, match=r"1073741824 slots x 128 tokens.*use at most \d+ slots"):
        Engine(cfg, params, huge)
    with pytest.raises(CapacityError, match="multiple of page_size"):
        dataclasses.replace(ENGINE_CONFIG, max_seq_len=100)
    with pytest.raises(CapacityError, match="exceeds the model's context"):
        Engine(cfg, params, dataclasses.replace(ENGINE_CONFIG, max_seq_len=1024, max_prefill_len=32))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1])
def test_host_built_key_is_jax_key_of_seed(seed):
    # SlotSampling builds the key on the host (no compile per request); it must be the same key JAX would build
    built = SlotSampling.from_params(SamplingParams(temperature=1.0), seed, eos_token_ids=()).key[0]
    np.testing.assert_array_equal(built, np.asarray(jax.random.key_data(jax.random.key(seed))))
