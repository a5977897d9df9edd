"""Builds a ready Engine + Tokenizer from a checkpoint spec: abstract params, then shardings, then restore."""

from __future__ import annotations

import logging
import os
import time

import jax
from jax.sharding import Mesh

from checkpoints.bundled import resolve_checkpoint
from checkpoints.orbax_io import load_config, load_tokenizer, restore_params
from engine.engine import Engine, EngineConfig
from engine.paths import cache_root
from engine.tokenizer import Tokenizer
from sharding.rules import MeshAxes, single_device_mesh

log = logging.getLogger(__name__)


def load_engine(
    checkpoint: str | None,
    config: EngineConfig,
    *,
    mesh: Mesh | None = None,
    rules: dict[str, MeshAxes] | None = None,
) -> tuple[Engine, Tokenizer]:
    """Resolves `checkpoint` (None/'bundled', an orbax dir, a .gguf, an HF folder) and restores it into its shardings.

    The checkpoint is converted into the local cache once when it is not an orbax directory yet.
    """
    start = time.perf_counter()
    directory = resolve_checkpoint(checkpoint)
    model_config = load_config(directory)
    tokenizer = load_tokenizer(directory)
    mesh = mesh or single_device_mesh()
    stacked = restore_params(directory, Engine.checkpoint_target(model_config, config.dtype, mesh, rules))
    params = Engine.unstack_params(stacked, model_config, mesh, rules)
    engine = Engine(model_config, params, config, mesh=mesh, rules=rules)
    log.info("loaded %s from %s in %.1f s", model_config.name, directory, time.perf_counter() - start)
    return engine, tokenizer


def enable_compilation_cache(directory: str | None = None) -> str:
    """Persists compiled executables across runs (default: <meshserve cache>/xla), so a restarted server's warm-up
    loads its shapes instead of compiling them again. Returns the directory."""
    directory = directory or os.path.join(cache_root(), "xla")
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
