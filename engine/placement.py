"""Where the engine's arrays live and how much room they get, and which kernels that placement lets it run.

- Sharding: the rule table in effect for a model on a mesh (`resolve_engine_rules`: non-dividing axes replicated,
  with notes saying what that costs), the checkpoint's restore target and the unstacking into per-layer buffers, the
  shardings of the device state (`state_shardings`), and the report of bytes per device (`sharding_report`).
- Memory: `MemoryBudget` (weights and KV pool bytes, printed at start-up), the pool's size when the config leaves
  it open (`memory_budget`) and the refusal of a pool that cannot hold one full-context request or does not fit
  the device (`check_fits`).
- Kernels: which decode attention and weight products this engine runs (`choose_attention`, `choose_linear`) and
  the kernels wrapped to run on each device's shard (`kernel_attend`, `pallas_attend`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine import kernels, pallas_attention, quant
from engine.api import CapacityError, EngineConfig
from engine.attention import (
    K_POOL_AXES,
    KV_SCALE_DTYPE,
    SCALE_AXES,
    V_POOL_AXES,
    Int8Pages,
    init_pool,
    write_decode_kv,
)
from engine.config import ModelConfig
from engine.model import abstract_params, checkpoint_shape, stacked_axes, unfuse_layer, unstack_layers
from engine.sampling import SlotSampling
from engine.steps import DecodeState
from sharding.rules import (
    DEFAULT_RULES,
    ArrayLayout,
    MeshAxes,
    ShardingReport,
    logical_to_spec,
    resolve_rules,
    shard_bytes,
    tree_shardings,
)

log = logging.getLogger(__name__)

MIN_KERNEL_LINEAR_SLOTS = 16
"""Slots from which `linear='auto'` packs the weights for the CPU kernel: a decode step's products then fill at
least one 16-float vector of tokens. One slot is the other case 'auto' takes: the kernel's one-token path streams a
panel as the flat run of floats it is (1.10x XLA's matrix-vector products in W1 on a 2-core Zen 5 VM, alternating
rounds, both with weights in 2 MiB pages). From 2 to 15 slots the kernel would compute 16 lanes for each token, and
XLA stays."""
MIN_PALLAS_GPU_SLOTS = 8
"""Slots from which `attention='auto'` picks the Pallas kernel on GPU. Measured on an H200 (random 1.1B Llama, bf16,
1000-token prompts, decode step): 1 slot 1.51 ms Pallas vs 1.37 ms XLA (one program per kv head leaves most of the
chip idle), 64 slots 2.33 vs 4.19 ms; the attention alone at 8 slots: 61.5 vs 60.7 us, at 64: 90 vs 263 us."""


# ----- sharding -----------------------------------------------------------------------------------------------------


def resolve_engine_rules(
    model_config: ModelConfig,
    dtype: Any,
    mesh: Mesh,
    rules: dict[str, MeshAxes] | None = None,
    config: EngineConfig | None = None,
) -> tuple[dict[str, MeshAxes], tuple[str, ...]]:
    """The rule table in effect for this model on `mesh` (non-dividing axes replicated) and the notes saying
    what that costs; the same for the checkpoint target, the engine's weights and its cache."""
    c, itemsize = model_config, jnp.dtype(dtype).itemsize
    sizes = {
        "vocab": c.vocab_size,
        "embed": c.dim,
        "q_heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "mlp": c.mlp_dim,
        "layers": c.num_layers,
    }
    arrays = []
    for name, axes in stacked_axes(c).items():
        for sub, sub_axes in axes.items() if isinstance(axes, dict) else [(name, axes)]:
            arrays.append(ArrayLayout(sub, sub_axes, tuple(sizes[a] for a in sub_axes), itemsize))
    if config is not None:
        pages = config.kv_pages or 2  # the count does not change which rules apply, only the bytes
        sizes |= {"slots": config.num_slots, "cache_seq": config.page_size, "kv_pages": pages}
        kv_shape = (2 * c.num_layers * pages, c.num_kv_heads, c.head_dim, config.page_size)
        kv_itemsize = 1 if config.kv_dtype == "int8" else itemsize
        arrays.append(ArrayLayout("kv_pool", K_POOL_AXES, kv_shape, kv_itemsize))
    # the engine (config given) warns; the checkpoint target and unstacking resolve the same table quietly
    return resolve_rules(DEFAULT_RULES if rules is None else rules, mesh, sizes, arrays, warn=config is not None)


