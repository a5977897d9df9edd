"""The on-disk format of a meshserve checkpoint, the only format the engine restores from.

A checkpoint is a directory::

    <dir>/config.json   ModelConfig.to_json()
    <dir>/tokenizer/    Tokenizer.save()
    <dir>/params/       the parameter tree, written by orbax's StandardCheckpointHandler

config.json is written last, so a directory holding it was completely written. Restoring follows "abstract, then
shard, then materialize": `abstract_params` reads shapes and dtypes from orbax metadata without loading data, the caller
attaches shardings, and `restore_params` reads each shard straight onto its devices.

An int8 checkpoint (`scripts/convert_checkpoint.py --quantize=int8`) holds its weights as int8 values beside a float32
`<name>_scale` per output channel (checkpoints.hf.INT8_SCALE_AXES): about a quarter of float32's bytes on disk, read
back as int8 (`stored_quantization` tells the two kinds apart from the metadata).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from checkpoints.errors import CheckpointError
from engine.config import ModelConfig
from engine.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
PARAMS_DIR = "params"
_RECONVERT = "re-run scripts/convert_checkpoint.py"


def save_checkpoint(
    directory: str | os.PathLike, config: ModelConfig, params: Any, tokenizer: Tokenizer | None
) -> None:
    """Writes (or overwrites) a checkpoint directory; `tokenizer` may be None for weight-only tests."""
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    # Drop the completion marker first, so a crash while overwriting leaves a directory that reads as unfinished.
    if os.path.exists(os.path.join(directory, CONFIG_FILE)):
        os.remove(os.path.join(directory, CONFIG_FILE))
    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(params_dir):
        shutil.rmtree(params_dir)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save(params_dir, args=ocp.args.StandardSave(params))
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, TOKENIZER_DIR))
    tmp_config = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp_config, "w") as f:
        f.write(config.to_json())
    os.replace(tmp_config, os.path.join(directory, CONFIG_FILE))


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` looks like a completely written meshserve checkpoint."""
    directory = os.fspath(directory)
    return os.path.isfile(os.path.join(directory, CONFIG_FILE)) and os.path.isdir(os.path.join(directory, PARAMS_DIR))


def load_config(directory: str | os.PathLike) -> ModelConfig:
    """Reads the ModelConfig stored in a checkpoint directory."""
    directory = _existing_dir(directory)
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}, so it is not a finished checkpoint; {_RECONVERT}")
    try:
        with open(path) as f:
            return ModelConfig.from_json(f.read())
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupt ({e!r}); {_RECONVERT}") from e


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Loads the tokenizer stored in a checkpoint directory."""
    path = os.path.join(_existing_dir(directory), TOKENIZER_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory} has no {TOKENIZER_DIR}/ folder; {_RECONVERT}")
    return Tokenizer.load(path)


def abstract_params(directory: str | os.PathLike) -> Any:
    """The stored parameter tree as jax.ShapeDtypeStruct leaves (no sharding), read from orbax metadata only."""
    params_dir = _params_dir(directory)
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(params_dir))
        tree = metadata.tree if hasattr(metadata, "tree") else metadata
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
    except Exception as e:
        raise CheckpointError(f"cannot read parameter metadata in {params_dir} ({_one_line(e)}); {_RECONVERT}") from e
    if not jax.tree.leaves(abstract):
        raise CheckpointError(f"{params_dir} holds no parameters; {_RECONVERT}")
    return abstract


def stored_quantization(directory: str | os.PathLike) -> str:
    """The weight format a checkpoint stores: "int8" (int8 weights with `<name>_scale` leaves, see the module
    docstring) or "none"; read from the metadata only."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract_params(directory))
    names = {str(getattr(path[-1], "key", path[-1])): leaf.dtype for path, leaf in leaves}
    quantized = any(name.endswith("_scale") and names.get(name[: -len("_scale")]) == jnp.int8 for name in names)
    return "int8" if quantized else "none"


def restore_params(directory: str | os.PathLike, target: Any) -> Any:
    """Restores the parameters straight into `target`'s shardings, cast to `target`'s dtypes.

    `target` is a tree of jax.ShapeDtypeStruct with `.sharding` set, matching `abstract_params(directory)` in structure
    and shapes. Each device reads only its own shard; the full tree is never materialized in one place.
    """
    stored = abstract_params(directory)
    if jax.tree.structure(stored) != jax.tree.structure(target):
        raise CheckpointError(
            f"checkpoint {directory} holds a different parameter tree than the model expects; {_RECONVERT}"
        )
    for (path, s), t in zip(jax.tree_util.tree_leaves_with_path(stored), jax.tree.leaves(target), strict=True):
        if tuple(s.shape) != tuple(t.shape):
            raise CheckpointError(
                f"checkpoint {directory}: {jax.tree_util.keystr(path)} has shape {s.shape}, the model expects "
                f"{t.shape}; {_RECONVERT}"
            )
    params_dir = _params_dir(directory)
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            return checkpointer.restore(params_dir, args=ocp.args.StandardRestore(target))
    except Exception as e:
        raise CheckpointError(f"cannot restore parameters from {params_dir} ({_one_line(e)}); {_RECONVERT}") from e


def _existing_dir(directory: str | os.PathLike) -> str:
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist; {_RECONVERT}")
    return directory


def _params_dir(directory: str | os.PathLike) -> str:
    params_dir = os.path.join(_existing_dir(directory), PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{directory} has no {PARAMS_DIR}/ folder; {_RECONVERT}")
    return params_dir


def _one_line(error: Exception) -> str:
    # TensorStore errors run to many lines of spec dump; the first sentence says what went wrong.
    text = str(error).strip().split(" See full TensorStore details")[0].splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
