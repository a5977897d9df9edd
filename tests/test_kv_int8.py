"""The int8 KV cache (EngineConfig.kv_dtype='int8', engine.attention.Int8Pages): int8 values in the pools' layouts and
one bfloat16 scale per (page, kv head, position), dequantized as attention reads them.

- quantization: the error of each element is at most half its vector's scale, and the rounding of the scale itself
  adds nothing (values are divided by the rounded scale);
- attention (decode and prefill over cached pages, XLA's formulation, float32 and bfloat16) over an int8 pool equals
  attention over the same pool dequantized: the scales are folded in exactly where they belong;
- the engine: every read of a token's K/V sees it as stored, so a cached prefix, the host tier and chunk boundaries
  change nothing (tokens equal, logprobs within 1e-4 of computing everything cold), and the engine's paged steps
  compute what the model's full forward with kv_dtype='int8' computes;
- memory: the pool, the budget, the host tier's pages and GetLoad's figures count the int8 bytes (2 * (H + 2) per
  token, kv head and layer); the CPU decode kernel reads int8 pages in place and decodes as XLA's formulation does.

The quality of the bundled model with an int8 KV cache is gated in tests/test_quality.py; meshes in
tests/int8_child.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.attention import (
    Int8Pages,
    PrefillPaging,
    as_stored,
    dequantize_pool,
    paged_attend_xla,
    paged_decode_attention_xla,
    prefill_attention_xla,
    quantize_kv,
    write_prefill_kv,
)
from engine.config import tiny_config
from engine.engine import Engine, EngineConfig
from engine.model import init_params
from engine.sampling import SamplingParams
from engine.scheduler import Request, RequestOutput, Scheduler
from engine.tokenizer import make_tiny_tokenizer

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
CONFIG = EngineConfig(
    num_slots=2,
    max_seq_len=128,
    max_prefill_len=32,
    min_prefill_len=16,
    page_size=16,
    kv_pages=17,  # 16 usable: two long conversations fill it, a third evicts the first
    decode_steps=4,
    dtype="float32",
    kv_dtype="int8",
)
RNG = np.random.default_rng(5)
CONVERSATIONS = [[int(t) for t in RNG.integers(2, 256, 70)] for _ in range(4)]


# ----- quantization and attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_kv_error_is_half_a_step(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4, 32)) * np.exp(rng.uniform(-8, 6, (64, 4, 1)))  # scales from 3e-4 to 400
    x[3, 1] = 0.0  # a zero vector: scale 0, values 0, no NaN
    x = jnp.asarray(x, dtype)
    values, scale = quantize_kv(x)
    assert values.dtype == jnp.int8 and scale.dtype == jnp.bfloat16 and scale.shape == (64, 4)
    assert int(jnp.abs(values.astype(jnp.int32)).max()) == 127
    s = np.asarray(scale, np.float32)[..., None]
    back = np.asarray(values, np.float32) * s
    err = np.abs(back - np.asarray(x, np.float32))
    assert np.all(err <= 0.5 * s * (1 + 1e-6) + 1e-30), float((err / np.maximum(s, 1e-30)).max())
    assert float(s[3, 1, 0]) == 0.0 and np.all(back[3, 1] == 0.0)
    # what attention sees, in x's dtype: exactly the dequantized values (rounded to x's dtype)
    np.testing.assert_array_equal(
        np.asarray(as_stored(x, "int8"), np.float32), np.asarray(back.astype(dtype), np.float32)
    )
    assert as_stored(x, "auto") is x
    # quantizing what the pool gives back gives the same int8 values and scales: a copied page stays what it was
    again, again_scale = quantize_kv(jnp.asarray(back))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(values))
    np.testing.assert_array_equal(np.asarray(again_scale, np.float32), np.asarray(scale, np.float32))


def _int8_pools(rng, num_pages, kh, h, p):
    k = quantize_kv(jnp.asarray(rng.standard_normal((num_pages, kh, p, h)) * 3, jnp.float32))
    v = quantize_kv(jnp.asarray(rng.standard_normal((num_pages, kh, p, h)), jnp.float32))
    k_pool = Int8Pages(k[0].transpose(0, 1, 3, 2), k[1])  # keys stored [Np, K, H, P]
    v_pool = Int8Pages(v[0], v[1])
    return k_pool, v_pool


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_over_int8_pages_equals_the_dequantized_pool(dtype):
    rng = np.random.default_rng(1)
    b, kh, g, h, p, w = 4, 2, 3, 32, 16, 5
    num_pages = b * w + 3
    k_pool, v_pool = _int8_pools(rng, num_pages, kh, h, p)
    table = jnp.asarray(rng.permutation(np.arange(1, num_pages))[: b * w].reshape(b, w), jnp.int32)
    table = table.at[3].set(0)  # an idle slot on the sink
    lengths = jnp.asarray([0, 17, 79, 5], jnp.int32)
    q = jnp.asarray(rng.standard_normal((b, kh, g, h)), dtype)
    k_new = jnp.asarray(rng.standard_normal((b, kh, h)), dtype)
    v_new = jnp.asarray(rng.standard_normal((b, kh, h)), dtype)

    out, k_after, v_after = jax.jit(paged_decode_attention_xla)(q, k_new, v_new, k_pool, v_pool, table, lengths)
    assert isinstance(k_after, Int8Pages) and k_after.values.dtype == jnp.int8
    # the new token was quantized into its slot's page at its length
    page, offset = int(table[1, 17 // p]), 17 % p
    np.testing.assert_allclose(
        np.asarray(dequantize_pool(k_after, keys=True))[page, :, :, offset],
        np.asarray(as_stored(k_new.astype(jnp.float32), "int8"))[1],
        rtol=1e-6,
    )
    # the reference: the same attention over the dequantized pools (after the write), in float32
    k_ref = dequantize_pool(k_after, keys=True)
    v_ref = dequantize_pool(v_after, keys=False)
    want = paged_attend_xla(q.astype(jnp.float32), k_ref, v_ref, table, lengths)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(want), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prefill_over_int8_context_equals_the_dequantized_pool(dtype):
    rng = np.random.default_rng(2)
    kh, g, h, p, t = 2, 2, 32, 16, 24
    num_pages = 12
    k_pool, v_pool = _int8_pools(rng, num_pages, kh, h, p)
    # two segments: the first continues 3 cached pages (the last one 5 positions full), the second sees page 7 only
    seg = np.full(t, -1, np.int32)
    seg[:14], seg[14:22] = 0, 1
    ctx_pages = np.asarray([2, 5, 9, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], np.int32)
    ctx_rows = np.asarray([1, 1, 1, 2] + [0] * 12, np.int32)
    ctx_valid = np.asarray([p, p, 5, p] + [0] * 12, np.int32)
    dest_page = np.where(seg >= 0, 10 + np.maximum(seg, 0), 0).astype(np.int32)
    dest_offset = np.concatenate([np.arange(14), np.arange(8), [0, 0]]).astype(np.int32)
    paging = PrefillPaging(
        jnp.asarray(dest_page), jnp.asarray(dest_offset), jnp.asarray(ctx_pages), jnp.asarray(ctx_rows),
        jnp.asarray(ctx_valid), jnp.asarray(1, jnp.int32), block_pages=16,
    )  # fmt: skip
    q = jnp.asarray(rng.standard_normal((t, kh, g, h)), dtype)
    k = jnp.asarray(rng.standard_normal((t, kh, h)), dtype)
    v = jnp.asarray(rng.standard_normal((t, kh, h)), dtype)
    k_pool, v_pool = write_prefill_kv(k_pool, v_pool, k, v, paging)
    k_seen, v_seen = as_stored(k, "int8"), as_stored(v, "int8")
    got = jax.jit(prefill_attention_xla)(q, k_seen, v_seen, jnp.asarray(seg), k_pool, v_pool, paging)
    f32 = jnp.float32
    want = prefill_attention_xla(
        q.astype(f32), k_seen.astype(f32), v_seen.astype(f32), jnp.asarray(seg),
        dequantize_pool(k_pool, keys=True), dequantize_pool(v_pool, keys=False), paging,
    )  # fmt: skip
    rows = seg >= 0
    np.testing.assert_allclose(
        np.asarray(got, np.float32)[rows], np.asarray(want)[rows], atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]
    )
    # the pack's own K/V went into the pages as stored: page 10 offset 3 holds token 3's key
    np.testing.assert_allclose(
        np.asarray(dequantize_pool(k_pool, keys=True))[10, :, :, 3],
        np.asarray(k_seen, np.float32)[3],
        rtol=1e-6 if dtype == jnp.float32 else 2**-8,  # as_stored rounds to bfloat16
    )


# ----- the engine -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines():
    cfg = tiny_config()
    params = init_params(cfg, jnp.float32)
    page_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 2) * CONFIG.page_size
    host = Engine(cfg, params, dataclasses.replace(CONFIG, host_kv_bytes=64 * page_bytes))
    device_only = Engine(cfg, params, CONFIG)
    return cfg, params, host, device_only


def run(scheduler: Scheduler, prompt: list[int], max_tokens: int = 12) -> RequestOutput:
    outs: list[RequestOutput] = []
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    scheduler.submit(Request("r", prompt, params, outs.append))
    scheduler.run_until_idle(max_steps=200)
    last = outs[-1]
    last.token_ids = [t for o in outs for t in o.token_ids]
    last.logprobs = [lp for o in outs for lp in o.logprobs]
    return last


def assert_same(got: RequestOutput, want: RequestOutput) -> None:
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose([lp.logprob for lp in got.logprobs], [lp.logprob for lp in want.logprobs], atol=1e-4)


def test_the_pool_is_int8_and_counted_in_int8_bytes(engines):
    cfg, _, host, device_only = engines
    state = device_only.state
    assert isinstance(state.k[0], Int8Pages) and state.k[0].values.dtype == jnp.int8
    assert state.k[0].scale.shape == (17, cfg.num_kv_heads, CONFIG.page_size)
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 2)
    assert device_only.budget.kv_bytes_per_token == per_token
    held = sum(leaf.nbytes for leaf in jax.tree.leaves((state.k, state.v)))
    assert held == device_only.budget.kv_bytes_total == per_token * CONFIG.page_size * 17
    assert device_only.describe_sharding().kv_bytes_per_device == held
    # the host tier sizes its pages in the same bytes
    assert host.host.capacity_pages == 64
    # 'auto' decodes through the CPU kernel, which reads int8 pages in place (tests/test_kernels.py; the Pallas
    # kernels read them too: tests/test_pallas_attention.py)
    assert device_only.attention == "kernel"


def test_the_cpu_kernels_and_xla_attend_to_an_int8_cache_alike(engines):
    """The CPU decode and prefill kernels on an int8 cache against XLA's formulation, through the engine: the same
    tokens, logprobs within 1e-4, for prompts prefilled in 32-token chunks (later chunks read the earlier ones' pages)
    and for a prompt whose first 70 tokens come from the prefix cache."""
    cfg, params, _, device_only = engines
    xla = Engine(cfg, params, dataclasses.replace(CONFIG, attention="xla"))
    assert (device_only.attention, xla.attention) == ("kernel", "xla")
    assert device_only.model.prefill_attend is not None and xla.model.prefill_attend is None
    tok = make_tiny_tokenizer()
    device_only.clear_prefix_cache()
    kernel_side, xla_side = Scheduler(device_only, tok), Scheduler(xla, tok)
    for prompt in (CONVERSATIONS[1], CONVERSATIONS[2], CONVERSATIONS[1] + [5, 9]):
        got, want = run(kernel_side, prompt, max_tokens=30), run(xla_side, prompt, max_tokens=30)
        assert_same(got, want)
    assert got.cached_tokens == want.cached_tokens == 70


def test_cached_chunked_and_host_restored_prompts_equal_cold(engines):
    cfg, params, host, device_only = engines
    tok = make_tiny_tokenizer()
    device_only.clear_prefix_cache()
    cold = run(Scheduler(device_only, tok), CONVERSATIONS[0] + [5])
    assert cold.cached_tokens == 0
    # one prefill chunk (max_prefill_len 128 reads the 71 tokens at once) against 32-token chunks
    whole = Engine(cfg, params, dataclasses.replace(CONFIG, max_prefill_len=128, prefix_caching=False))
    assert_same(run(Scheduler(whole, tok), CONVERSATIONS[0] + [5]), cold)

    host.clear_prefix_cache()
    scheduler = Scheduler(host, tok)
    run(scheduler, CONVERSATIONS[0])
    warm = run(scheduler, CONVERSATIONS[0] + [5])
    assert warm.cached_tokens == 70 and warm.host_cached_tokens == 0
    assert_same(warm, cold)
    for other in CONVERSATIONS[1:]:  # fill the pool: the first conversation's pages are evicted to host
        run(scheduler, other, max_tokens=40)
    host.host.flush()
    assert host.host.stats.spilled_pages > 0
    assert host.pool.match(CONVERSATIONS[0]).tokens < 64
    # the host tier keeps the int8 form: values int8, scales bfloat16, in the engine's own bytes per page
    batch = next(iter(host.host._entries.values())).batch.host()
    assert [a.dtype for a in batch] == [np.int8, jnp.bfloat16, np.int8, jnp.bfloat16]
    page_bytes = sum(a[:, 0].nbytes for a in batch)
    assert page_bytes == host.budget.kv_bytes_per_page
    restored = run(scheduler, CONVERSATIONS[0] + [5])
    assert restored.host_cached_tokens == restored.cached_tokens == 70
    assert_same(restored, cold)
    host.pool.check()


def test_paged_steps_compute_the_full_forward_with_int8_kv(engines):
    """The engine's logprobs (prefill in chunks through the pool, then decode reading every token back from int8
    pages) against the model's full forward without a pool, which sees each K/V as the pool stores it."""
    cfg, params, _, device_only = engines
    device_only.clear_prefix_cache()
    prompt = CONVERSATIONS[1][:45]
    got = run(Scheduler(device_only, make_tiny_tokenizer()), prompt, max_tokens=20)
    ids = prompt + got.token_ids
    logits = device_only.model.apply({"params": device_only.params}, jnp.asarray([ids]), jnp.arange(len(ids))[None])[0]
    logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    want = logp[len(prompt) - 1 : len(ids) - 1][np.arange(20), got.token_ids]
    np.testing.assert_allclose([lp.logprob for lp in got.logprobs], want, atol=1e-4)
    assert [int(t) for t in logp[len(prompt) - 1 : len(ids) - 1].argmax(-1)] == got.token_ids
    # and the int8 rounding is there: the float pool's engine gives other logprobs
    plain = Engine(cfg, params, dataclasses.replace(CONFIG, kv_dtype="auto", attention="xla"))
    other = run(Scheduler(plain, make_tiny_tokenizer()), prompt, max_tokens=20)
    diff = np.abs(np.asarray([lp.logprob for lp in other.logprobs]) - [lp.logprob for lp in got.logprobs])
    assert 1e-5 < diff.max() < 0.2


def test_bfloat16_engine_with_int8_kv_tracks_float32(engines):
    cfg, params, _, _ = engines
    tok = make_tiny_tokenizer()
    prompt = CONVERSATIONS[2][:40]
    f32 = run(Scheduler(Engine(cfg, params, dataclasses.replace(CONFIG, prefix_caching=False)), tok), prompt, 8)
    bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    bf16 = Engine(cfg, bf16_params, dataclasses.replace(CONFIG, dtype="bfloat16", prefix_caching=False))
    assert bf16.state.k[0].values.dtype == jnp.int8 and bf16.state.k[0].scale.dtype == jnp.bfloat16
    got = run(Scheduler(bf16, tok), prompt, 8)
    assert got.token_ids[:4] == f32.token_ids[:4]
    np.testing.assert_allclose(
        [lp.logprob for lp in got.logprobs[:4]], [lp.logprob for lp in f32.logprobs[:4]], atol=0.1
    )
