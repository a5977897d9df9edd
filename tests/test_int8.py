"""int8 weights through the engine (EngineConfig.quantize="int8", engine.quant): the XLA path and the CPU kernel
compute the function of the dequantized weights, on one device, in bfloat16, and on a forced 8-device mesh; the
memory budget counts the int8 bytes; the CPU kernel's products against numpy.

The reference for "the function of the dequantized weights" is the plain float32 model run on the weights an int8
engine holds, dequantized (`dequantize_weights`): int8 rounding is the only difference between an int8 engine and the
float32 one, and it is measured on the real model by tests/test_quality.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import kernels, quant
from engine.config import tiny_config
from engine.engine import Engine, EngineConfig
from engine.model import Transformer, dequantize_weights, init_params, layer_name, unpack_head, unpack_layer
from engine.sampling import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = EngineConfig(num_slots=4, max_seq_len=128, max_prefill_len=64, page_size=16, decode_steps=4, dtype="float32")
PROMPTS = [[5, 17, 99, 3, 42, 8], list(range(20, 57)), [250, 1, 7]]


def _kernels_or_skip():
    try:
        kernels.load()
    except kernels.KernelUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request):
    cfg = tiny_config(tie_embeddings=request.param)
    return cfg, init_params(cfg, jnp.float32, seed=3)


def _dense(engine: Engine) -> dict:
    """The engine's weights as the plain model runs them: unpacked, dequantized, float32."""
    c = engine.model_config
    out = dequantize_weights(
        unpack_head({k: v for k, v in engine.params.items() if not k.startswith("layer_")}, c), jnp.float32
    )
    for name, layer in engine.params.items():
        if name.startswith("layer_"):
            out[name] = dequantize_weights(unpack_layer(dict(layer), c), jnp.float32)
    return out


_REFERENCE: dict[int, tuple] = {}


def _reference_logits(engine: Engine, ids: list[int]) -> np.ndarray:
    """[T, V] logits of the plain float32 model on the engine's dequantized weights."""
    if id(engine) not in _REFERENCE:
        model = Transformer(engine.model_config, jnp.float32, fuse_qkv=engine.fuse_qkv)
        forward = jax.jit(
            lambda p, t: model.apply({"params": p}, t, jnp.arange(t.shape[1], dtype=jnp.int32)[None])[0][0]
        )
        _REFERENCE[id(engine)] = (engine, forward, _dense(engine))
    _, forward, params = _REFERENCE[id(engine)]
    return np.asarray(forward(params, jnp.asarray([ids], jnp.int32)))


def _greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    prefix = engine.prefill(ids, SamplingParams(max_tokens=n, ignore_eos=True), 0)
    engine.insert(prefix, 0)
    got = [prefix.token]
    while engine.slot_active(0):
        out = engine.generate()
        got += out.tokens[out.valid[:, 0], 0].tolist()
    engine.release(0)
    return got


def _reference_greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by full forwards of the sequence padded to one length (causal: the padding after a position
    does not change its logits), so one compiled program serves every step."""
    seq = list(ids)
    for _ in range(n):
        padded = seq + [0] * (len(ids) + n - len(seq))
        seq.append(int(np.argmax(_reference_logits(engine, padded)[len(seq) - 1])))
    return seq[len(ids) :]


@pytest.mark.parametrize("linear", ["xla", "kernel"])
def test_int8_engine_computes_the_dequantized_model(model, linear):
    if linear == "kernel":
        _kernels_or_skip()
    cfg, params = model
    engine = Engine(cfg, params, dataclasses.replace(BASE, quantize="int8", linear=linear))
    assert engine.linear == linear
    stored = {a.dtype for a in jax.tree.leaves(engine.params)}
    assert jnp.dtype(jnp.int8) in stored
    forward = jax.jit(
        lambda p, t: engine.model.apply({"params": p}, t, jnp.arange(t.shape[1], dtype=jnp.int32)[None])[0][0]
    )
    for ids in PROMPTS:
        got = np.asarray(forward(engine.params, jnp.asarray([ids], jnp.int32)))
        np.testing.assert_allclose(got, _reference_logits(engine, ids), atol=2e-4, rtol=1e-4)
    for ids in PROMPTS:
        assert _greedy(engine, ids, 12) == _reference_greedy(engine, ids, 12)


def test_int8_weights_differ_from_float32_only_by_rounding(model):
    """The int8 engine is not the float32 one (a test that cannot tell them apart proves nothing), but its logits stay
    within the per-channel rounding's reach."""
    cfg, params = model
    f32 = Engine(cfg, params, dataclasses.replace(BASE, linear="xla"))
    int8 = Engine(cfg, params, dataclasses.replace(BASE, quantize="int8", linear="xla"))
    ids = PROMPTS[1]
    a, b = _reference_logits(f32, ids), _reference_logits(int8, ids)
    diff = np.abs(a - b)
    assert 0 < diff.max() < 0.05 * np.abs(a).max()


