"""Loads a Hugging Face decoder folder (config.json + safetensors; Llama, Qwen2/3, Mistral, Gemma 2/3 text) into
meshserve's stacked parameter tree.

The tree layout (letters as in the README glossary: V vocab, D dim, L layers, N q heads, K kv heads, H head dim,
F mlp dim) is::

    embed [V, D]; final_norm [D]; lm_head [D, V] (only when embeddings are untied)
    layers: attn_norm [L, D]; wq [L, D, N, H]; wk, wv [L, D, K, H]; bq [L, N, H]; bk, bv [L, K, H] (qkv_bias only);
            wo [L, N, H, D]; mlp_norm [L, D]; w_gate, w_up [L, D, F]; w_down [L, F, D]
            q_norm, k_norm [L, H] (qk_norm only); post_attn_norm, post_mlp_norm [L, D] (sandwich_norms only)

`build_params` is shared with the GGUF loader, which hands it tensors already renamed and laid out as HF stores them.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm

from checkpoints.errors import CheckpointError
from engine.config import ModelConfig, UnsupportedModelError

Params = dict[str, Any]

# Per-layer HF tensor suffix -> (tree key, how to turn the torch [out, in] tensor into the tree's per-layer slice).
_LAYER_TENSORS: dict[str, tuple[str, Callable[[np.ndarray, ModelConfig], np.ndarray]]] = {
    "input_layernorm.weight": ("attn_norm", lambda w, c: w),
    "self_attn.q_proj.weight": ("wq", lambda w, c: w.T.reshape(c.dim, c.num_heads, c.head_dim)),
    "self_attn.k_proj.weight": ("wk", lambda w, c: w.T.reshape(c.dim, c.num_kv_heads, c.head_dim)),
    "self_attn.v_proj.weight": ("wv", lambda w, c: w.T.reshape(c.dim, c.num_kv_heads, c.head_dim)),
    "self_attn.o_proj.weight": ("wo", lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.dim)),
    "post_attention_layernorm.weight": ("mlp_norm", lambda w, c: w),
    "mlp.gate_proj.weight": ("w_gate", lambda w, c: w.T),
    "mlp.up_proj.weight": ("w_up", lambda w, c: w.T),
    "mlp.down_proj.weight": ("w_down", lambda w, c: w.T),
}
_BIAS_TENSORS: dict[str, tuple[str, Callable[[np.ndarray, ModelConfig], np.ndarray]]] = {
    "self_attn.q_proj.bias": ("bq", lambda b, c: b.reshape(c.num_heads, c.head_dim)),
    "self_attn.k_proj.bias": ("bk", lambda b, c: b.reshape(c.num_kv_heads, c.head_dim)),
    "self_attn.v_proj.bias": ("bv", lambda b, c: b.reshape(c.num_kv_heads, c.head_dim)),
}


_QK_NORM_TENSORS: dict[str, tuple[str, Callable[[np.ndarray, ModelConfig], np.ndarray]]] = {
    "self_attn.q_norm.weight": ("q_norm", lambda w, c: w),
    "self_attn.k_norm.weight": ("k_norm", lambda w, c: w),
}
# Gemma 2/3 norm both halves' inputs and outputs; there "post_attention_layernorm" is the attention output's norm
# and the MLP's input norm is "pre_feedforward_layernorm".
_SANDWICH_NORM_TENSORS: dict[str, tuple[str, Callable[[np.ndarray, ModelConfig], np.ndarray]]] = {
    "post_attention_layernorm.weight": ("post_attn_norm", lambda w, c: w),
    "pre_feedforward_layernorm.weight": ("mlp_norm", lambda w, c: w),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", lambda w, c: w),
}


def layer_tensors(config: ModelConfig) -> dict[str, tuple[str, Callable[[np.ndarray, ModelConfig], np.ndarray]]]:
    """Per-layer HF tensor suffixes this config needs, mapped to (tree key, layout transform)."""
    return {
        **_LAYER_TENSORS,
        **(_BIAS_TENSORS if config.qkv_bias else {}),
        **(_QK_NORM_TENSORS if config.qk_norm else {}),
        **(_SANDWICH_NORM_TENSORS if config.sandwich_norms else {}),
    }


def hf_tensor_names(config: ModelConfig) -> list[str]:
    """Every HF tensor name the parameter tree is built from, in load order."""
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_layers):
        names += [f"model.layers.{i}.{suffix}" for suffix in layer_tensors(config)]
    names.append("model.norm.weight")
    if not config.tie_embeddings:
        names.append("lm_head.weight")
    return names


def check_tensors_present(names: Iterable[str], available: Iterable[str], source: str) -> None:
    """Raises CheckpointError listing the first few of `names` that are not in `available`."""
    available = set(available)
    missing = [n for n in names if n not in available]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(
            f"{source} is missing tensors {shown}; the checkpoint is incomplete or does not match its config"
        )


def build_params(
    config: ModelConfig,
    get: Callable[[str], np.ndarray],
    dtype: Any = None,
    *,
    progress: bool = False,
) -> Params:
    """Builds the stacked tree from `get(hf_name) -> torch-layout array`.

    `dtype=None` keeps each tensor's stored dtype. Stacked arrays are allocated once and filled layer by layer, so peak
    host memory stays near one copy of the model.
    """
    names = hf_tensor_names(config)
    bar = tqdm(total=len(names), desc="loading tensors", unit="tensor", disable=not progress)

    def fetch(name: str) -> np.ndarray:
        array = np.asarray(get(name))
        bar.update(1)
        return array if dtype is None else array.astype(dtype, copy=False)

    params: Params = {"embed": fetch("model.embed_tokens.weight")}
    layers: dict[str, np.ndarray] = {}
    for i in range(config.num_layers):
        for suffix, (key, transform) in layer_tensors(config).items():
            value = transform(fetch(f"model.layers.{i}.{suffix}"), config)
            if key not in layers:
                layers[key] = np.empty((config.num_layers, *value.shape), value.dtype)
            layers[key][i] = value
    params["layers"] = layers
    params["final_norm"] = fetch("model.norm.weight")
    if not config.tie_embeddings:
        params["lm_head"] = np.ascontiguousarray(fetch("lm_head.weight").T)
    bar.close()
    return params


def load_hf_folder(path: str | os.PathLike, dtype: Any = None, *, progress: bool = False) -> tuple[ModelConfig, Params]:
    """Reads `config.json` and `*.safetensors` (single file or sharded) from an HF folder.

    `dtype=None` keeps the stored dtype (bfloat16 comes back as ml_dtypes.bfloat16).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"HF checkpoint folder {path} does not exist; pass a folder holding config.json")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path} has no config.json; download the full HF repo (config.json + *.safetensors)")
    try:
        config = ModelConfig.from_hf_config(config_path)
    except UnsupportedModelError as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path} is not a valid HF model config ({e!r}); re-download it") from e

    name_to_file = _safetensors_index(path)
    check_tensors_present(hf_tensor_names(config), name_to_file, path)
    readers: dict[str, Any] = {}

    def get(name: str) -> np.ndarray:
        file = name_to_file[name]
        if file not in readers:
            readers[file] = safe_open(file, framework="np")
        try:
            return readers[file].get_tensor(name)
        except TypeError:
            # numpy has no native bfloat16, so safetensors' numpy API refuses it; read the raw bytes instead.
            return _read_raw_tensor(file, name)

    params = build_params(config, get, dtype, progress=progress)
    return config, params


def _safetensors_index(path: str) -> dict[str, str]:
    """Maps each tensor name to the safetensors file holding it."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = {os.path.join(path, file) for file in weight_map.values()}
        absent = sorted(f for f in files if not os.path.isfile(f))
        if absent:
            raise CheckpointError(f"{path} is missing safetensors shards {absent}; download every shard")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors files; download the safetensors weights of the model")
    name_to_file = {}
    for file in files:
        try:
            with safe_open(file, framework="np") as f:
                name_to_file.update(dict.fromkeys(f.keys(), file))
        except Exception as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); re-download it") from e
    return name_to_file


_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}


def _read_raw_tensor(file: str, name: str) -> np.ndarray:
    """Reads one tensor straight from the safetensors layout: u64 header size, JSON header, raw little-endian data."""
    with open(file, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(header_size))[name]
        if entry["dtype"] not in _RAW_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        f.seek(8 + header_size + start)
        data = f.read(end - start)
    return np.frombuffer(data, dtype=_RAW_DTYPES[entry["dtype"]]).reshape(entry["shape"])
