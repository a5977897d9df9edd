"""The CPU kernels (engine.kernels) against what they replace, over shapes that take each of their code paths, and
the engine's choice between them: decode attention against the XLA formulation, the packed-weight products against
float64 numpy and, through the engine, against XLA's dots.

Most engine tests (test_engine, test_parity, test_sharding, ...) already decode through the attention kernel, since
'auto' picks it on CPU in float32; test_parity also runs the packed products against HF. These tests pin each
kernel's contract on its own and the rules for when it is used.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import kernels
from engine.config import tiny_config
from engine.engine import Engine, EngineConfig
from engine.model import Packed, decode_attention_xla, init_params, unfuse_layer, unpack_head
from engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(kernels.compiler() is None, reason="no C++ compiler to build the kernel with")


def random_case(rng, b, k, g, h, p, window, lengths):
    q = rng.standard_normal((b, k, g, h), np.float32) / np.sqrt(h)
    k_new, v_new = rng.standard_normal((2, b, k, h), np.float32)
    k_pages = tuple(rng.standard_normal((b, k, h, p), np.float32) for _ in range(window))
    v_pages = tuple(rng.standard_normal((b, k, p, h), np.float32) for _ in range(window))
    return q, k_new, v_new, k_pages, v_pages, np.asarray(lengths, np.int32)


def run(fn, case):
    """(out, k_pages, v_pages) as numpy, from `fn` jitted; the pages are donated as the engine donates them."""
    q, k_new, v_new, k_pages, v_pages, lengths = case
    pages = jax.device_put((k_pages, v_pages))
    out, k_out, v_out = jax.jit(fn, donate_argnums=(3, 4))(q, k_new, v_new, *pages, lengths)
    return np.asarray(out), [np.asarray(x) for x in k_out], [np.asarray(x) for x in v_out]


def kernel(case):
    kernels.load()
    return run(kernels.decode_attention, case)


def assert_same(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=2e-6)
    for g, w in zip(got[1] + got[2], want[1] + want[2], strict=True):
        np.testing.assert_array_equal(g, w)  # the pages: the same positions written with the same values


# (B, K, G, H, P, window, lengths): G over the 1-4 register blocks (3: SmolLM2, 8: Llama 3 70B, 5: 4 + 1), head
# dims and page sizes that are and are not multiples of the vector blocks, lengths at 0, inside a page, on a page's
# last position, and past the window (nothing written, all positions visible).
CASES = [
    (3, 3, 3, 64, 64, 2, [0, 70, 127]),
    (2, 1, 8, 128, 16, 3, [47, 5]),
    (2, 2, 5, 72, 24, 2, [23, 30]),
    (4, 2, 1, 64, 128, 1, [1, 64, 127, 500]),
    (1, 4, 2, 32, 32, 4, [100]),
]


@pytest.mark.parametrize(("b", "k", "g", "h", "p", "window", "lengths"), CASES)
def test_kernel_matches_xla_decode_attention(b, k, g, h, p, window, lengths):
    case = random_case(np.random.default_rng(0), b, k, g, h, p, window, lengths)
    assert_same(kernel(case), run(decode_attention_xla, case))


def test_positions_past_a_slots_length_are_never_read():
    """Stale cache contents past a slot's length (here NaN and inf) change nothing: a freed slot's old K/V, or pages
    the next request has not reached yet."""
    rng = np.random.default_rng(1)
    q, k_new, v_new, k_pages, v_pages, lengths = random_case(rng, 3, 2, 3, 64, 32, 3, [0, 40, 70])
    clean = kernel((q, k_new, v_new, k_pages, v_pages, lengths))
    dirty_k, dirty_v = [x.copy() for x in k_pages], [x.copy() for x in v_pages]
    for s, n in enumerate(lengths):
        for c in range(3):
            start = max(0, min(32, n - c * 32))  # first stale position inside page c (length itself is written)
            dirty_k[c][s, :, :, start:] = np.nan
            dirty_v[c][s, :, start:, :] = np.inf
    out, _, _ = kernel((q, k_new, v_new, tuple(dirty_k), tuple(dirty_v), lengths))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, clean[0])


def test_softmax_stays_exact_at_large_scores():
    """Scores far apart (softmax weights down to ~e-80, which the kernel's exp flushes to 0) and one dominant key."""
    q, *rest = random_case(np.random.default_rng(2), 2, 1, 3, 64, 64, 2, [100, 127])
    case = (q * 40.0, *rest)
    assert_same(kernel(case), run(decode_attention_xla, case))


ENGINE_CONFIG = EngineConfig(
    num_slots=3, max_seq_len=128, max_prefill_len=32, min_prefill_len=16, page_size=32, decode_steps=4, dtype="float32"
)


def decode_three(config: EngineConfig, max_tokens: int, seed: int, **model: object):
    """(engine, greedy tokens, logprobs) of three requests of different lengths (windows of 1 to 4 pages as decoding
    goes on) on a tiny random model."""
    cfg = tiny_config(**model)
    eng = Engine(cfg, init_params(cfg, jnp.float32), config)
    rng = np.random.default_rng(seed)
    state = eng.init_state()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=True)
    for slot, n in enumerate((5, 17, 30)):
        state = eng.insert(eng.prefill([int(t) for t in rng.integers(2, 256, n)], params, seed=slot), state, slot)
    tokens, logprobs = [[] for _ in range(3)], []
    while any(eng.slot_active(s) for s in range(3)):
        state, out = eng.generate(state)
        for s in range(3):
            tokens[s] += [int(t) for t, ok in zip(out.tokens[:, s], out.valid[:, s], strict=True) if ok]
        logprobs.append(np.where(out.valid, out.logprob, 0.0)[:, :3])
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
    with pytest.raises(ValueError, match="attention must be one of auto, kernel, xla"):
        dataclasses.replace(ENGINE_CONFIG, attention="pallas")


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
    """Without donation XLA copies the pages before the kernel writes into them: the caller's arrays keep their
    contents, and the results still carry the new K/V."""
    q, k_new, v_new, k_pages, v_pages, lengths = random_case(np.random.default_rng(4), 2, 3, 3, 64, 64, 2, [5, 90])
    kept = jax.device_put((k_pages, v_pages))
    kernels.load()
    out, k_out, v_out = jax.jit(kernels.decode_attention)(q, k_new, v_new, *kept, lengths)
    want = run(decode_attention_xla, (q, k_new, v_new, k_pages, v_pages, lengths))
    assert_same((np.asarray(out), [np.asarray(x) for x in k_out], [np.asarray(x) for x in v_out]), want)
    for x, original in zip(kept[0] + kept[1], k_pages + v_pages, strict=True):
        np.testing.assert_array_equal(np.asarray(x), original)


