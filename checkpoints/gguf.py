"""Loads a llama.cpp GGUF file (llama or qwen2 architecture) into meshserve's stacked parameter tree.

Quantized tensors are dequantized on the host with the `gguf` package. With `quantize="int8"` the weights go from the
file's blocks (Q8_0, Q4_0, Q4_1, ..., or F32 / F16 / BF16) to per-output-channel int8 (engine.quant.Int8) a block of
rows at a time (checkpoints.hf.int8_by_row_blocks): the float32 rows in memory at once are one block's (16 MiB), never
the model's. The result is engine.quant.quantize of the dequantized tensor, bit for bit.

Why per channel, also for Q8_0 (32 int8 values sharing one scale per block): the engine's int8 type has one scale per
output row, and the requantization costs little, measured with bench/quality.py on the shipped corpus against the
float32 engine (the file dequantized). SmolLM2's Q8_0 token embedding (tied to the head) requantized per row, the
rest float32: perplexity +0.06%, top-1 agreement 98.2%; every weight int8: +0.62% / 96.0%, against +0.53% / 97.1%
with the embedding kept at the file's values. A row's scale is its largest block scale (that block's values are kept
exactly); the other blocks round onto that coarser grid, error <= scale / 2 per value (1.2% of the embedding's RMS),
the bound of quantizing the original float weights per channel. Block scales would need a second int8 type in every
product helper for under 0.1% of perplexity.

Two llama.cpp conventions are undone here so the tree matches what the HF loader produces:

* Tensor shapes in the file are in ggml order (fastest axis first); the dequantized numpy array is [out, in], the same
  as a torch Linear weight.
* llama.cpp's converter permutes the rows of llama `attn_q` / `attn_k` so its RoPE can rotate interleaved pairs; the
  engine rotates halves (HF "rotate_half"), so those rows are permuted back. Qwen2 files are not permuted.
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np

from checkpoints.errors import CheckpointError
from checkpoints.hf import Params, build_params, check_tensors_present, hf_tensor_names, int8_by_row_blocks
from engine import quant
from engine.config import ModelConfig, UnsupportedModelError

# HF tensor name suffix -> GGUF tensor name suffix; per-layer names live under `model.layers.{i}.` / `blk.{i}.`.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    """The GGUF name llama.cpp gives the HF tensor `hf_name`."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    _, _, layer, suffix = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[suffix]}"


def unpermute_llama_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverts llama.cpp's `permute(w, n_head)` on the rows of a q or k projection ([num_heads * H, ...]).

    llama.cpp reorders each head's rows from (half, pair) to (pair, half) so that rotating adjacent pairs equals HF's
    rotate_half; swapping the two axes back restores the HF row order.
    """
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Returns the file's key/value metadata as python values (str, int, float, bool, lists of those)."""
    return _metadata(_open_reader(path))


def load_gguf(
    path: str | os.PathLike, dtype: Any = np.float32, *, progress: bool = False, quantize: str = "none"
) -> tuple[ModelConfig, Params]:
    """Reads config and dequantized parameters (numpy, in `dtype`) from a llama or qwen2 GGUF file; with
    `quantize="int8"` the weights as int8 values + float32 scales per output channel (checkpoints.hf's int8 layout),
    straight from the file's blocks."""
    config, params, _ = load_gguf_with_metadata(path, dtype, progress=progress, quantize=quantize)
    return config, params


def load_gguf_with_metadata(
    path: str | os.PathLike, dtype: Any = np.float32, *, progress: bool = False, quantize: str = "none"
) -> tuple[ModelConfig, Params, dict[str, Any]]:
    """`load_gguf` plus the file's metadata, for callers that also build the tokenizer (parsing it takes seconds)."""
    path = os.fspath(path)
    reader = _open_reader(path)
    metadata = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    try:
        config = ModelConfig.from_gguf(metadata, has_output_weight="output.weight" in tensors)
    except UnsupportedModelError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has incomplete model metadata ({e!r}); re-export it with llama.cpp") from e
    hf_names = hf_tensor_names(config)
    check_tensors_present([gguf_tensor_name(n) for n in hf_names], tensors, path)
    permuted = metadata["general.architecture"] == "llama"

    def unpermute(hf_name: str, rows: np.ndarray) -> np.ndarray:
        if permuted and hf_name.endswith("q_proj.weight"):
            return unpermute_llama_qk(rows, config.num_heads)
        if permuted and hf_name.endswith("k_proj.weight"):
            return unpermute_llama_qk(rows, config.num_kv_heads)
        return rows

    def get(hf_name: str) -> np.ndarray:
        tensor = tensors[gguf_tensor_name(hf_name)]
        # ggml lists the fastest-varying axis first; numpy wants it last.
        values = _dequantize(path, tensor, tensor.data).reshape(tuple(int(d) for d in reversed(tensor.shape)))
        return unpermute(hf_name, values)

    def get_int8(hf_name: str) -> quant.Int8:
        tensor = tensors[gguf_tensor_name(hf_name)]
        shape = tuple(int(d) for d in reversed(tensor.shape))  # [out, in]
        # one row of the file per output channel: a quantized tensor's rows are whole blocks of bytes
        rows = tensor.data.reshape(shape[0], -1)
        w = int8_by_row_blocks(shape[0], int(np.prod(shape[1:])), lambda a, b: _dequantize(path, tensor, rows[a:b]))
        # the permutation moves whole rows, each with its scale
        return quant.Int8(unpermute(hf_name, w.values.reshape(shape)), unpermute(hf_name, w.scale))

    params = build_params(config, get, dtype, progress=progress, quantize=quantize, get_int8=get_int8)
    return config, params, metadata


def _dequantize(path: str, tensor: Any, data: np.ndarray) -> np.ndarray:
    """float32 values of `data` (a tensor's rows as the file stores them: blocks of bytes, or floats)."""
    try:
        return gguf.quants.dequantize(data, tensor.tensor_type)
    except (ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: cannot dequantize {tensor.name} ({e}); use a supported quantization") from e


def _open_reader(path: str | os.PathLike) -> gguf.GGUFReader:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path} does not exist; pass the path of an existing .gguf file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        # The reader memory-maps the file and fails with assorted errors on bad magic or truncated data.
        raise CheckpointError(
            f"{path} is not a valid GGUF file or is truncated ({e}); re-download or re-export it"
        ) from e


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    # Keys under "GGUF." are the reader's own header bookkeeping (version, counts), not model metadata.
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