def test_kernel_and_xla_int8_engines_agree_and_convert_both_ways(model):
    """An int8 engine built from another int8 engine's (packed) weights holds the same int8 values: per-channel int8
    is a fixed point of dequantize -> quantize."""
    _kernels_or_skip()
    cfg, params = model
    xla = Engine(cfg, params, dataclasses.replace(BASE, quantize="int8", linear="xla"))
    kernel = Engine(cfg, xla.params, dataclasses.replace(BASE, quantize="int8", linear="kernel"))
    back = Engine(cfg, kernel.params, dataclasses.replace(BASE, quantize="int8", linear="xla"))
    for name in ("wqkv", "w_down"):
        np.testing.assert_array_equal(
            np.asarray(back.params[layer_name(1)][name]), np.asarray(xla.params[layer_name(1)][name])
        )
    for ids in PROMPTS:
        assert _greedy(kernel, ids, 10) == _greedy(xla, ids, 10)


def test_int8_in_bfloat16_tracks_float32():
    cfg = tiny_config()
    params = init_params(cfg, jnp.float32, seed=5)
    f32 = Engine(cfg, params, dataclasses.replace(BASE, quantize="int8", linear="xla"))
    bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    bf16 = Engine(cfg, bf16_params, dataclasses.replace(BASE, quantize="int8", linear="xla", dtype="bfloat16"))
    assert bf16.params[layer_name(0)]["w_down"].dtype == jnp.int8
    assert bf16.params[layer_name(0)]["w_down_scale"].dtype == jnp.float32
    forward = jax.jit(
        lambda e, p, t: e.model.apply({"params": p}, t, jnp.arange(t.shape[1], dtype=jnp.int32)[None])[0][0],
        static_argnums=0,
    )
    ids = jnp.asarray([PROMPTS[1]], jnp.int32)
    a = np.asarray(forward(f32, f32.params, ids))
    b = np.asarray(forward(bf16, bf16.params, ids), np.float32)
    # bf16 activations: ~3 significant digits per op through 2 layers
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_budget_counts_int8_bytes(model):
    cfg, params = model
    f32 = Engine(cfg, params, dataclasses.replace(BASE, linear="xla"))
    int8 = Engine(cfg, params, dataclasses.replace(BASE, quantize="int8", linear="xla"))
    assert int8.budget.weight_bytes == quant.weight_bytes(int8.params)
    assert f32.budget.weight_bytes == quant.weight_bytes(f32.params)
    # weights + one float32 scale per output row, norms in float32: a bit over a quarter of float32's bytes
    assert 0.25 < int8.budget.weight_bytes / f32.budget.weight_bytes < 0.3


def test_unknown_quantization_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="quantize must be one of none, int8, got 'int4'"):
        EngineConfig(quantize="int4")


def _packed(n, k, seed, gated=False):
    rng = np.random.default_rng(seed)
    w = quant.quantize(jnp.asarray(rng.normal(size=(2 * n if gated else n, k)).astype(np.float32)))
    dense = np.asarray(quant.dequantize(w), np.float64)
    return (quant.pack_gated if gated else quant.pack)(w, kernels.INT8_PANEL_ROWS), dense


