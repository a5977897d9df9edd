"""Checkpoint loaders (GGUF, HF safetensors), the orbax format, the conversion cache and their error messages."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from checkpoints import bundled, orbax_io
from checkpoints.errors import CheckpointError
from checkpoints.gguf import load_gguf, read_gguf_metadata
from checkpoints.hf import load_hf_folder
from engine.config import ModelConfig, tiny_config
from engine.tokenizer import bytes_to_unicode, make_tiny_tokenizer

# The corrupt-checkpoint test makes orbax abandon its other per-array read coroutines; the garbage collector reports
# them ("never awaited", "Event loop is closed") during whichever test runs later: expected, not a leak in our code.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER_SUFFIXES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}


def random_hf_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors under HF names in torch layout ([out, in]) for `config`."""
    rng = np.random.default_rng(seed)
    d, f, v = config.dim, config.mlp_dim, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {"model.embed_tokens.weight": r(v, d), "model.norm.weight": r(d)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": r(d),
            p + "self_attn.q_proj.weight": r(q, d),
            p + "self_attn.k_proj.weight": r(kv, d),
            p + "self_attn.v_proj.weight": r(kv, d),
            p + "self_attn.o_proj.weight": r(d, q),
            p + "post_attention_layernorm.weight": r(d),
            p + "mlp.gate_proj.weight": r(f, d),
            p + "mlp.up_proj.weight": r(f, d),
            p + "mlp.down_proj.weight": r(d, f),
        }
        if config.qkv_bias:
            tensors |= {p + "self_attn.q_proj.bias": r(q), p + "self_attn.k_proj.bias": r(kv)}
            tensors |= {p + "self_attn.v_proj.bias": r(kv)}
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = r(v, d)
    return tensors


def expected_tree(config: ModelConfig, t: dict[str, np.ndarray]) -> dict:
    """The engine's parameter tree, written out longhand from the mapping in the design doc."""
    d, n, k, h = config.dim, config.num_heads, config.num_kv_heads, config.head_dim

    def stack(suffix, fn):
        return np.stack([fn(t[f"model.layers.{i}.{suffix}"]) for i in range(config.num_layers)])

    layers = {
        "attn_norm": stack("input_layernorm.weight", lambda w: w),
        "wq": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(d, n, h)),
        "wk": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, h)),
        "wv": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, h)),
        "wo": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(n, h, d)),
        "mlp_norm": stack("post_attention_layernorm.weight", lambda w: w),
        "w_gate": stack("mlp.gate_proj.weight", lambda w: w.T),
        "w_up": stack("mlp.up_proj.weight", lambda w: w.T),
        "w_down": stack("mlp.down_proj.weight", lambda w: w.T),
    }
    if config.qkv_bias:
        layers["bq"] = stack("self_attn.q_proj.bias", lambda b: b.reshape(n, h))
        layers["bk"] = stack("self_attn.k_proj.bias", lambda b: b.reshape(k, h))
        layers["bv"] = stack("self_attn.v_proj.bias", lambda b: b.reshape(k, h))
    tree = {"embed": t["model.embed_tokens.weight"], "layers": layers, "final_norm": t["model.norm.weight"]}
    if not config.tie_embeddings:
        tree["lm_head"] = t["lm_head.weight"].T
    return tree


