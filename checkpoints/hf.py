"""Loads a Hugging Face decoder folder (config.json + safetensors; Llama, Qwen2/3, Mistral, Gemma 2/3 text) into
meshserve's stacked parameter tree.

The tree layout (letters as in the README glossary: V vocab, D dim, L layers, N q heads, K kv heads, H head dim,
F mlp dim) is::

    embed [V, D]; final_norm [D]; lm_head [D, V] (only when embeddings are untied)
    layers: attn_norm [L, D]; wq [L, D, N, H]; wk, wv [L, D, K, H]; bq [L, N, H]; bk, bv [L, K, H] (qkv_bias only);
            wo [L, N, H, D]; mlp_norm [L, D]; w_gate, w_up [L, D, F]; w_down [L, F, D]
            q_norm, k_norm [L, H] (qk_norm only); post_attn_norm, post_mlp_norm [L, D] (sandwich_norms only)

`build_params` is shared with the GGUF loader, which hands it tensors already renamed and laid out as HF stores them.

int8 checkpoints (`quantize="int8"`): each weight INT8_SCALE_AXES names is stored as int8 values in the same layout
(`wq` [L, D, N, H] int8) beside `<name>_scale`, float32, one scale per output channel over the weight's output axes
in their order in both layouts (`wq_scale` [L, N, H]): layer i's engine.quant.Int8 is (the values moved to the runtime
layout, engine.model.to_runtime, the scale as stored). The norms and biases stay in `dtype`. Each tensor is quantized
on the host a block of rows at a time (`int8_by_row_blocks`), so no float32 copy of the model is ever built.
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
from engine import quant
from engine.config import ModelConfig, UnsupportedModelError

Params = dict[str, Any]

# Tree keys an int8 checkpoint stores as int8 values + `<key>_scale`, with the scale's logical axes: the weight's
# output axes (per layer; stacked layer scales add a leading "layers"). The same axes as engine.model.PARAM_AXES gives
# the runtime scales (tests/test_checkpoints_int8.py checks they agree).
INT8_SCALE_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab",),
    "lm_head": ("vocab",),
    "wq": ("q_heads", "head_dim"),
    "wk": ("kv_heads", "head_dim"),
    "wv": ("kv_heads", "head_dim"),
    "wo": ("embed",),
    "w_gate": ("mlp",),
    "w_up": ("mlp",),
    "w_down": ("embed",),
}
ROW_BLOCK_VALUES = 1 << 22
"""How many values `int8_by_row_blocks` converts at once: 16 MiB of float32 rows (SmolLM2's 49152 x 576 embedding
in 7 blocks)."""

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


def int8_scale_shape(config: ModelConfig, key: str) -> tuple[int, ...]:
    """The shape of one (per-layer) scale of tree key `key` in an int8 checkpoint: its INT8_SCALE_AXES' sizes."""
    sizes = {
        "vocab": config.vocab_size,
        "embed": config.dim,
        "q_heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "mlp": config.mlp_dim,
    }
    return tuple(sizes[a] for a in INT8_SCALE_AXES[key])


def int8_by_row_blocks(num_rows: int, row_size: int, read: Callable[[int, int], np.ndarray]) -> quant.Int8:
    """engine.quant.quantize_host of an [out, in] tensor (numpy values [out, in] int8, scale [out] float32) whose rows
    `read(start, stop)` returns as floats [stop - start, in]; read ROW_BLOCK_VALUES values at a time, so the float32
    rows in memory at once are one block's, whatever the tensor's size."""
    step = max(1, ROW_BLOCK_VALUES // max(row_size, 1))
    values = np.empty((num_rows, row_size), np.int8)
    scale = np.empty((num_rows,), np.float32)
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        block = quant.quantize_host(read(start, stop))
        values[start:stop], scale[start:stop] = block.values, block.scale
    return quant.Int8(values, scale)


def quantize_tensor(array: np.ndarray) -> quant.Int8:
    """Per-output-channel int8 of a torch-layout [out, in...] array, a block of rows at a time (see int8_by_row_blocks);
    values come back [out, in...]."""
    rows = array.reshape(array.shape[0], -1)
    w = int8_by_row_blocks(rows.shape[0], rows.shape[1], lambda start, stop: rows[start:stop])
    return quant.Int8(w.values.reshape(array.shape), w.scale)


def build_params(
    config: ModelConfig,
    get: Callable[[str], np.ndarray],
    dtype: Any = None,
    *,
    progress: bool = False,
    quantize: str = "none",
    get_int8: Callable[[str], quant.Int8] | None = None,
) -> Params:
    """Builds the stacked tree from `get(hf_name) -> torch-layout array`.

    `dtype=None` keeps each tensor's stored dtype. Stacked arrays are allocated once and filled layer by layer, so peak
    host memory stays near one copy of the model. `quantize="int8"` stores the weights INT8_SCALE_AXES names as int8
    values + `<key>_scale` (see the module docstring), each from `get_int8(hf_name)` -> engine.quant.Int8 of the
    torch-layout tensor (numpy values [out, in], scale [out]); without `get_int8`, `get`'s tensor is quantized a block
    of rows at a time (`quantize_tensor`).
    """
    if quantize not in quant.QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(quant.QUANTIZATIONS)}, got {quantize!r}")
    names = hf_tensor_names(config)
    bar = tqdm(total=len(names), desc="loading tensors", unit="tensor", disable=not progress)

    def entries(name: str, key: str, transform: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
        """Tree entries of tensor `name` under `key`: the array in the tree's layout, or int8 values and scale."""
        if quantize == "int8" and key in INT8_SCALE_AXES:
            w = get_int8(name) if get_int8 is not None else quantize_tensor(np.asarray(get(name)))
            out = {key: transform(np.asarray(w.values)), f"{key}_scale": w.scale.reshape(int8_scale_shape(config, key))}
        else:
            array = np.asarray(get(name))
            out = {key: transform(array if dtype is None else array.astype(dtype, copy=False))}
        bar.update(1)
        return out

    params: Params = entries("model.embed_tokens.weight", "embed", lambda w: w)
    layers: dict[str, np.ndarray] = {}
    for i in range(config.num_layers):
        for suffix, (key, transform) in layer_tensors(config).items():
            for k, value in entries(f"model.layers.{i}.{suffix}", key, lambda w, t=transform: t(w, config)).items():
                if k not in layers:
                    layers[k] = np.empty((config.num_layers, *value.shape), value.dtype)
                layers[k][i] = value
    params["layers"] = layers
    params |= entries("model.norm.weight", "final_norm", lambda w: w)
    if not config.tie_embeddings:
        params |= entries("lm_head.weight", "lm_head", lambda w: np.ascontiguousarray(w.T))
    bar.close()
    return params


def load_hf_folder(
    path: str | os.PathLike, dtype: Any = None, *, progress: bool = False, quantize: str = "none"
) -> tuple[ModelConfig, Params]:
    """Reads `config.json` and `*.safetensors` (single file or sharded) from an HF folder.

    `dtype=None` keeps the stored dtype (bfloat16 comes back as ml_dtypes.bfloat16); `quantize="int8"`: the weights
    as int8 + scales (see build_params), one tensor read at a time.
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

    params = build_params(config, get, dtype, progress=progress, quantize=quantize)
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
