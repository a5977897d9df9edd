"""Builds a ready Engine + Tokenizer from a checkpoint spec: abstract params, then shardings, then restore.

An int8 checkpoint (checkpoints.orbax_io) is restored as int8: each weight's values and scales read straight into
their shardings (the scales split as the weight's output axes are), then split into per-layer buffers in the layout
an int8 engine runs; no float copy of the model is made on the host or the devices (the engine converts its weights
one layer at a time).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from checkpoints.bundled import resolve_checkpoint
from checkpoints.hf import INT8_SCALE_AXES, int8_scale_shape
from checkpoints.orbax_io import load_config, load_tokenizer, restore_params, stored_quantization
from engine.config import ModelConfig
from engine.engine import Engine, EngineConfig
from engine.model import abstract_params, fuse_layer, layer_name, to_runtime
from engine.paths import cache_root
from engine.placement import resolve_engine_rules
from engine.tokenizer import Tokenizer
from sharding.rules import MeshAxes, logical_to_spec, single_device_mesh, tree_shardings

log = logging.getLogger(__name__)


def load_engine(
    checkpoint: str | None,
    config: EngineConfig,
    *,
    mesh: Mesh | None = None,
    rules: dict[str, MeshAxes] | None = None,
) -> tuple[Engine, Tokenizer]:
    """Resolves `checkpoint` (None/'bundled', an orbax dir, a .gguf, an HF folder) and restores it into its shardings.

    The checkpoint is converted into the local cache once when it is not an orbax directory yet: into an int8
    checkpoint when `config.quantize` is "int8" (a GGUF's blocks go to int8 without a float32 copy of the model).
    An int8 checkpoint restores as int8; with quantize="none" the engine dequantizes it one layer at a time (logged).
    """
    start = time.perf_counter()
    directory = resolve_checkpoint(checkpoint, config.quantize)
    model_config = load_config(directory)
    tokenizer = load_tokenizer(directory)
    mesh = mesh or single_device_mesh()
    if stored_quantization(directory) == "int8":
        if config.quantize == "none":
            log.warning(
                "%s stores int8 weights; quantize='none' dequantizes them to %s (the int8 rounding stays, at %d times "
                "the memory; pass --quantize=int8 to run them as stored)",
                directory,
                jnp.dtype(config.dtype).name,
                jnp.dtype(config.dtype).itemsize,
            )
        stacked = restore_params(directory, int8_checkpoint_target(model_config, config.dtype, mesh, rules))
        params = unstack_int8_params(stacked, model_config, config.dtype, mesh, rules)
    else:
        stacked = restore_params(directory, Engine.checkpoint_target(model_config, config.dtype, mesh, rules))
        params = Engine.unstack_params(stacked, model_config, mesh, rules)
    engine = Engine(model_config, params, config, mesh=mesh, rules=rules)
    log.info("loaded %s from %s in %.1f s", model_config.name, directory, time.perf_counter() - start)
    return engine, tokenizer


def int8_checkpoint_target(
    model_config: ModelConfig, dtype: Any, mesh: Mesh, rules: dict[str, MeshAxes] | None = None
) -> Any:
    """The restore target of an int8 checkpoint: Engine.checkpoint_target with each INT8_SCALE_AXES weight as int8
    (its sharding unchanged) and its `<name>_scale` float32, split by the same rules over the weight's output axes."""
    target = Engine.checkpoint_target(model_config, dtype, mesh, rules)
    rules, _ = resolve_engine_rules(model_config, dtype, mesh, rules)

    def int8(tree: dict[str, Any], layers: tuple[str, ...]) -> dict[str, Any]:
        out = dict(tree)
        for name in INT8_SCALE_AXES.keys() & tree.keys():
            out[name] = jax.ShapeDtypeStruct(tree[name].shape, jnp.int8, sharding=tree[name].sharding)
            axes = layers + INT8_SCALE_AXES[name]
            shape = (model_config.num_layers,) * len(layers) + int8_scale_shape(model_config, name)
            sharding = NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))
            out[f"{name}_scale"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
        return out

    return int8(target, ()) | {"layers": int8(target["layers"], ("layers",))}


def unstack_int8_params(
    stacked: Any, model_config: ModelConfig, dtype: Any, mesh: Mesh, rules: dict[str, MeshAxes] | None = None
) -> Any:
    """An int8 checkpoint's stacked arrays -> the per-layer buffers of an int8 engine (engine.model.abstract_params
    with quantize="int8": wk / wv and w_gate / w_up stacked as the float path stacks them, their scales alike), on
    device, each in its sharding; the stacked arrays are freed.

    One program per layer index (the index an argument) rather than one for all layers: it compiles in a fraction of
    the time (SmolLM2 on XLA:CPU, 2 busy cores: 1.9 s against 10.6 s for one program writing all 30 layers), which
    was most of a warm start's load time."""
    abstract, logical = abstract_params(model_config, jnp.dtype(dtype), quantize="int8")
    rules, _ = resolve_engine_rules(model_config, dtype, mesh, rules)
    shardings = tree_shardings(logical, rules, mesh, abstract)
    top = {k: v for k, v in stacked.items() if k != "layers"}
    out = jax.jit(_int8_top, out_shardings={k: shardings[k] for k in top})(top)
    layer = jax.jit(_int8_layer, out_shardings=shardings[layer_name(0)])
    for i in range(model_config.num_layers):
        out[layer_name(i)] = layer(stacked["layers"], jnp.int32(i))
    for leaf in jax.tree.leaves(stacked):
        if isinstance(leaf, jax.Array):
            leaf.delete()
    return out


def _int8_top(top: dict[str, Any]) -> dict[str, Any]:
    """The arrays outside the layers in the runtime layout. A scale's axes are its weight's output axes in the order
    both layouts share, so only the values move."""
    return {k: v if k.endswith("_scale") else to_runtime(k, v) for k, v in top.items()}


def _int8_layer(layers: dict[str, Any], i: jax.Array) -> dict[str, Any]:
    """Layer `i` of the stacked layer arrays in the runtime layout, the parts of FUSED weights stacked (their scales
    alike): engine.model.unstack_layers for one layer of an int8 checkpoint."""
    layer = {n: a[i] if n.endswith("_scale") else to_runtime(n, a[i]) for n, a in layers.items()}
    scales = fuse_layer({n.removesuffix("_scale"): layer.pop(n) for n in list(layer) if n.endswith("_scale")})
    return fuse_layer(layer) | {f"{n}_scale": s for n, s in scales.items()}


def enable_compilation_cache(directory: str | None = None) -> str:
    """Persists compiled executables across runs (default: <meshserve cache>/xla), so a restarted server's warm-up
    loads its shapes instead of compiling them again. Returns the directory."""
    directory = directory or os.path.join(cache_root(), "xla")
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
