"""int8 checkpoints: a GGUF's tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1) and an HF folder's go to per-output-channel
int8 (engine.quant.Int8) a block of rows at a time, never as a float32 copy of the model; `convert(quantize="int8")`
and `scripts/convert_checkpoint.py --quantize=int8` store the int8 form in orbax, and `load_engine` restores it as
int8 (one device and forced 4-device meshes) or, asked for quantize="none", dequantizes it with a warning.

The reference for every int8 tensor is what the engine did before (and still does for a float checkpoint): the float32
tensor dequantized from the file, quantized by engine.quant.quantize in the runtime layout. The direct path gives the
same int8 values and scales bit for bit."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import tracemalloc

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import bundled, hf, orbax_io
from checkpoints.errors import CheckpointError
from checkpoints.gguf import load_gguf
from checkpoints.hf import INT8_SCALE_AXES, load_hf_folder
from engine import quant
from engine.engine import EngineConfig
from engine.load import int8_checkpoint_target, load_engine
from engine.model import PARAM_AXES, QUANTIZED, layer_name, to_checkpoint, to_runtime
from engine.sampling import SamplingParams
from tests.test_checkpoints import LLAMA, QWEN, random_hf_tensors, write_gguf, write_hf_folder

# The corrupt-checkpoint tests of test_checkpoints.py leave orbax coroutines for the garbage collector (see there).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = gguf.GGMLQuantizationType
BLOCK_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1]
ENGINE = EngineConfig(
    num_slots=2, max_seq_len=64, max_prefill_len=32, page_size=16, decode_steps=4, dtype="float32", linear="xla"
)
PROMPTS = [[5, 17, 99, 3, 42, 8], list(range(20, 45))]


def only(qtype: gguf.GGMLQuantizationType):
    """Every weight in `qtype`; norms and biases F32 (as llama.cpp writes them)."""
    return lambda name: T.F32 if name.endswith(("norm.weight", ".bias")) else qtype


def bundled_mix(name: str) -> gguf.GGMLQuantizationType:
    """The bundled SmolLM2 file's types: the token embedding Q8_0, the other weights Q4_1, norms F32."""
    return T.Q8_0 if name == "token_embd.weight" else only(T.Q4_1)(name)


def tiny_gguf(path, config=LLAMA, tensor_type=bundled_mix, arch="llama") -> str:
    write_gguf(str(path), config, random_hf_tensors(config), arch=arch, tensor_type=tensor_type)
    return str(path)


def expected_int8(key: str, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values in the checkpoint layout, scale) of one unstacked checkpoint tensor as the engine quantizes it: in the
    runtime layout, over the contracted axes (wo [D, N, H] contracts two; the parts of wkv, w_gate_up one)."""
    w = quant.quantize(jnp.asarray(to_runtime(key, dense)), QUANTIZED.get(key, 1))
    return np.asarray(to_checkpoint(key, w.values)), np.asarray(w.scale)


def assert_quantized_from(int8: dict, dense: dict) -> None:
    """`int8` (an int8 checkpoint tree) holds engine.quant.quantize of each of `dense`'s weights bit for bit, within
    half a scale step of the dense values, and `dense`'s other arrays unchanged."""

    def check(key: str, got: dict, value: np.ndarray, i: int | None) -> None:
        pick = (lambda a: a) if i is None else (lambda a: a[i])
        if key not in INT8_SCALE_AXES:
            np.testing.assert_array_equal(pick(got[key]), value, err_msg=key)
            return
        values, scale = expected_int8(key, value)
        got_values, got_scale = pick(got[key]), pick(got[f"{key}_scale"])
        assert got_values.dtype == np.int8 and got_scale.dtype == np.float32, key
        np.testing.assert_array_equal(got_scale, scale, err_msg=key)
        np.testing.assert_array_equal(got_values, values, err_msg=key)
        # |w - q * s| <= s / 2 (float32 rounding aside), the scale running over the runtime layout's output axes
        back = np.asarray(quant.dequantize(quant.Int8(to_runtime(key, got_values), got_scale)))
        err = np.abs(back - to_runtime(key, value)).reshape(got_scale.size, -1).max(axis=1)
        assert (err <= got_scale.reshape(-1) * (0.5 + 1e-5)).all(), key

    assert set(int8) == set(dense) | {f"{k}_scale" for k in dense if k in INT8_SCALE_AXES}
    assert set(int8["layers"]) == set(dense["layers"]) | {f"{k}_scale" for k in dense["layers"] if k in INT8_SCALE_AXES}
    for key, value in dense.items():
        if key != "layers":
            check(key, int8, value, None)
    for key, value in dense["layers"].items():
        for i in range(len(value)):
            check(key, int8["layers"], value[i], i)