def assert_trees_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
        a = np.asarray(a)
        assert a.shape == e.shape and a.dtype == e.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, written independently of the loader."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: str,
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    skip: tuple[str, ...] = (),
    tensor_type: Callable[[str], gguf.GGMLQuantizationType] | None = None,
) -> None:
    """Writes `tensors` (HF names) as a GGUF the way llama.cpp names and permutes them: F32, or each tensor in
    `tensor_type(gguf_name)` (quantized by the gguf package)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.mlp_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    # A byte-level vocabulary of exactly 256 tokens, enough for the tokenizer built during conversion.
    spelling = bytes_to_unicode()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([spelling[b] for b in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    for name, value in tensors.items():
        if name in _GLOBAL:
            gguf_name = _GLOBAL[name]
        else:
            _, _, layer, suffix = name.split(".", 3)
            gguf_name = f"blk.{layer}.{LAYER_SUFFIXES[suffix]}"
        if gguf_name in skip:
            continue
        if arch == "llama" and gguf_name.endswith("attn_q.weight"):
            value = llama_cpp_permute(value, config.num_heads)
        elif arch == "llama" and gguf_name.endswith("attn_k.weight"):
            value = llama_cpp_permute(value, config.num_kv_heads)
        qtype = gguf.GGMLQuantizationType.F32 if tensor_type is None else tensor_type(gguf_name)
        writer.add_tensor(gguf_name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def write_hf_folder(path: str, config: ModelConfig, tensors: dict[str, np.ndarray], *, shards: int = 1) -> None:
    os.makedirs(path, exist_ok=True)
    hf_config = {
        "architectures": ["Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "intermediate_size": config.mlp_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, os.path.join(path, file))
        weight_map |= dict.fromkeys(part, file)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


LLAMA = tiny_config(vocab_size=256, num_layers=2)
QWEN = tiny_config(vocab_size=256, num_layers=2, qkv_bias=True, tie_embeddings=True)


# ---- GGUF ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, config", [("llama", LLAMA), ("qwen2", QWEN)])
def test_gguf_round_trip(tmp_path, arch, config):
    tensors = random_hf_tensors(config)
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, config, tensors, arch=arch)

    loaded_config, params = load_gguf(path)

    assert_trees_equal(params, expected_tree(config, tensors))
    assert loaded_config.num_layers == config.num_layers
    assert loaded_config.num_kv_heads == config.num_kv_heads
    assert loaded_config.head_dim == config.head_dim
    assert loaded_config.tie_embeddings == config.tie_embeddings
    assert loaded_config.qkv_bias == config.qkv_bias
    assert loaded_config.eos_token_ids == (1,)


def test_gguf_dtype_and_metadata(tmp_path):
    tensors = random_hf_tensors(LLAMA)
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, LLAMA, tensors)

    _, params = load_gguf(path, dtype=ml_dtypes.bfloat16)
    metadata = read_gguf_metadata(path)

    assert params["layers"]["wq"].dtype == ml_dtypes.bfloat16
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == 2
    assert metadata["tokenizer.ggml.tokens"][:2] == ["Ā", "ā"]
    assert not any(k.startswith("GGUF.") for k in metadata)


# ---- HF safetensors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, shards", [(LLAMA, 1), (QWEN, 3)])
def test_hf_folder_round_trip(tmp_path, config, shards):
    tensors = random_hf_tensors(config)
    write_hf_folder(str(tmp_path), config, tensors, shards=shards)

    loaded_config, params = load_hf_folder(tmp_path)

    assert_trees_equal(params, expected_tree(config, tensors))
    assert loaded_config.qkv_bias == config.qkv_bias
    assert loaded_config.tie_embeddings == config.tie_embeddings


def test_hf_folder_bfloat16_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    tensors = random_hf_tensors(LLAMA)
    write_hf_folder(str(tmp_path), LLAMA, tensors)
    os.remove(tmp_path / "model.safetensors")
    save_torch({n: torch.from_numpy(t).to(torch.bfloat16) for n, t in tensors.items()}, tmp_path / "m.safetensors")

    _, params = load_hf_folder(tmp_path)

    expected = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), expected_tree(LLAMA, tensors))
    assert_trees_equal(params, expected)


# ---- orbax -----------------------------------------------------------------------------------------------------------


def _tiny_checkpoint(directory: str) -> dict:
    params = expected_tree(LLAMA, random_hf_tensors(LLAMA))
    orbax_io.save_checkpoint(directory, LLAMA, params, None)
    return params


def _target(abstract, dtype=None):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sharding), abstract)


def test_orbax_save_abstract_restore(tmp_path):
    directory = str(tmp_path / "ckpt")
    params = _tiny_checkpoint(directory)

    abstract = orbax_io.abstract_params(directory)
    restored = orbax_io.restore_params(directory, _target(abstract))

    assert orbax_io.is_checkpoint(directory)
    assert orbax_io.load_config(directory) == LLAMA
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    assert_trees_equal(restored, params)


def test_orbax_restore_casts_dtype(tmp_path):
    directory = str(tmp_path / "ckpt")
    params = _tiny_checkpoint(directory)

    restored = orbax_io.restore_params(directory, _target(orbax_io.abstract_params(directory), jnp.bfloat16))

    assert_trees_equal(restored, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


def test_orbax_restore_into_named_sharding(tmp_path):
    if len(jax.devices()) < 2:
        # XLA reads the device count once per process: run this test again in a process with 2 CPU devices
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        node = f"{os.path.abspath(__file__)}::test_orbax_restore_into_named_sharding"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
        return
    directory = str(tmp_path / "ckpt")
    params = _tiny_checkpoint(directory)
    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    abstract = orbax_io.abstract_params(directory)
    spec = jax.sharding.PartitionSpec
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, spec(None, "model") if x.ndim > 1 else spec())
        ),
        abstract,
    )

    restored = orbax_io.restore_params(directory, target)

    assert restored["embed"].sharding == target["embed"].sharding
    assert_trees_equal(restored, params)


def test_convert_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path / "cache"))
    tensors = random_hf_tensors(LLAMA)
    source = str(tmp_path / "tiny.gguf")
    write_gguf(source, LLAMA, tensors)

    first = bundled.resolve_checkpoint(source)
    second = bundled.resolve_checkpoint(source)

    assert first == second and first.startswith(str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == [os.path.basename(first)]  # the temp dir was renamed, not left behind
    assert bundled.resolve_checkpoint(first) == first
    restored = orbax_io.restore_params(first, _target(orbax_io.abstract_params(first)))
    assert_trees_equal(restored, expected_tree(LLAMA, tensors))
    assert orbax_io.load_tokenizer(first).encode("hi") == [ord("h"), ord("i")]


def test_convert_hf_folder_bfloat16(tmp_path):
    tensors = random_hf_tensors(QWEN)
    source = str(tmp_path / "hf")
    write_hf_folder(source, QWEN, tensors)
    make_tiny_tokenizer().save(source)

    bundled.convert(source, tmp_path / "out", dtype=ml_dtypes.bfloat16, progress=False)

    abstract = orbax_io.abstract_params(tmp_path / "out")
    assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.bfloat16)}
    restored = orbax_io.restore_params(tmp_path / "out", _target(abstract))
    assert_trees_equal(restored, jax.tree.map(lambda x: x.astype(jnp.bfloat16), expected_tree(QWEN, tensors)))
    assert orbax_io.load_config(tmp_path / "out").qkv_bias


# ---- errors ----------------------------------------------------------------------------------------------------------


def test_gguf_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")


def test_gguf_not_a_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_text("this is not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a valid GGUF file"):
        read_gguf_metadata(path)


def test_gguf_truncated(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, LLAMA, random_hf_tensors(LLAMA))
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        load_gguf(path)


def test_gguf_unsupported_architecture(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, LLAMA, random_hf_tensors(LLAMA), arch="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        load_gguf(path)


def test_gguf_missing_tensor(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, LLAMA, random_hf_tensors(LLAMA), skip=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensors blk\.1\.ffn_up\.weight"):
        load_gguf(path)


def test_hf_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        load_hf_folder(tmp_path)
    write_hf_folder(str(tmp_path), LLAMA, random_hf_tensors(LLAMA))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_hf_folder(tmp_path)
    tensors = random_hf_tensors(LLAMA)
    del tensors["model.layers.0.mlp.up_proj.weight"], tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.0\.mlp\.up_proj\.weight, lm_head"):
        load_hf_folder(tmp_path)


def test_orbax_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist; re-run scripts/convert_checkpoint\.py"):
        orbax_io.load_config(tmp_path / "nope")
    directory = str(tmp_path / "ckpt")
    _tiny_checkpoint(directory)
    target = _target(orbax_io.abstract_params(directory))

    shutil.rmtree(glob.glob(os.path.join(directory, "params", "ocdbt.process_*"))[0])
    with pytest.raises(CheckpointError, match=r"cannot restore parameters .* re-run scripts/convert_checkpoint\.py"):
        orbax_io.restore_params(directory, target)

    os.remove(os.path.join(directory, "params", "_METADATA"))
    with pytest.raises(
        CheckpointError, match=r"cannot read parameter metadata .* re-run scripts/convert_checkpoint\.py"
    ):
        orbax_io.abstract_params(directory)

    os.remove(os.path.join(directory, "config.json"))
    assert not orbax_io.is_checkpoint(directory)
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        orbax_io.load_config(directory)


def test_orbax_shape_mismatch(tmp_path):
    directory = str(tmp_path / "ckpt")
    _tiny_checkpoint(directory)
    target = _target(orbax_io.abstract_params(directory))
    target["embed"] = jax.ShapeDtypeStruct((3, 3), jnp.float32, sharding=target["embed"].sharding)
    with pytest.raises(CheckpointError, match=r"\['embed'\] has shape \(256, 64\), the model expects \(3, 3\)"):
        orbax_io.restore_params(directory, target)


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        bundled.resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="neither a meshserve checkpoint"):
        bundled.resolve_checkpoint(str(tmp_path))


def test_convert_script_error_is_one_line(tmp_path):
    script = [sys.executable, os.path.join(REPO_ROOT, "scripts", "convert_checkpoint.py")]
    result = subprocess.run(
        [*script, "--source", "/nope.gguf", "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: source /nope.gguf does not exist; pass a .gguf file or an HF folder"
    )
    assert "Traceback" not in result.stderr


# ---- the real bundled model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_model():
    """(path, config, params) of the real bundled GGUF, dequantized once for the tests below."""
    try:
        path = bundled.bundled_gguf_path()
    except CheckpointError as e:
        pytest.skip(str(e))
    return path, *load_gguf(path)


@pytest.mark.slow
def test_bundled_gguf_shapes(bundled_model):
    _, config, params = bundled_model

    assert (config.num_layers, config.dim, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.head_dim, config.mlp_dim, config.vocab_size) == (64, 1536, 49152)
    assert config.tie_embeddings and not config.qkv_bias and "lm_head" not in params
    assert params["embed"].shape == (49152, 576)
    assert params["layers"]["wq"].shape == (30, 576, 9, 64)
    assert params["layers"]["wk"].shape == (30, 576, 3, 64)
    assert params["layers"]["wo"].shape == (30, 9, 64, 576)
    assert params["layers"]["w_down"].shape == (30, 1536, 576)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
@pytest.mark.reference
def test_bundled_gguf_matches_transformers(bundled_model):
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        pytest.skip("needs the `reference` extra (transformers + torch)")
    import transformers

    path, config, params = bundled_model
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    d, n, k, h = config.dim, config.num_heads, config.num_kv_heads, config.head_dim
    layer0 = "model.layers.0.self_attn."
    ours = {
        "model.embed_tokens.weight": params["embed"],
        layer0 + "q_proj.weight": params["layers"]["wq"][0].reshape(d, n * h).T,
        layer0 + "k_proj.weight": params["layers"]["wk"][0].reshape(d, k * h).T,
        layer0 + "v_proj.weight": params["layers"]["wv"][0].reshape(d, k * h).T,
        layer0 + "o_proj.weight": params["layers"]["wo"][0].reshape(n * h, d).T,
    }
    for name, value in ours.items():
        np.testing.assert_allclose(value, state[name], rtol=0, atol=1e-6, err_msg=name)