def checkpoint_target(
    model_config: ModelConfig, dtype: Any, mesh: Mesh, rules: dict[str, MeshAxes] | None = None
) -> Any:
    """Abstract params in the checkpoint's stacked layout, with the shardings to restore them directly into."""
    dtype = jnp.dtype(dtype)
    abstract, _ = abstract_params(model_config, dtype)
    layer = unfuse_layer(abstract["layer_0"])
    stacked = {k: v for k, v in abstract.items() if not k.startswith("layer_")}
    stacked = {k: jax.ShapeDtypeStruct(checkpoint_shape(k, v.shape), v.dtype) for k, v in stacked.items()}
    stacked["layers"] = {
        n: jax.ShapeDtypeStruct((model_config.num_layers, *checkpoint_shape(n, a.shape)), a.dtype)
        for n, a in layer.items()
    }
    logical = stacked_axes(model_config)
    rules, _ = resolve_engine_rules(model_config, dtype, mesh, rules)
    return jax.tree.map(
        lambda a, axes: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(mesh, logical_to_spec(axes, rules, mesh, a.shape))
        ),
        stacked,
        logical,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def unstack_params(
    stacked: Any, model_config: ModelConfig, mesh: Mesh, rules: dict[str, MeshAxes] | None = None
) -> Any:
    """Checkpoint layout -> per-layer buffers, on device, each in its sharding; the stacked arrays are freed."""
    dtype = jnp.dtype(jax.tree.leaves(stacked)[0].dtype)
    abstract, logical = abstract_params(model_config, dtype)
    rules, _ = resolve_engine_rules(model_config, dtype, mesh, rules)
    shardings = tree_shardings(logical, rules, mesh, abstract)
    fn = jax.jit(functools.partial(unstack_layers, num_layers=model_config.num_layers), out_shardings=shardings)
    out = fn(stacked)
    for leaf in jax.tree.leaves(stacked):
        if isinstance(leaf, jax.Array):
            leaf.delete()
    return out


def named(logical: Sequence[str | None], mesh: Mesh, rules: dict[str, MeshAxes]) -> NamedSharding:
    """The sharding of an array with these logical axes."""
    return NamedSharding(mesh, logical_to_spec(tuple(logical), rules, mesh))


def state_shardings(num_layers: int, mesh: Mesh, rules: dict[str, MeshAxes], kv_dtype: str = "auto") -> DecodeState:
    """The sharding of every leaf of the device state: the pools (and an int8 pool's scales) split as the rules
    split kv heads, the slot rows as they split slots."""
    spec = functools.partial(named, mesh=mesh, rules=rules)
    per_slot = spec(("slots",))

    def pool(axes: tuple[str, ...]):
        return Int8Pages(spec(axes), spec(SCALE_AXES)) if kv_dtype == "int8" else spec(axes)

    return DecodeState(
        k=tuple(pool(K_POOL_AXES) for _ in range(num_layers)),
        v=tuple(pool(V_POOL_AXES) for _ in range(num_layers)),
        lengths=per_slot,
        tokens=per_slot,
        active=per_slot,
        remaining=per_slot,
        generated=per_slot,
        want_logprobs=per_slot,
        sampling=SlotSampling(
            temperature=per_slot,
            top_k=per_slot,
            top_p=per_slot,
            min_p=per_slot,
            key=spec(("slots", None)),
            stop_ids=spec(("slots", None)),
        ),
    )