# ---- the conversion: tensors to int8 ---------------------------------------------------------------------------------


def test_quantize_host_is_quantize_bit_for_bit():
    rng = np.random.default_rng(0)
    for shape, num_in in [((300, 576), 1), ((64, 4, 16), 2), ((2, 48, 32), 1)]:
        w = (rng.standard_normal(shape) * rng.uniform(1e-4, 10, size=shape[:1] + (1,) * (len(shape) - 1))).astype(
            np.float32
        )
        w[1] = 0  # an all-zero channel: scale 1
        host = quant.quantize_host(w, num_in)
        for device in (quant.quantize(jnp.asarray(w), num_in), jax.jit(quant.quantize, static_argnums=1)(w, num_in)):
            np.testing.assert_array_equal(host.scale, np.asarray(device.scale))
            np.testing.assert_array_equal(host.values, np.asarray(device.values))
        assert isinstance(host.values, np.ndarray) and (host.scale[1] == 1).all()


def test_int8_scale_axes_are_the_runtime_scales_axes():
    """The checkpoint's scale axes (checkpoints.hf) are those engine.model gives the runtime scales."""
    runtime = {"wk": "wkv", "wv": "wkv", "w_gate": "w_gate_up", "w_up": "w_gate_up"}
    for key, axes in INT8_SCALE_AXES.items():
        scale_axes = PARAM_AXES[f"{runtime.get(key, key)}_scale"]
        assert tuple(scale_axes[1:] if key in runtime else scale_axes) == axes, key


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_gguf_to_int8_equals_quantizing_the_dequantized_tensor(tmp_path, monkeypatch, qtype):
    """Every block type, a llama file (q / k rows permuted by llama.cpp), several row blocks per tensor."""
    monkeypatch.setattr(hf, "ROW_BLOCK_VALUES", 500)  # 7 rows of 64 per block: many blocks, the last one partial
    path = tiny_gguf(tmp_path / "tiny.gguf", tensor_type=only(qtype))

    config, dense = load_gguf(path)
    config8, int8 = load_gguf(path, quantize="int8")

    assert config8 == config
    assert_quantized_from(int8, dense)


def test_gguf_to_int8_qwen_tied_with_bias(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf", QWEN, arch="qwen2")
    _, dense = load_gguf(path)
    _, int8 = load_gguf(path, quantize="int8")
    assert "lm_head" not in int8 and int8["layers"]["bq"].dtype == np.float32
    assert_quantized_from(int8, dense)


def test_q8_0_row_keeps_its_widest_block_exactly(tmp_path):
    """A Q8_0 row's per-channel scale is its largest block scale, so that block's int8 values survive unchanged; the
    other blocks round onto the coarser grid (the cost measured in the README's quality figures)."""
    path = tiny_gguf(tmp_path / "tiny.gguf", tensor_type=only(T.Q8_0))
    _, int8 = load_gguf(path, quantize="int8")
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    blocks = np.asarray(tensor.data).reshape(LLAMA.vocab_size, -1, 34)  # [rows, blocks, 2 bytes f16 + 32 int8]
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8)
    widest = d.argmax(axis=1)
    rows = np.arange(LLAMA.vocab_size)
    np.testing.assert_allclose(int8["embed_scale"], d[rows, widest], rtol=1e-6)
    kept = int8["embed"].reshape(LLAMA.vocab_size, -1, 32)[rows, widest]
    np.testing.assert_array_equal(kept, q[rows, widest])


def test_hf_folder_to_int8(tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "ROW_BLOCK_VALUES", 1000)
    write_hf_folder(str(tmp_path), LLAMA, random_hf_tensors(LLAMA))
    _, dense = load_hf_folder(tmp_path)
    _, int8 = load_hf_folder(tmp_path, quantize="int8")
    assert_quantized_from(int8, dense)


def test_row_blocks_hold_one_block_of_float32_at_a_time(monkeypatch):
    """A tensor of 16 MiB of float32 rows converts with the int8 result plus about one block's float32 in memory."""
    rows, cols = 8192, 512
    monkeypatch.setattr(hf, "ROW_BLOCK_VALUES", 1 << 18)  # 1 MiB of float32 per block

    def read(start: int, stop: int) -> np.ndarray:
        return np.random.default_rng(start).standard_normal((stop - start, cols), np.float32)

    tracemalloc.start()
    try:
        w = hf.int8_by_row_blocks(rows, cols, read)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert w.values.shape == (rows, cols) and w.values.dtype == np.int8
    float32_bytes = rows * cols * 4
    # the result (a quarter of the float32 bytes) plus a few block-sized temporaries (1 MiB each)
    assert peak < float32_bytes / 4 + 8 * 2**20, peak


