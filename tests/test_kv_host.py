"""The host-memory tier of the prefix cache: pages evicted from the device pool are copied to host RAM and come back
on a hit instead of being recomputed. Greedy tokens must be identical and logprobs within 1e-4 whether a prompt's
cache is cold, warm on the device, or evicted to host and restored; nothing may compile after warm-up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import monitoring

from engine.config import tiny_config
from engine.engine import Engine, EngineConfig
from engine.kv.host import HostMatch, HostTier
from engine.kv.pages import ROOT, page_key
from engine.model import init_params
from engine.sampling import SamplingParams
from engine.scheduler import Request, RequestOutput, Scheduler
from engine.tokenizer import make_tiny_tokenizer

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CONFIG = EngineConfig(
    num_slots=2,
    max_seq_len=128,
    max_prefill_len=32,
    min_prefill_len=16,
    page_size=16,
    kv_pages=17,  # 16 usable: two long conversations fill it, a third evicts the first
    decode_steps=4,
    dtype="float32",
)
RNG = np.random.default_rng(11)
CONVERSATIONS = [[int(t) for t in RNG.integers(2, 256, 70)] for _ in range(4)]


@pytest.fixture(scope="module")
def engines():
    cfg = tiny_config()
    params = init_params(cfg, jnp.float32)
    page_bytes = cfg.kv_bytes_per_token(4) * CONFIG.page_size
    host = Engine(cfg, params, EngineConfig(**{**CONFIG.__dict__, "host_kv_bytes": 64 * page_bytes}))
    host.warmup()
    device_only = Engine(cfg, params, CONFIG)
    return host, device_only


def run(scheduler: Scheduler, prompt: list[int], max_tokens: int = 12) -> RequestOutput:
    """One greedy request through `scheduler` (its engine keeps its cache between calls)."""
    outs: list[RequestOutput] = []
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    scheduler.submit(Request("r", prompt, params, outs.append))
    scheduler.run_until_idle(max_steps=100)
    last = outs[-1]
    last.token_ids = [t for o in outs for t in o.token_ids]
    last.logprobs = [lp for o in outs for lp in o.logprobs]
    return last


def test_host_tier_unit():
    tier = HostTier(capacity_bytes=3 * 100, page_bytes=100)
    k = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)  # [L, W, ...]
    v = -k
    tokens = list(range(8))
    keys = [page_key(ROOT, tokens[:2])]
    keys.append(page_key(keys[0], tokens[2:4]))
    tier.add([(keys[0], ROOT, (0, 1), True), (keys[1], keys[0], (2, 3), True)], (k, v))
    assert tier.chain(ROOT, tokens, 2, 0, 8) == HostMatch(tuple(keys))  # the third page is not there
    assert tier.chain(keys[0], tokens, 2, 1, 8) == HostMatch(tuple(keys[1:]))
    # the limit stops inside the second page: its first token continues the match
    assert tier.chain(ROOT, tokens, 2, 0, 3) == HostMatch(tuple(keys[:1]), keys[1], 1)
    got_k, got_v = tier.read(keys[::-1])
    np.testing.assert_array_equal(got_k, np.asarray(k)[:, [1, 0]])
    np.testing.assert_array_equal(got_v, -np.asarray(k)[:, [1, 0]])
    # a partly filled page under keys[1] holding [4]: a prompt continuing [4, 5] matches one token of it
    partial = page_key(keys[1], [4])
    tier.add([(partial, keys[1], (4,), False)], (k, v))
    assert tier.chain(ROOT, tokens, 2, 0, 8) == HostMatch(tuple(keys), partial, 1)
    assert tier.chain(ROOT, [0, 1, 2, 3, 9], 2, 0, 5) == HostMatch(tuple(keys))  # diverges at the page's start
    # 4 > 3 pages: the least recently used goes (the partial page: the last lookup touched only the full ones)
    tier.add([(page_key(ROOT, [9, 9]), ROOT, (9, 9), True)], (k, v))
    assert tier.pages == 3 and tier.stats.dropped_pages == 1
    assert keys[0] in tier and keys[1] in tier and partial not in tier
    assert tier.chain(ROOT, tokens, 2, 0, 8) == HostMatch(tuple(keys))  # and its index entry went with it
    tier.flush()
    tier.clear()
    assert tier.pages == 0 and tier.chain(ROOT, tokens, 2, 0, 8) == HostMatch(())
    with pytest.raises(ValueError, match="host_kv_bytes"):
        HostTier(capacity_bytes=10, page_bytes=100)


def test_evicted_to_host_and_restored_equals_cold(engines):
    host, device_only = engines
    host.clear_prefix_cache()
    tok = make_tiny_tokenizer()
    scheduler = Scheduler(host, tok)  # (a scheduler starts from an empty pool; the host tier stays)
    compiles = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            compiles.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        cold = run(scheduler, CONVERSATIONS[0])
        assert cold.cached_tokens == 0
        warm = run(scheduler, CONVERSATIONS[0] + [5])
        assert warm.cached_tokens == 70 and warm.host_cached_tokens == 0  # the whole prompt, on the device
        spilled = host.host.stats.spilled_pages
        for other in CONVERSATIONS[1:]:  # fill the pool: the first conversation's pages are evicted to host
            run(scheduler, other, max_tokens=40)
        assert host.host.stats.spilled_pages > spilled
        assert host.pool.match(CONVERSATIONS[0]).tokens < 64  # gone from the device
        restored = run(scheduler, CONVERSATIONS[0] + [5])
        host.pool.check()
    finally:
        monitoring.unregister_event_duration_listener(listener)
    # four full pages and the partly filled fifth (the conversation's last six tokens) come back from host memory
    assert restored.host_cached_tokens == restored.cached_tokens == 70
    assert host.host.stats.restored_pages >= restored.host_cached_tokens // CONFIG.page_size
    assert compiles == [], f"{len(compiles)} compiles after warm-up"
    # the same tokens and logprobs as computing everything
    device_only.clear_prefix_cache()
    reference = run(Scheduler(device_only, tok), CONVERSATIONS[0] + [5])
    assert reference.cached_tokens == 0
    for got in (warm, restored):
        assert got.token_ids == reference.token_ids
        np.testing.assert_allclose(
            [lp.logprob for lp in got.logprobs], [lp.logprob for lp in reference.logprobs], atol=1e-4
        )
    assert cold.token_ids == run(Scheduler(device_only, tok), CONVERSATIONS[0]).token_ids


def test_host_tier_is_refused_across_processes_and_sized_in_pages(engines):
    host, _ = engines
    assert host.host.capacity_pages == 64
    assert ("spill", 32) in host.shapes and ("restore", 32) in host.shapes
    assert jax.process_count() == 1