def sharding_report(
    mesh: Mesh, rules: dict[str, MeshAxes], notes: tuple[str, ...], params: Any, state: DecodeState
) -> ShardingReport:
    """The mesh, the rule table in effect, and weight / KV pool bytes held by each device (`state` may be
    abstract, with shardings)."""
    return ShardingReport(
        mesh={str(k): int(v) for k, v in mesh.shape.items()},
        num_processes=len({d.process_index for d in mesh.devices.flat}),
        rules=dict(rules),
        notes=notes,
        weight_bytes_per_device=shard_bytes(params),
        kv_bytes_per_device=shard_bytes((state.k, state.v)),
    )


def _shards(spec: PartitionSpec, mesh: Mesh) -> int:
    """Into how many pieces a sharding with `spec` splits an array over `mesh`."""
    n = 1
    for axes in spec:
        for a in (axes,) if isinstance(axes, str) else axes or ():
            n *= mesh.shape[a]
    return n


# ----- memory -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """Bytes the engine needs, printed at start-up."""

    weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_page: int
    kv_pages: int
    page_size: int
    device_bytes: int | None
    kv_format: str = "float"
    """How a token is stored: the engine's dtype name, or 'int8' (int8 values + a bfloat16 scale per kv head)."""

    @property
    def kv_bytes_total(self) -> int:
        return self.kv_bytes_per_page * self.kv_pages

    @property
    def kv_tokens(self) -> int:
        """Positions the pool holds (the sink page excluded)."""
        return (self.kv_pages - 1) * self.page_size

    def describe(self) -> str:
        gib = 2**30
        dev = "unknown" if self.device_bytes is None else f"{self.device_bytes / gib:.2f} GiB"
        return (
            f"memory: weights {self.weight_bytes / gib:.3f} GiB; KV pool ({self.kv_format}) {self.kv_pages} pages x "
            f"{self.page_size} "
            f"positions = {self.kv_tokens} tokens, {self.kv_bytes_total / gib:.3f} GiB "
            f"({self.kv_bytes_per_token / 1024:.1f} KiB/token); device {dev}"
        )