def test_unknown_quantization_is_refused(tmp_path):
    with pytest.raises(ValueError, match="quantize must be one of none, int8, got 'int4'"):
        load_gguf(tiny_gguf(tmp_path / "tiny.gguf"), quantize="int4")


# ---- the int8 orbax checkpoint ---------------------------------------------------------------------------------------


def _disk_bytes(directory) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)


def test_convert_int8_checkpoint_stores_int8(tmp_path):
    # float32 weights: orbax compresses its chunks, and a Q4 file's dequantized floats (16 levels a block) compress
    # to well under their size, random float32 hardly
    source = tiny_gguf(tmp_path / "tiny.gguf", tensor_type=only(T.F32))
    bundled.convert(source, tmp_path / "f32", progress=False)
    bundled.convert(source, tmp_path / "int8", progress=False, quantize="int8")

    abstract = orbax_io.abstract_params(tmp_path / "int8")
    assert abstract["layers"]["wq"].dtype == jnp.int8 and abstract["layers"]["wq_scale"].shape == (2, 4, 16)
    assert abstract["embed_scale"].dtype == jnp.float32 and abstract["final_norm"].dtype == jnp.float32
    assert orbax_io.stored_quantization(tmp_path / "int8") == "int8"
    assert orbax_io.stored_quantization(tmp_path / "f32") == "none"
    # the weights in a quarter of the bytes, plus a float32 scale per row of 64, the float32 norms and ~6 KB of
    # orbax metadata (measured: 0.31)
    params_ratio = _disk_bytes(tmp_path / "int8" / "params") / _disk_bytes(tmp_path / "f32" / "params")
    assert params_ratio < 0.35, params_ratio
    _, dense = load_gguf(source)
    restored = orbax_io.restore_params(tmp_path / "int8", jax.tree.map(_on_one_device, abstract))
    assert_quantized_from(jax.tree.map(np.asarray, restored), dense)