PACKED = Packed(kernels.PANEL_ROWS, kernels.linear)


# (N, K, M): rows that do and do not fill the last panel, tokens through 64-token tiles, 16-token tiles and the
# padded tail (M = 1 is one-slot decode), more tokens than one work item's block (256), SmolLM2's decode shapes.
@pytest.mark.parametrize(
    ("n", "k", "m"),
    [(7, 5, 3), (13, 32, 17), (6, 64, 1), (100, 48, 80), (12, 8, 600), (960, 576, 64), (576, 1536, 64)],
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


def test_auto_packs_weights_from_16_slots_on_one_cpu_device_in_float32():
    cfg = tiny_config()
    params = init_params(cfg, jnp.float32)
    assert Engine(cfg, params, dataclasses.replace(ENGINE_CONFIG, num_slots=15)).linear == "xla"
    assert Engine(cfg, params, dataclasses.replace(ENGINE_CONFIG, num_slots=16)).linear == "kernel"
    bf16 = dataclasses.replace(ENGINE_CONFIG, num_slots=16, dtype="bfloat16")
    assert Engine(cfg, init_params(cfg, jnp.bfloat16), bf16).linear == "xla"
    with pytest.raises(ValueError, match=r"linear='kernel' cannot be used here: it takes float32.*linear='xla'"):
        Engine(cfg, init_params(cfg, jnp.bfloat16), dataclasses.replace(bf16, linear="kernel"))
    with pytest.raises(ValueError, match="linear must be one of auto, kernel, xla"):
        dataclasses.replace(ENGINE_CONFIG, linear="onednn")