def _activations_as_the_kernel_reads_them(x: np.ndarray) -> np.ndarray:
    """x [K, M] as the int8 kernel's integer path sees it (engine/kernels/linear_int8.cc): per token t, s_t = max |x| /
    32767 and x / s_t rounded half up to an integer, in float32 arithmetic as the kernel does it."""
    amax = np.abs(x).max(axis=0)
    scale = np.where(amax > 0, amax / np.float32(32767), np.float32(1)).astype(np.float32)
    inverse = np.where(amax > 0, np.float32(32767) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    u = np.floor((x * inverse).astype(np.float32) + np.float32(32768.5)).astype(np.int64) - 32768
    return u * scale.astype(np.float64)


@pytest.mark.parametrize("n, k", [(37, 50), (200, 33), (64, 576), (40, 1537)])
# one token; a partial tile (AVX2's integer path from 4); VNNI's first integer M; several tiles; two token blocks
@pytest.mark.parametrize("m", [1, 5, 8, 13, 70])
def test_int8_kernel_products_match_numpy(n, k, m):
    """Below kernels.int8_activation_min_tokens() the product is weight-only (float32 sums of the int8 values):
    numpy's float64 product to 1e-5. From there (AVX-512 VNNI or AVX2) activations are rounded to 16 bits per
    token and the sums are integers: numpy's product of the same rounded activations to 1e-5, and against the
    unrounded activations within the rounding's bound, sum_k |w[n, k]| s_t / 2 (an outlier of 300 and an all-zero
    token included)."""
    _kernels_or_skip()
    integer = 0 < kernels.int8_activation_min_tokens() <= m
    rng = np.random.default_rng(n * m + k)
    w, dense = _packed(n, k, seed=n + k)
    x = rng.normal(size=(k, m)).astype(np.float32)
    x[k // 3, 0] = 300.0  # one token with an outlier: its other features get coarser steps
    if m > 2:
        x[:, 2] = 0.0
    residual = rng.normal(size=(n, m)).astype(np.float32)
    seen = _activations_as_the_kernel_reads_them(x) if integer else x.astype(np.float64)
    bound = np.abs(dense).sum(axis=1)[:, None] * (np.abs(x).max(axis=0) / 32767 / 2)[None, :] if integer else 0.0

    def check(got, want, want_unrounded):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
        excess = np.abs(got - want_unrounded) - bound - 1e-5 * np.abs(want).max()
        assert excess.max() <= 0, f"off the unrounded product by {excess.max()} beyond the rounding's bound"

    got = np.asarray(jax.jit(lambda w, x: kernels.packed_int8_product(w, x, n))(w, x))
    check(got, dense @ seen, dense @ x)
    got = np.asarray(jax.jit(lambda w, x, r: kernels.packed_int8_product(w, x, n, residual=r))(w, x, residual))
    check(got, dense @ seen + residual, dense @ x + residual)
    w, dense = _packed(n, k, seed=n + k + 1, gated=True)
    gate_up = dense @ seen
    ref = gate_up[:n] * np.exp(-np.logaddexp(0, -gate_up[:n])) * gate_up[n:]  # silu(gate) * up, no overflow
    got = np.asarray(jax.jit(lambda w, x: kernels.packed_int8_product(w, x, n, gated=True))(w, x))
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
    if m > 2:
        assert not got[:, 2].any(), "an all-zero token gives zeros"


@pytest.mark.parametrize("n, k", [(37, 50), (64, 576), (40, 1537)])
def test_int8_one_token_product_is_the_same_with_and_without_prefetching(n, k):
    """The one-token loop compiled both ways (the engine picks one per model and machine): the same bits, plain,
    with a residual and gated."""
    _kernels_or_skip()
    rng = np.random.default_rng(n + k)
    x, r = rng.normal(size=(k, 1)).astype(np.float32), rng.normal(size=(n, 1)).astype(np.float32)
    (w, _), (g, _) = _packed(n, k, seed=n), _packed(n, k, seed=k, gated=True)

    def products(prefetch):
        return jax.jit(
            lambda w, g, x, r: (
                kernels.packed_int8_product(w, x, n, prefetch=prefetch),
                kernels.packed_int8_product(w, x, n, residual=r, prefetch=prefetch),
                kernels.packed_int8_product(g, x, n, gated=True, prefetch=prefetch),
            )
        )(w, g, x, r)

    for a, b in zip(products(False), products(True), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("m", [1, 13])
def test_int8_kernel_spreads_nan_and_inf_from_a_token(m):
    """A NaN or inf in one token's activations makes that token's outputs non-finite (NaN where it was NaN), on both
    paths, and leaves the other tokens' outputs as they were: the integer path never turns them into finite values."""
    _kernels_or_skip()
    n, k = 40, 64
    w, _ = _packed(n, k, seed=7)
    x = np.random.default_rng(8).normal(size=(k, m)).astype(np.float32)
    product = jax.jit(lambda w, x: kernels.packed_int8_product(w, x, n))
    clean = np.asarray(product(w, x))
    for bad in (np.nan, np.inf):
        poisoned = x.copy()
        poisoned[5, m - 1] = bad
        got = np.asarray(product(w, poisoned))
        assert not np.isfinite(got[:, m - 1]).any(), bad
        if np.isnan(bad):
            assert np.isnan(got[:, m - 1]).all()
        np.testing.assert_array_equal(got[:, : m - 1], clean[:, : m - 1])


def test_int8_kernel_multiplies_integers_as_the_cpu_allows():
    """The kernel's integer path follows the build's CPU (-march=native): AVX-512 VNNI and VBMI where it has them,
    else AVX2's vpmaddwd (from 8 and 4 tokens)."""
    _kernels_or_skip()
    with open("/proc/cpuinfo") as f:
        flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    want = "vnni" if {"avx512_vnni", "avx512vbmi", "avx512bw"} <= flags else "avx2" if "avx2" in flags else ""
    assert kernels.int8_integer_path() == want, sorted(flags)
    assert kernels.int8_activation_min_tokens() == {"vnni": 8, "avx2": 4, "": 0}[want]


def test_int8_kernel_refuses_mismatched_shapes():
    _kernels_or_skip()
    w, _ = _packed(40, 16, seed=0)
    with pytest.raises(ValueError, match="cannot multiply a packed int8 weight"):
        kernels.packed_int8_product(w, jnp.ones((17, 2), jnp.float32), 40)
    with pytest.raises(TypeError, match="int8 weights, float32 scales"):
        kernels.linear_int8(w.values.astype(jnp.float32), w.scale, jnp.ones((16, 2), jnp.float32), 40)


def test_int8_on_a_mesh_matches_one_device(tmp_path):
    """Weights and their scales sharded by the same rules (scales over the weight's output axes) on forced 8-device
    meshes: the same greedy tokens and logits as the single-device int8 engine (tests/int8_child.py)."""
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "int8_child.py"), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    kv = results.pop("kv_int8")
    assert set(results) == {"data:1,tensor:8", "data:2,tensor:4", "data:4,tensor:2"}
    for spec, r in results.items():
        assert r["tokens_equal"], spec
        assert r["max_logit_diff"] < 1e-4, (spec, r["max_logit_diff"])
    # under tensor parallelism the MLP's scales are split like its columns, the output projection's stay whole
    assert results["data:1,tensor:8"]["w_gate_up_scale"] == [None, "tensor"]
    assert results["data:1,tensor:8"]["w_down_scale"] == [None]
    # an int8 KV cache: the pool's values and scales split over kv heads alike, the same tokens as one device
    assert set(kv) == {f"{d} {m}" for d in ("float32", "bfloat16") for m in ("data:1,tensor:8", "data:2,tensor:4")}
    for name, r in kv.items():
        # the CPU decode kernel reads int8 pages on each device's kv heads (float32, slots not split over devices)
        assert r["attention"] == ("kernel" if name == "float32 data:1,tensor:8" else "xla"), name
        assert r["values"][:2] == [None, "tensor"] and r["scale"][:2] == [None, "tensor"], (name, r)
        if name.startswith("float32"):
            assert r["tokens_equal"], name
            assert r["max_logprob_diff"] < 1e-4, (name, r["max_logprob_diff"])
        else:  # bfloat16 sums in another order on each mesh: close, not equal
            assert r["max_logprob_diff"] < 0.1, (name, r["max_logprob_diff"])