def device_memory_bytes(device: jax.Device) -> int | None:
    """Memory one device can hold: the allocator's limit on TPU/GPU, physical RAM on CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def kv_bytes_per_token(model_config: ModelConfig, dtype: Any, kv_dtype: str = "auto") -> int:
    """Bytes one cached token takes across all layers, as stored: K and V in `dtype`, or (kv_dtype 'int8') int8
    values and one scale per kv head each."""
    c = model_config
    if kv_dtype == "int8":
        return 2 * c.num_layers * c.num_kv_heads * (c.head_dim + jnp.dtype(KV_SCALE_DTYPE).itemsize)
    return c.kv_bytes_per_token(jnp.dtype(dtype).itemsize)


def memory_budget(
    model_config: ModelConfig, config: EngineConfig, dtype: jnp.dtype, mesh: Mesh, rules: dict[str, MeshAxes]
) -> MemoryBudget:
    """The weights' and the KV pool's bytes; the pool's pages as configured, or sized from the device's memory."""
    c, e = model_config, config
    per_token = kv_bytes_per_token(c, dtype, e.kv_dtype)
    per_page = per_token * e.page_size
    if e.quantize == "none":
        weights = c.num_params * dtype.itemsize
    else:  # int8 values + their scales, and what stays in `dtype` (norms, biases)
        weights = quant.weight_bytes(abstract_params(c, dtype, quantize=e.quantize)[0])
    device = device_memory_bytes(mesh.local_devices[0])
    pages = e.kv_pages
    if pages is None:
        on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
        if on_cpu or device is None:
            pages = e.num_slots * e.num_pages + 1
        else:
            # the pool is split over the mesh axes that split kv heads; weights over all devices (roughly)
            kv_split = _shards(logical_to_spec(K_POOL_AXES, rules, mesh), mesh)
            free = device * e.kv_memory_fraction * mesh.size - weights
            pages = int(free // per_page * kv_split // mesh.size)
    kv_format = "int8" if e.kv_dtype == "int8" else jnp.dtype(dtype).name
    return MemoryBudget(weights, per_token, per_page, max(pages, 0), e.page_size, device, kv_format)


def check_fits(budget: MemoryBudget, config: EngineConfig, mesh: Mesh, rules: dict[str, MeshAxes]) -> None:
    """Raises CapacityError, naming what to change, when the pool cannot hold one full-context request or the
    weights and the pool do not fit `memory_fraction` of each device."""
    b, e = budget, config
    if b.kv_pages < 2 or (b.kv_pages - 1) < e.num_pages:
        raise CapacityError(
            f"the KV pool holds {max(b.kv_pages - 1, 0)} pages of {e.page_size} positions, fewer than one "
            f"full-context request needs ({e.num_pages} pages for max_seq_len={e.max_seq_len}); raise kv_pages "
            "or kv_memory_fraction, or lower max_seq_len"
        )
    if b.device_bytes is None:
        return
    kv_ways = _shards(logical_to_spec(K_POOL_AXES, rules, mesh), mesh)
    per_device = b.weight_bytes / mesh.size + b.kv_bytes_total / kv_ways
    limit = b.device_bytes * e.memory_fraction
    if per_device > limit:
        fit = int((limit - b.weight_bytes / mesh.size) * kv_ways // b.kv_bytes_per_page)
        raise CapacityError(
            f"weights + a KV pool of {b.kv_pages} pages need {per_device / 2**30:.2f} GiB per device but only "
            f"{limit / 2**30:.2f} GiB is available; use at most {max(fit, 0)} kv_pages"
        )


# ----- kernels ------------------------------------------------------------------------------------------------------


def choose_attention(
    model_config: ModelConfig, config: EngineConfig, dtype: jnp.dtype, mesh: Mesh, rules: dict[str, MeshAxes]
) -> str:
    """The decode attention this engine runs: 'pallas', 'kernel' or 'xla' (see EngineConfig.attention). A model with
    attention features only XLA's formulation implements gets 'xla' (logged), and a request for a kernel a ValueError
    naming the feature."""
    missing = kernel_missing_features(model_config)
    if missing is not None:
        if config.attention in ("pallas", "kernel"):
            raise ValueError(
                f"attention={config.attention!r} cannot be used here: this model has {missing}, which only XLA's "
                "formulation implements; use attention='xla' or 'auto'"
            )
        if config.attention == "auto":
            log.info("decode attention: XLA's formulation, as this model has %s, which the kernels lack", missing)
        return "xla"
    k_spec = logical_to_spec(K_POOL_AXES, rules, mesh)
    slot_spec = logical_to_spec(("slots",), rules, mesh)
    platform = mesh.devices.flat[0].platform
    return _choose_pallas(model_config, config, dtype, platform, k_spec) or _choose_kernel(
        config.attention,
        "attention",
        "decode attention",
        "the sharding rules split head_dim, cache_seq or the pages, which it needs whole on each device"
        if k_spec[0] is not None or k_spec[2] is not None or k_spec[3] is not None
        else "the sharding rules split the slots, and every device would then write only its own slots' K/V "
        "into its copy of the shared pool"
        if slot_spec[0] is not None
        else None,
        mesh,
        dtype,
    )


def kernel_missing_features(model_config: ModelConfig) -> str | None:
    """The attention features of this model the Pallas and CPU attention kernels do not implement, in words (None:
    they run it)."""
    c = model_config
    features = []
    if c.sliding_layers:
        features.append(f"sliding-window layers (window {c.sliding_window})")
    if c.attn_logit_softcap is not None:
        features.append("attention logit soft-capping")
    return " and ".join(features) or None


def choose_linear(model_config: ModelConfig, config: EngineConfig, dtype: jnp.dtype, mesh: Mesh) -> str:
    """The weight products this engine runs: 'kernel' or 'xla' (see EngineConfig.linear)."""
    why_not = None
    if mesh.size != 1:
        why_not = f"it runs on one device, and this mesh has {mesh.size}"
    elif model_config.mlp_activation != "silu":
        why_not = f"its gated product is SwiGLU, and this model's MLP gate is {model_config.mlp_activation}"
    return _choose_kernel(
        config.linear,
        "linear",
        "weight products",
        why_not,
        mesh,
        dtype,
        # int8: the kernel reads a quarter of float32's bytes where XLA:CPU converts the int8 weights to float32 in
        # memory first (slower than float32 itself), so it is worth it at any slot count
        worth_it=config.num_slots == 1 or config.num_slots >= MIN_KERNEL_LINEAR_SLOTS or config.quantize == "int8",
    )


def _choose_kernel(
    choice: str, option: str, what: str, why_not: str | None, mesh: Mesh, dtype: jnp.dtype, worth_it: bool = True
) -> str:
    """'kernel' or 'xla' for `config.<option>` (`choice`: 'auto', 'kernel' or 'xla'). The kernels run on CPU in
    float32; `why_not` says what else of this engine rules one out (None: nothing), and `worth_it` whether 'auto'
    should pick it. 'kernel' where it cannot run is a ValueError saying why."""
    if choice == "xla":
        return "xla"
    if any(d.platform != "cpu" for d in mesh.devices.flat):
        why_not = "it runs on CPU only"
    elif dtype != jnp.float32:
        why_not = f"it takes float32, and this engine runs {dtype}"
    if why_not is not None:
        if choice == "kernel":
            raise ValueError(f"{option}='kernel' cannot be used here: {why_not}; use {option}='xla' or 'auto'")
        return "xla"
    if choice == "auto" and not worth_it:
        return "xla"
    try:
        library = kernels.load()
    except kernels.KernelUnavailable as e:
        if choice == "kernel" or kernels.compiler() is not None:
            raise  # a compiler that fails is a bug to report, not a reason to run slower
        log.warning("%s: XLA ops instead of the CPU kernel: %s", what, e)
        return "xla"
    log.info("%s: the CPU kernel (%s)", what, library.name)
    return "kernel"


def _choose_pallas(
    model_config: ModelConfig, config: EngineConfig, dtype: jnp.dtype, platform: str, k_spec: PartitionSpec
) -> str | None:
    """'pallas' where the config asks for it (or 'auto' on TPU/GPU) and the kernel takes this engine's shapes;
    None to let `_choose_kernel` decide. 'pallas' where it cannot run is a ValueError saying why."""
    choice = config.attention
    if choice not in ("auto", "pallas") or (choice == "auto" and platform not in ("tpu", "gpu")):
        return None
    c, e = model_config, config
    q = jax.ShapeDtypeStruct((e.num_slots, c.num_kv_heads, c.q_per_kv, c.head_dim), dtype)
    # the pools as the engine allocates them (Int8Pages for kv_dtype 'int8'), abstract
    k_shape = (2, c.num_kv_heads, c.head_dim, e.page_size)
    v_shape = (2, c.num_kv_heads, e.page_size, c.head_dim)
    pool_k = jax.eval_shape(lambda: init_pool(k_shape, dtype, e.kv_dtype, keys=True))
    pool_v = jax.eval_shape(lambda: init_pool(v_shape, dtype, e.kv_dtype, keys=False))
    table = jax.ShapeDtypeStruct((e.num_slots, 1), jnp.int32)
    if platform not in ("tpu", "gpu"):
        why = f"it runs on TPU or GPU, and this engine runs on {platform} (tests use interpret mode directly)"
    elif choice == "auto" and platform == "gpu" and e.num_slots < MIN_PALLAS_GPU_SLOTS:
        why = f"below {MIN_PALLAS_GPU_SLOTS} slots XLA's formulation was as fast or faster on GPU"
    elif k_spec[0] is not None or k_spec[2] is not None or k_spec[3] is not None:
        why = "the sharding rules split the pages, head_dim or cache_seq, which it needs whole on each device"
    else:
        why = pallas_attention.unsupported_reason(platform, q, pool_k, pool_v, table)
    if why is None:
        log.info("decode attention: the Pallas %s kernel", platform)
        return "pallas"
    if choice == "pallas":
        raise ValueError(f"attention='pallas' cannot be used here: {why}; use attention='xla' or 'auto'")
    log.warning("decode attention: XLA's formulation instead of the Pallas kernel: %s", why)
    return "xla"


def pallas_attend(mesh: Mesh, rules: dict[str, MeshAxes]):
    """Decode attention (`paged_decode_attention_xla`'s contract) through the Pallas kernel: the write through the
    page table in XLA (every device of a data axis sees every slot's write), then the kernel on each device's slots
    and kv heads."""
    spec = functools.partial(logical_to_spec, rules=rules, mesh=mesh)
    backend = mesh.devices.flat[0].platform

    def pool_spec(pool, axes):  # an int8 pool's scales split as its values (SCALE_AXES)
        return Int8Pages(spec(axes), spec(SCALE_AXES)) if isinstance(pool, Int8Pages) else spec(axes)

    def attend(q, k_new, v_new, k_pool, v_pool, table, lengths):
        k_pool, v_pool = write_decode_kv(k_pool, v_pool, k_new, v_new, table, lengths)
        q_spec = spec(("slots", "kv_heads", None, None))
        pool_specs = (pool_spec(k_pool, K_POOL_AXES), pool_spec(v_pool, V_POOL_AXES))
        out = jax.shard_map(
            functools.partial(pallas_attention.paged_attend_pallas, backend=backend),
            mesh=mesh,
            in_specs=(q_spec, *pool_specs, spec(("slots", None)), spec(("slots",))),
            out_specs=q_spec,
            check_vma=False,
        )(q, k_pool, v_pool, table, lengths)
        return out, k_pool, v_pool

    return attend


def _pool_specs(pool, spec) -> tuple[Any, Any]:
    """The key and value pools' PartitionSpecs, as pytrees matching the pools (an int8 pool: values, then scales)."""
    k_spec, v_spec = spec(K_POOL_AXES), spec(V_POOL_AXES)
    if isinstance(pool, Int8Pages):
        return Int8Pages(k_spec, spec(SCALE_AXES)), Int8Pages(v_spec, spec(SCALE_AXES))
    return k_spec, v_spec


def kernel_attend(mesh: Mesh, rules: dict[str, MeshAxes]):
    """Decode attention (`paged_decode_attention_xla`'s contract) through the CPU kernel on each device's kv heads
    (attention never mixes heads, so no collective)."""
    spec = functools.partial(logical_to_spec, rules=rules, mesh=mesh)

    def attend(q, k_new, v_new, k_pool, v_pool, table, lengths):
        q_spec, new_spec = spec(("slots", "kv_heads", None, None)), spec(("slots", "kv_heads", None))
        k_spec, v_spec = _pool_specs(k_pool, spec)
        return jax.shard_map(
            kernels.decode_attention,
            mesh=mesh,
            in_specs=(q_spec, new_spec, new_spec, k_spec, v_spec, spec(("slots", None)), spec(("slots",))),
            out_specs=(q_spec, k_spec, v_spec),
            check_vma=False,
        )(q, k_new, v_new, k_pool, v_pool, table, lengths)  # fmt: skip

    return attend


def kernel_prefill_attend(mesh: Mesh, rules: dict[str, MeshAxes]):
    """Paged prefill attention (`prefill_attention_xla`'s contract, the pools already holding the pack's K/V) through
    the CPU kernel on each device's kv heads; the pack's segment ids and paging are the same on every device."""
    spec = functools.partial(logical_to_spec, rules=rules, mesh=mesh)

    def attend(q, k, v, segment_ids, k_pool, v_pool, paging):
        q_spec, new_spec = spec((None, "kv_heads", None, None)), spec((None, "kv_heads", None))
        k_spec, v_spec = _pool_specs(k_pool, spec)
        return jax.shard_map(
            kernels.prefill_attention,
            mesh=mesh,
            in_specs=(q_spec, new_spec, new_spec, PartitionSpec(), k_spec, v_spec, PartitionSpec()),
            out_specs=q_spec,
            check_vma=False,
        )(q, k, v, segment_ids, k_pool, v_pool, paging)  # fmt: skip

    return attend