def _on_one_device(a: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_convert_script_quantize_int8(tmp_path):
    source = tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "ckpt"
    script = os.path.join(REPO_ROOT, "scripts", "convert_checkpoint.py")
    result = subprocess.run(
        [sys.executable, script, "--source", source, "--output", str(out), "--quantize=int8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"wrote int8 (float32 norms) checkpoint of {source} to {out}"
    assert orbax_io.stored_quantization(out) == "int8"


def _logits(engine, ids: list[int]) -> np.ndarray:
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    forward = jax.jit(lambda p, t: engine.model.apply({"params": p}, t, positions)[0][0])
    return np.asarray(forward(engine.params, jnp.asarray([ids], jnp.int32)))


def _greedy(engine, ids: list[int], n: int = 10) -> list[int]:
    prefix = engine.prefill(ids, SamplingParams(max_tokens=n, ignore_eos=True), 0)
    engine.insert(prefix, 0)
    got = [prefix.token]
    while engine.slot_active(0):
        out = engine.generate()
        got += out.tokens[out.valid[:, 0], 0].tolist()
    engine.release(0)
    return got


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_direct_int8_engine_matches_dequantize_then_quantize(tmp_path, cache):
    """load_engine(gguf, quantize="int8") converts the GGUF into an int8 cache entry and restores it as int8; its
    engine holds the same int8 values, and computes the same logits and greedy tokens, as an int8 engine built the
    old way (float32 checkpoint, quantized by the engine)."""
    source = tiny_gguf(tmp_path / "tiny.gguf")
    config = dataclasses.replace(ENGINE, quantize="int8")

    direct, tokenizer = load_engine(source, config)
    float_dir = bundled.resolve_checkpoint(source)
    old, _ = load_engine(float_dir, config)

    entries = sorted(e for e in os.listdir(cache) if e.startswith("tiny.gguf"))
    assert len(entries) == 2 and entries[1] == entries[0] + "-int8", entries
    assert orbax_io.stored_quantization(cache / entries[1]) == "int8"
    assert tokenizer.encode("hi") == [ord("h"), ord("i")]
    for name in ("embed", "lm_head", layer_name(1)):
        for path, a in jax.tree_util.tree_leaves_with_path(direct.params[name]):
            b = old.params[name] if not path else old.params[name][path[0].key]
            if a.dtype == jnp.int8:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            else:  # the engine's dequantize -> quantize of int8 weights may move a scale by its last float32 bit
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-7)
    for ids in PROMPTS:
        want = _logits(old, ids)
        # the scales' last float32 bit: measured 1.4e-5 at logits up to 14
        assert np.abs(_logits(direct, ids) - want).max() <= 1e-5 * np.abs(want).max()
    assert _greedy(direct, PROMPTS[1]) == _greedy(old, PROMPTS[1])


def test_int8_checkpoint_with_quantize_none_dequantizes_and_says_so(tmp_path, cache, caplog):
    source = tiny_gguf(tmp_path / "tiny.gguf")
    int8_dir = bundled.resolve_checkpoint(source, quantize="int8")
    int8, _ = load_engine(int8_dir, dataclasses.replace(ENGINE, quantize="int8"))

    with caplog.at_level(logging.WARNING, logger="engine.load"):
        dense, _ = load_engine(int8_dir, ENGINE)

    warnings = [r.getMessage() for r in caplog.records if r.name == "engine.load"]
    assert len(warnings) == 1 and "stores int8 weights; quantize='none' dequantizes them to float32" in warnings[0]
    assert {a.dtype for a in jax.tree.leaves(dense.params)} == {jnp.dtype(jnp.float32)}
    for ids in PROMPTS:  # the int8 engine's function, summed in another order (tolerance as in tests/test_int8.py)
        np.testing.assert_allclose(_logits(dense, ids), _logits(int8, ids), atol=2e-4, rtol=1e-4)


def test_float_checkpoint_refuses_an_int8_target(tmp_path):
    """The two formats are not mixed up: an int8 restore target on a float checkpoint names the mismatch."""
    source = tiny_gguf(tmp_path / "tiny.gguf")
    bundled.convert(source, tmp_path / "f32", progress=False)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with pytest.raises(CheckpointError, match="holds a different parameter tree"):
        orbax_io.restore_params(tmp_path / "f32", int8_checkpoint_target(LLAMA, jnp.float32, mesh))


def test_int8_checkpoint_restores_sharded(tmp_path):
    """On forced 4-device meshes each int8 weight and its scales are restored straight into their shardings (the
    scales split like the weight's output axes) and the engine computes the single-device engine's logits (decoding
    on meshes from int8 weights: tests/int8_child.py)."""
    if len(jax.devices()) < 4:
        # XLA reads the device count once per process: run this test again in a process with 4 CPU devices
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        node = f"{os.path.abspath(__file__)}::test_int8_checkpoint_restores_sharded"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO_ROOT,
        )
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
        return
    from sharding.mesh import make_mesh

    source = tiny_gguf(tmp_path / "tiny.gguf")  # 4 q heads, 2 kv heads, MLP 128, vocab 256
    directory = tmp_path / "int8"
    bundled.convert(source, directory, progress=False, quantize="int8")
    config = dataclasses.replace(ENGINE, quantize="int8")
    one, _ = load_engine(str(directory), config, mesh=make_mesh("data:1,tensor:1", devices=jax.devices()[:1]))
    expected = [_logits(one, ids) for ids in PROMPTS]
    for spec in ("data:2,tensor:2", "data:1,tensor:4"):
        mesh = make_mesh(spec)
        target = int8_checkpoint_target(LLAMA, jnp.float32, mesh)
        stacked = orbax_io.restore_params(directory, target)
        for name in ("w_gate", "w_gate_scale", "wo_scale", "wk", "wk_scale"):
            assert stacked["layers"][name].sharding == target["layers"][name].sharding, (spec, name)
        assert stacked["embed_scale"].sharding.spec == jax.sharding.PartitionSpec("tensor")
        assert stacked["layers"]["w_gate_scale"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
        engine, _ = load_engine(str(directory), config, mesh=mesh)
        layer = engine.params[layer_name(0)]
        assert layer["w_gate_up"].dtype == jnp.int8
        assert layer["w_gate_up_scale"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor"), spec
        assert layer["w_down_scale"].sharding.spec == jax.sharding.PartitionSpec(None), spec
        for ids, logits in zip(PROMPTS, expected, strict=True):
            # split products sum in another order: measured 1.7e-4 at logits up to 22
            assert np.abs(_logits(engine, ids) - logits).max() <= 2e-5 * np.abs(logits).max(), spec


# ---- the real bundled model ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_gguf_to_int8_equals_quantizing_the_float32_model():
    """SmolLM2's Q4_1 weights and Q8_0 embedding (tied head), straight to int8: the int8 form the engine made from
    the dequantized float32 model before, bit for bit."""
    try:
        path = bundled.bundled_gguf_path()
    except CheckpointError as e:
        pytest.skip(str(e))
    _, int8 = load_gguf(path, quantize="int8")
    _, dense = load_gguf(path)
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {T.F32, T.Q4_1, T.Q8_0}
    assert_quantized_from(int8, dense)
