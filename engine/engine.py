"""The engine: a preallocated paged KV cache with fixed slots and three jitted steps, prefill -> insert -> generate.

- `prefill_batch(prompts)` runs prompts packed side by side (a few per call, padded to a power-of-two bucket) and
  samples each one's first token; `prefill` is the one-prompt case. A prompt that starts with tokens held in the
  prefix cache (a fixed-size ring of earlier prompts' K/V) computes only the rest.
- `insert(prefix, state, slot)` writes the prompt's K/V (cached, then computed) into a slot of the fixed-shape cache
  and arms the slot.
- `generate(state, steps)` advances every slot up to `decode_steps` tokens in one dispatch (a loop on device whose
  trip count is an argument), empty and finished slots masked, and copies the tokens back to the host once.

Cache layout: for each layer, k and v are split into S / P pages, each its own buffer: v pages [B, K, P, H] (slots,
kv heads, positions in the page, head dim) and k pages transposed, [B, K, H, P], so both attention dots are plain
matrix products. Decode attends over
the first n pages, n a power of two covering the longest active sequence, so a step reads the cache in proportion to
what is in use, not to max_seq_len; each page count is one compiled shape. Pages are separate buffers because on
XLA:CPU a slice of a larger buffer is copied before every dot (measured: a window sliced out of one buffer costs as
much as reading the whole buffer).

Every shape is compiled ahead of time by `warmup()`; afterwards nothing compiles, whatever requests come and go.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine import kernels
from engine.config import ModelConfig
from engine.model import (
    K_CACHE_AXES,
    V_CACHE_AXES,
    Packed,
    Transformer,
    abstract_params,
    checkpoint_shape,
    rope_angles,
    runtime_head,
    runtime_layer,
    stacked_axes,
    unfuse_layer,
    unstack_layers,
)
from engine.sampling import MAX_LOGPROBS, SamplingParams, SlotSampling, hits_stop, sample, token_logprobs
from sharding.rules import (
    DEFAULT_RULES,
    ArrayLayout,
    MeshAxes,
    ShardingReport,
    logical_to_spec,
    resolve_rules,
    shard_bytes,
    single_device_mesh,
    tree_shardings,
)

log = logging.getLogger(__name__)


class CapacityError(ValueError):
    """The requested slots x context do not fit the device, or a request does not fit the context."""


def default_dtype() -> str:
    """float32 on CPU (XLA:CPU bf16 matmuls are ~25x slower), bfloat16 on TPU/GPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, x = [], lo
    while x < hi:
        out.append(x)
        x *= 2
    return (*out, hi)


ATTENTION_CHOICES = ("auto", "kernel", "xla")
# A packed prefill of T tokens computes logits (and samples) for at most max(MIN_PREFILL_ROWS, T //
# PREFILL_TOKENS_PER_ROW) prompts, and prefill_segments: each row costs a column of the output head and a row of
# sampling, which a lone prompt pays for every empty row. Measured on the AVX-512 VM (SmolLM2, a 41-token prompt in
# the 64 bucket): 32 rows 67-70 ms TTFT, 8 rows 59-62 ms. W2's prefill (~10 new tokens per prompt after the prefix
# cache) packs ~25 prompts per 256-token call: 1.06 -> ~0.8 s against 8 prompts per call.
MIN_PREFILL_ROWS = 8
PREFILL_TOKENS_PER_ROW = 8
LINEAR_CHOICES = ("auto", "kernel", "xla")
# Slots from which `linear='auto'` packs the weights for the CPU kernel: a decode step's products then fill at least
# one 16-float vector of tokens; below that XLA's matrix-vector products already stream the weights near the
# machine's bandwidth, and the kernel would compute 16 lanes for each token.
MIN_KERNEL_LINEAR_SLOTS = 16


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static shape and dtype choices; everything per-request lives in arrays instead."""

    num_slots: int = 8
    """B: requests decoded together."""
    max_seq_len: int = 2048
    """S: cache positions per slot; prompt + max_tokens must fit."""
    max_prefill_len: int = 1024
    """Longest prompt; prefill buckets are powers of two from `min_prefill_len` up to this."""
    min_prefill_len: int = 16
    """Smallest prefill bucket."""
    prefill_segments: int = 32
    """Most prompts packed into one prefill call (their total length within `max_prefill_len`); a call of T tokens
    packs at most max(MIN_PREFILL_ROWS, T // PREFILL_TOKENS_PER_ROW) of them (see `Engine.prefill_rows`)."""
    prefix_cache_len: int = 256
    """Positions of the prefix cache (0 disables it): prompts' K/V kept after prefill, so a later prompt that starts
    with the same tokens (a system prompt, the chat template, an earlier turn) computes only the rest."""
    page_size: int = 64
    """P: cache positions per page; decode reads a power-of-two number of pages covering the longest sequence."""
    decode_steps: int = 8
    """Decode steps per dispatch: more amortizes host overhead, fewer frees finished slots sooner."""
    dtype: str = dataclasses.field(default_factory=default_dtype)
    """Weights, activations and cache dtype."""
    memory_fraction: float = 0.9
    """Share of device memory weights + cache may take before start-up refuses."""
    attention: str = "auto"
    """Decode attention: 'kernel' (the hand-written CPU kernel, engine.kernels), 'xla' (the jnp formulation, any
    backend) or 'auto' (the kernel on CPU in float32 where a C++ compiler exists, else xla)."""
    linear: str = "auto"
    """Weight products: 'kernel' (weights packed at load for the hand-written CPU kernel, engine.kernels), 'xla'
    (XLA's dot, any backend and sharding) or 'auto' (the kernel on a one-device CPU mesh in float32 with at least
    MIN_KERNEL_LINEAR_SLOTS slots, where a C++ compiler exists, else xla)."""

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise CapacityError(f"num_slots must be >= 1, got {self.num_slots}")
        if self.max_prefill_len > self.max_seq_len:
            raise CapacityError(
                f"max_prefill_len={self.max_prefill_len} exceeds max_seq_len={self.max_seq_len}; lower it"
            )
        if self.page_size < 1 or self.max_seq_len % self.page_size:
            raise CapacityError(
                f"max_seq_len={self.max_seq_len} must be a multiple of page_size={self.page_size}; round it up"
            )
        if self.decode_steps < 1:
            raise CapacityError(f"decode_steps must be >= 1, got {self.decode_steps}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")
        if self.linear not in LINEAR_CHOICES:
            raise ValueError(f"linear must be one of {', '.join(LINEAR_CHOICES)}, got {self.linear!r}")
        if self.prefill_segments < 1:
            raise CapacityError(f"prefill_segments must be >= 1, got {self.prefill_segments}")
        if self.prefix_cache_len < 0 or 0 < self.prefix_cache_len <= MIN_PREFIX_HIT:
            raise CapacityError(
                f"prefix_cache_len must be 0 (off) or more than {MIN_PREFIX_HIT}, got {self.prefix_cache_len}"
            )

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        return _powers_of_two(min(self.min_prefill_len, self.max_prefill_len), self.max_prefill_len)

    @property
    def num_pages(self) -> int:
        return self.max_seq_len // self.page_size

    @property
    def windows(self) -> tuple[int, ...]:
        """Decode windows in pages: 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5x them) up to all pages, so a
        dispatch reads at most a third more pages than its longest sequence needs, from 5 + 2 log2(pages) compiles."""
        twos = _powers_of_two(1, self.num_pages)
        return tuple(sorted({*twos, *(3 * w // 2 for w in twos if w > 1 and 3 * w // 2 < self.num_pages)}))


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries, one row per slot; a pytree living on device."""

    k: tuple  # [L][S / P] pages of [B, K, H, P]
    v: tuple  # [L][S / P] pages of [B, K, P, H]
    lengths: jax.Array  # [B] tokens in the cache = position of the next input token
    tokens: jax.Array  # [B] next input token (the last one sampled)
    active: jax.Array  # [B] bool: still generating
    remaining: jax.Array  # [B] tokens the request may still generate
    generated: jax.Array  # [B] tokens generated so far (the request's random stream index)
    want_logprobs: jax.Array  # [B] bool
    sampling: SlotSampling


@struct.dataclass
class DevicePrefix:
    """One packed prefill on device: up to R prompts side by side in T positions, ready for `insert` (one row each).

    Row r's prompt is its first ctx_len[r] tokens, cached earlier at [ctx_start[r], ctx_start[r] + ctx_len[r]) of
    the prefix cache ctx_k/ctx_v (as it was when this pack ran), followed by the tokens computed here at positions
    [start[r], start[r] + length[r]) of k/v. Unused rows have length 0.
    """

    k: tuple  # [L] of [K, T, H]
    v: tuple  # [L] of [K, T, H]
    start: jax.Array  # [R] first position of each prompt's computed tokens
    length: jax.Array  # [R] tokens computed in this pack
    ctx_k: tuple  # [L] of [K, C, H]: the prefix cache this pack read
    ctx_v: tuple
    ctx_start: jax.Array  # [R]
    ctx_len: jax.Array  # [R] tokens taken from the prefix cache (0: none)
    token: jax.Array  # [R] first sampled token
    remaining: jax.Array  # [R] max_tokens - 1
    want_logprobs: jax.Array  # [R] bool
    sampling: SlotSampling  # [R]


MIN_PREFIX_HIT = 8
"""Fewest matching tokens worth reading from the prefix cache (a prefill with context attends over the whole cache)."""


@dataclasses.dataclass(frozen=True)
class _CachedPrompt:
    """A prompt prefix whose K/V sits at positions [start, start + len(tokens)) of the prefix cache."""

    tokens: np.ndarray
    start: int


@dataclasses.dataclass
class PrefixCacheStats:
    """Prefix cache counters since start-up (prompt tokens seen and those taken from the cache)."""

    prompts: int = 0
    prompt_tokens: int = 0
    hit_prompts: int = 0
    hit_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of a generated token and the most likely alternatives (id, logprob), best first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class Prefix:
    """What `prefill` returns for one prompt: its row of a packed device prefix plus its first token, on the host."""

    device: DevicePrefix
    bucket: int
    row: int
    length: int  # prompt tokens, cached ones included
    cached: int  # prompt tokens taken from the prefix cache instead of computed
    token: int
    finished: bool  # the first token already ends the request (stop id, or max_tokens == 1)
    logprobs: TokenLogprobs | None


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """One `generate` dispatch, on the host: tokens[t, b] is valid where valid[t, b]."""

    tokens: np.ndarray  # [steps, B] int32
    valid: np.ndarray  # [steps, B] bool
    active: np.ndarray  # [B] bool: still generating after the dispatch
    logprob: np.ndarray  # [steps, B] float32
    top_ids: np.ndarray  # [steps, B, MAX_LOGPROBS]
    top_logprobs: np.ndarray  # [steps, B, MAX_LOGPROBS]


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """Bytes the engine needs, printed at start-up."""

    weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_slot: int
    kv_bytes_total: int
    device_bytes: int | None
    prefix_cache_bytes: int = 0

    def describe(self) -> str:
        gib = 2**30
        dev = "unknown" if self.device_bytes is None else f"{self.device_bytes / gib:.2f} GiB"
        return (
            f"memory: weights {self.weight_bytes / gib:.3f} GiB; KV {self.kv_bytes_per_token / 1024:.1f} KiB/token, "
            f"{self.kv_bytes_per_slot / 2**20:.1f} MiB/slot, {self.kv_bytes_total / gib:.3f} GiB total; "
            f"prefix cache {self.prefix_cache_bytes / 2**20:.1f} MiB; device {dev}"
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


class Engine:
    """Owns the compiled steps and the weights; the caller (the scheduler) owns the DecodeState."""

    def __init__(
        self,
        model_config: ModelConfig,
        params: Any,
        config: EngineConfig,
        *,
        mesh: Mesh | None = None,
        rules: dict[str, MeshAxes] | None = None,
    ) -> None:
        """`params` in the model's per-layer layout (`unstack_params` converts a checkpoint's stacked layout); the
        engine may fuse q/k/v and pack the linear weights in its copy (`self.params`, see `fuse_qkv_layer` and
        `pack_layer`)."""
        c = model_config
        if config.max_seq_len > c.max_position_embeddings:
            raise CapacityError(
                f"max_seq_len={config.max_seq_len} exceeds the model's context "
                f"({c.max_position_embeddings}); lower --max_seq_len"
            )
        self.model_config = c
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        self.mesh = mesh or single_device_mesh()
        self.rules, self.sharding_notes = Engine.resolve_rules(c, self.dtype, self.mesh, rules, config)
        k_spec = logical_to_spec(K_CACHE_AXES, self.rules, self.mesh)
        self.attention = self._resolve_kernel(
            "attention",
            "decode attention",
            "the sharding rules split head_dim or cache_seq, which it needs whole on each device"
            if k_spec[2] is not None or k_spec[3] is not None
            else None,
        )
        # q, k and v as one product wherever no mesh axis splits heads (see fuse_qkv_layer)
        self.fuse_qkv = all(logical_to_spec((a,), self.rules, self.mesh)[0] is None for a in ("q_heads", "kv_heads"))
        self.linear = self._resolve_kernel(
            "linear",
            "weight products",
            f"it runs on one device, and this mesh has {self.mesh.size}" if self.mesh.size != 1 else None,
            worth_it=self.config.num_slots >= MIN_KERNEL_LINEAR_SLOTS,
        )
        packed = Packed(kernels.PANEL_ROWS, kernels.linear) if self.linear == "kernel" else None
        attend = self._kernel_attention if self.attention == "kernel" else None
        self.model = Transformer(c, self.dtype, attend, fuse_qkv=self.fuse_qkv, packed=packed)
        self.budget = self._memory_budget()
        log.info("%s", self.budget.describe())
        self._check_fits()

        abstract, logical = abstract_params(c, self.dtype, fuse_qkv=self.fuse_qkv, packed=packed)
        self.param_shardings = tree_shardings(logical, self.rules, self.mesh, abstract)
        # one layer at a time: the extra memory is one layer's weights
        prepare = jax.jit(functools.partial(runtime_layer, config=c, fuse_qkv=self.fuse_qkv, packed=packed))
        head = jax.jit(functools.partial(runtime_head, config=c, packed=packed))
        params = {
            **head({k: v for k, v in params.items() if not k.startswith("layer_")}),
            **{k: prepare(v) for k, v in params.items() if k.startswith("layer_")},
        }
        self.params = jax.device_put(params, self.param_shardings)
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.state_shardings = self._state_shardings()
        self.prefix_shardings = self._prefix_shardings()
        pool_shardings = self.prefix_shardings.ctx_k
        self._new_pool = jax.jit(self._empty_pool, out_shardings=(pool_shardings, pool_shardings))
        self._pool = self._new_pool()
        self._prefix_entries: list[_CachedPrompt] = []
        self._pool_cursor = 0
        self.prefix_stats = PrefixCacheStats()
        log.info("%s", self.describe_sharding().describe())
        self._compiled: dict[tuple[str, int], Any] = {}
        self._host_lengths = np.zeros(config.num_slots, np.int64)
        self._host_active = np.zeros(config.num_slots, bool)
        self.last_window = 0

    # ----- construction helpers ---------------------------------------------------------------------------------

    @staticmethod
    def resolve_rules(
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
            sizes |= {"slots": config.num_slots, "cache_seq": config.page_size}
            # both caches, every layer and page, as one array per logical layout
            kv_shape = (c.num_layers, config.num_slots, c.num_kv_heads, c.head_dim, config.max_seq_len)
            kv_axes = ("layers", "slots", "kv_heads", "head_dim", "cache_seq")
            arrays.append(ArrayLayout("kv_cache", kv_axes, (kv_shape[0] * 2, *kv_shape[1:]), itemsize))
        # the engine (config given) warns; the checkpoint target and unstacking resolve the same table quietly
        return resolve_rules(DEFAULT_RULES if rules is None else rules, mesh, sizes, arrays, warn=config is not None)

    def describe_sharding(self) -> ShardingReport:
        """The mesh, the rule table in effect, and weight / KV cache bytes held by each device."""
        state = self._abstract(jax.eval_shape(self._empty_state), self.state_shardings)
        return ShardingReport(
            mesh={str(k): int(v) for k, v in self.mesh.shape.items()},
            num_processes=len({d.process_index for d in self.mesh.devices.flat}),
            rules=dict(self.rules),
            notes=self.sharding_notes,
            weight_bytes_per_device=shard_bytes(self.params),
            kv_bytes_per_device=shard_bytes((state.k, state.v)),
        )

    @staticmethod
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
        rules, _ = Engine.resolve_rules(model_config, dtype, mesh, rules)
        return jax.tree.map(
            lambda a, axes: jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=NamedSharding(mesh, logical_to_spec(axes, rules, mesh, a.shape))
            ),
            stacked,
            logical,
            is_leaf=lambda x: isinstance(x, tuple),
        )

    @staticmethod
    def unstack_params(
        stacked: Any, model_config: ModelConfig, mesh: Mesh, rules: dict[str, MeshAxes] | None = None
    ) -> Any:
        """Checkpoint layout -> per-layer buffers, on device, each in its sharding; the stacked arrays are freed."""
        dtype = jnp.dtype(jax.tree.leaves(stacked)[0].dtype)
        abstract, logical = abstract_params(model_config, dtype)
        rules, _ = Engine.resolve_rules(model_config, dtype, mesh, rules)
        shardings = tree_shardings(logical, rules, mesh, abstract)
        fn = jax.jit(functools.partial(unstack_layers, num_layers=model_config.num_layers), out_shardings=shardings)
        out = fn(stacked)
        for leaf in jax.tree.leaves(stacked):
            if isinstance(leaf, jax.Array):
                leaf.delete()
        return out

    def _memory_budget(self) -> MemoryBudget:
        c, e = self.model_config, self.config
        per_token = c.kv_bytes_per_token(self.dtype.itemsize)
        return MemoryBudget(
            weight_bytes=c.num_params * self.dtype.itemsize,
            kv_bytes_per_token=per_token,
            kv_bytes_per_slot=per_token * e.max_seq_len,
            kv_bytes_total=per_token * e.max_seq_len * e.num_slots,
            device_bytes=device_memory_bytes(self.mesh.local_devices[0]),
            prefix_cache_bytes=per_token * e.prefix_cache_len,
        )

    def _check_fits(self) -> None:
        b, e = self.budget, self.config
        if b.device_bytes is None:
            return
        # weights and cache are spread over the mesh; the budget is per device
        per_device = (b.weight_bytes + b.kv_bytes_total + b.prefix_cache_bytes) / self.mesh.size
        limit = b.device_bytes * e.memory_fraction
        if per_device > limit:
            fit_slots = int(
                (limit * self.mesh.size - b.weight_bytes - b.prefix_cache_bytes) // max(b.kv_bytes_per_slot, 1)
            )
            raise CapacityError(
                f"{e.num_slots} slots x {e.max_seq_len} tokens need {per_device / 2**30:.2f} GiB per device but "
                f"only {limit / 2**30:.2f} GiB is available; use at most {max(fit_slots, 0)} slots at this "
                "max_seq_len, or lower max_seq_len"
            )

    def _resolve_kernel(self, option: str, what: str, why_not: str | None, worth_it: bool = True) -> str:
        """'kernel' or 'xla' for `config.<option>` ('auto', 'kernel' or 'xla'). The kernels run on CPU in float32;
        `why_not` says what else of this engine rules one out (None: nothing), and `worth_it` whether 'auto' should
        pick it. 'kernel' where it cannot run is a ValueError saying why."""
        choice = getattr(self.config, option)
        if choice == "xla":
            return "xla"
        if any(d.platform != "cpu" for d in self.mesh.devices.flat):
            why_not = "it runs on CPU only"
        elif self.dtype != jnp.float32:
            why_not = f"it takes float32, and this engine runs {self.dtype}"
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

    def _kernel_attention(self, q, k_new, v_new, k_pages, v_pages, lengths):
        """The CPU kernel on each device's slots and kv heads (attention never mixes either, so no collective)."""
        spec = functools.partial(logical_to_spec, rules=self.rules, mesh=self.mesh)
        q_spec, new_spec = spec(("slots", "kv_heads", None, None)), spec(("slots", "kv_heads", None))
        k_specs, v_specs = (spec(K_CACHE_AXES),) * len(k_pages), (spec(V_CACHE_AXES),) * len(v_pages)
        return jax.shard_map(
            kernels.decode_attention,
            mesh=self.mesh,
            in_specs=(q_spec, new_spec, new_spec, k_specs, v_specs, spec(("slots",))),
            out_specs=(q_spec, k_specs, v_specs),
            check_vma=False,
        )(q, k_new, v_new, k_pages, v_pages, lengths)

    def _spec(self, logical: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_spec(tuple(logical), self.rules, self.mesh))

    def _cache_tree(self, leaf: Any) -> tuple:
        """A per-layer, per-page tree with `leaf` everywhere."""
        return tuple(tuple(leaf for _ in range(self.config.num_pages)) for _ in range(self.model_config.num_layers))

    def _state_shardings(self) -> DecodeState:
        per_slot = self._spec(("slots",))
        return DecodeState(
            k=self._cache_tree(self._spec(K_CACHE_AXES)),
            v=self._cache_tree(self._spec(V_CACHE_AXES)),
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
                key=self._spec(("slots", None)),
                stop_ids=self._spec(("slots", None)),
            ),
        )

    def _prefix_shardings(self, with_context: bool = True) -> DevicePrefix:
        """Shardings of a DevicePrefix; without the context arrays, as the prefill step returns it."""
        kv = tuple(self._spec(("kv_heads", None, "head_dim")) for _ in range(self.model_config.num_layers))
        rep = self._replicated
        return DevicePrefix(
            k=kv,  # [K, T, H], transposed into the pages by insert
            v=kv,
            start=rep,
            length=rep,
            ctx_k=kv if with_context else (),
            ctx_v=kv if with_context else (),
            ctx_start=rep,
            ctx_len=rep,
            token=rep,
            remaining=rep,
            want_logprobs=rep,
            sampling=jax.tree.map(lambda _: rep, SlotSampling.empty(1)),
        )

    # ----- state ------------------------------------------------------------------------------------------------

    def _empty_state(self) -> DecodeState:
        c, e = self.model_config, self.config
        k_page = (e.num_slots, c.num_kv_heads, c.head_dim, e.page_size)
        v_page = (e.num_slots, c.num_kv_heads, e.page_size, c.head_dim)
        b = e.num_slots
        i32 = functools.partial(jnp.zeros, dtype=jnp.int32)
        return DecodeState(
            k=tuple(tuple(jnp.zeros(k_page, self.dtype) for _ in range(e.num_pages)) for _ in range(c.num_layers)),
            v=tuple(tuple(jnp.zeros(v_page, self.dtype) for _ in range(e.num_pages)) for _ in range(c.num_layers)),
            lengths=i32((b,)),
            tokens=i32((b,)),
            active=jnp.zeros((b,), bool),
            remaining=i32((b,)),
            generated=i32((b,)),
            want_logprobs=jnp.zeros((b,), bool),
            sampling=SlotSampling.empty(b),
        )

    def _empty_pool(self) -> tuple[tuple, tuple]:
        c = self.model_config
        shape = (c.num_kv_heads, self.config.prefix_cache_len, c.head_dim)
        return tuple(tuple(jnp.zeros(shape, self.dtype) for _ in range(c.num_layers)) for _ in range(2))

    def init_state(self) -> DecodeState:
        """An empty cache and all slots free, allocated directly in their shardings."""
        self._host_lengths[:] = 0
        self._host_active[:] = False
        return self._compile("init", 0)()

    # ----- compiled steps ---------------------------------------------------------------------------------------

    def _prefill_fn(
        self,
        params,
        pool,
        tokens,
        positions,
        segments,
        start,
        length,
        ctx_start,
        ctx_len,
        remaining,
        want_logprobs,
        sampling,
        *,
        context: bool,
    ):
        """Packed prefill: tokens/positions/segments [1, T] hold up to R prompts (segment r), attending only inside
        their own segment and, with `context`, to their first ctx_len[r] tokens cached in the prefix cache `pool`
        at ctx_start[r] (positions then start at ctx_len[r]); the logits of each prompt's last token pick its first
        token."""
        last = jnp.maximum(start + length - 1, 0)  # unused rows (length 0) read position 0 and are ignored
        ctx = None
        if context:
            seg = jnp.clip(segments[0], 0)
            lo = ctx_start[seg]
            hi = lo + jnp.where(segments[0] >= 0, ctx_len[seg], 0)
            j = jnp.arange(self.config.prefix_cache_len)
            visible = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])  # [T, C]
            pool_kv = tuple(
                (jnp.swapaxes(k, 0, 1)[None], jnp.swapaxes(v, 0, 1)[None]) for k, v in zip(*pool, strict=True)
            )
            ctx = (pool_kv, visible[None])
        logits, kv = self.model.apply(
            {"params": params},
            tokens,
            positions,
            segment_ids=segments,
            logits_index=last[None],
            context=ctx,
            vocab_major=True,
        )
        logits = logits[:, 0]  # [V, R]
        token = sample(logits, sampling, jnp.zeros(last.shape, jnp.int32), vocab_axis=0)
        logprob, top_ids, top_vals = self._logprobs(logits, token, want_logprobs)
        prefix = DevicePrefix(
            k=tuple(jnp.swapaxes(k[0], 0, 1) for k, _ in kv),  # [T, K, H] -> [K, T, H]
            v=tuple(jnp.swapaxes(v[0], 0, 1) for _, v in kv),
            start=start,
            length=length,
            ctx_k=(),  # the caller attaches the pool it passed in (returning it would copy it)
            ctx_v=(),
            ctx_start=ctx_start,
            ctx_len=ctx_len,
            token=token,
            remaining=remaining,
            want_logprobs=want_logprobs,
            sampling=sampling,
        )
        return prefix, (logprob, top_ids, top_vals)

    def _store_fn(self, pool, prefix: DevicePrefix, source):
        """The prefix cache with position j taken from position source[j] of [cache, this pack's new K/V]."""
        return tuple(
            tuple(jnp.take(jnp.concatenate([c, n], axis=1), source, axis=1) for c, n in zip(cache, new, strict=True))
            for cache, new in zip(pool, (prefix.k, prefix.v), strict=True)
        )

    def _insert_fn(self, prefix: DevicePrefix, state: DecodeState, slot, row):
        """Copies row `row` of a packed prefix into `slot`: its cached then computed K/V into the slot's first
        pages, its knobs into the slot's rows. Positions past the prompt receive neighbouring K/V; decode never
        reads them (it masks positions > length and overwrites position `length` before reading it)."""
        p = self.config.page_size
        c, t = self.config.prefix_cache_len, prefix.k[0].shape[1]
        n = min(c + t, self.config.max_prefill_len)  # positions a prompt of this pack can reach
        chunk = min(p, n)
        start, ctx_start, ctx_len = prefix.start[row], prefix.ctx_start[row], prefix.ctx_len[row]

        def write(pages: tuple, cached: jax.Array, new: jax.Array, transposed: bool) -> tuple:
            # cached [K, C, H] and new [K, T, H]; slot position i reads cached position ctx_start + i while
            # i < ctx_len, then new position start + i - ctx_len. Each page gathers its chunk from both, selects, and
            # transposes it for key pages ([K, H, P]). Concatenating [cached | new] and transposing whole arrays
            # first copied all C + T positions of every layer (W2's 256-token packs: 3.4 -> 1.9 ms per insert).
            pages = list(pages)
            for page in range(-(-n // p)):
                i = page * chunk + jnp.arange(chunk)
                piece = jnp.take(new, jnp.clip(start + i - ctx_len, 0, t - 1), axis=1)
                if c:  # the prefix cache's positions first
                    old = jnp.take(cached, jnp.clip(ctx_start + i, 0, c - 1), axis=1)
                    piece = jnp.where((i < ctx_len)[None, :, None], old, piece)
                piece = jnp.swapaxes(piece, 1, 2) if transposed else piece
                pages[page] = jax.lax.dynamic_update_slice(pages[page], piece[None], (slot, 0, 0, 0))
            return tuple(pages)

        token = prefix.token[row]
        sampling_row = jax.tree.map(lambda a: a[row][None], prefix.sampling)
        first_stops = hits_stop(token[None], sampling_row.stop_ids)[0]
        sampling = jax.tree.map(lambda all_, one: all_.at[slot].set(one[0]), state.sampling, sampling_row)
        remaining = prefix.remaining[row]
        return DecodeState(
            k=tuple(write(pages, ck, nk, True) for pages, ck, nk in zip(state.k, prefix.ctx_k, prefix.k, strict=True)),
            v=tuple(write(pages, cv, nv, False) for pages, cv, nv in zip(state.v, prefix.ctx_v, prefix.v, strict=True)),
            lengths=state.lengths.at[slot].set(ctx_len + prefix.length[row]),
            tokens=state.tokens.at[slot].set(token),
            active=state.active.at[slot].set(~first_stops & (remaining > 0)),
            remaining=state.remaining.at[slot].set(remaining),
            generated=state.generated.at[slot].set(1),
            want_logprobs=state.want_logprobs.at[slot].set(prefix.want_logprobs[row]),
            sampling=sampling,
        )

    @staticmethod
    def _logprobs(logits: jax.Array, token: jax.Array, want: jax.Array) -> tuple:
        """token_logprobs of vocab-major logits [V, R], computed only when some row `want`s them (zeros else)."""
        r = token.shape[0]
        return jax.lax.cond(
            jnp.any(want),
            lambda: token_logprobs(logits, token, MAX_LOGPROBS, vocab_axis=0),
            lambda: (
                jnp.zeros((r,), jnp.float32),
                jnp.zeros((r, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((r, MAX_LOGPROBS), jnp.float32),
            ),
        )

    def _release_fn(self, state: DecodeState, slot):
        return state.replace(active=state.active.at[slot].set(False))

    def _generate_fn(self, params, state: DecodeState, steps, *, window: int):
        """`steps` (<= decode_steps, a runtime value) decode steps over the first `window` pages (the rest pass
        through untouched); outputs have decode_steps rows, the rows past `steps` marked invalid."""
        b, n = self.config.num_slots, self.config.decode_steps

        # The rotary angles of every position the window holds, computed once outside the loop: each step gathers its
        # rows. Computed inside, XLA:CPU fused cos/sin into every layer's q and k rotation, per element (SmolLM2 at
        # 64 slots: those fusions took 5.7 ms of a ~85 ms step, 2.1 ms after).
        cos, sin = rope_angles(jnp.arange(window * self.config.page_size), self.model_config)

        def step(i, carry):
            st, k_win, v_win, outs = carry
            cache = tuple(zip(k_win, v_win, strict=True))
            at = st.lengths[:, None]  # [B, 1]; past the window only for idle slots, whose output is dropped
            logits, kv = self.model.apply(
                {"params": params},
                st.tokens[:, None],
                at,
                cache=cache,
                lengths=st.lengths,
                vocab_major=True,
                rope=(jnp.take(cos, at, axis=0, mode="clip"), jnp.take(sin, at, axis=0, mode="clip")),
            )
            logits = logits[:, :, 0]  # [V, B]
            k_win = tuple(k for k, _ in kv)  # the model wrote each slot's new K/V at its length
            v_win = tuple(v for _, v in kv)
            token = sample(logits, st.sampling, st.generated, vocab_axis=0)
            lp = self._logprobs(logits, token, st.want_logprobs & st.active)
            live = st.active
            step_int = live.astype(jnp.int32)
            remaining = st.remaining - step_int
            st = st.replace(
                lengths=st.lengths + step_int,
                tokens=jnp.where(live, token, st.tokens),
                active=live & ~hits_stop(token, st.sampling.stop_ids) & (remaining > 0),
                remaining=remaining,
                generated=st.generated + step_int,
            )
            outs = tuple(o.at[i].set(x) for o, x in zip(outs, (token, live, *lp), strict=True))
            return st, k_win, v_win, outs

        k_win = tuple(pages[:window] for pages in state.k)
        v_win = tuple(pages[:window] for pages in state.v)
        rest = state.replace(k=(), v=())
        outs = (
            jnp.zeros((n, b), jnp.int32),
            jnp.zeros((n, b), bool),
            jnp.zeros((n, b), jnp.float32),
            jnp.zeros((n, b, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((n, b, MAX_LOGPROBS), jnp.float32),
        )
        # a while loop with a runtime trip count: one compiled program serves every dispatch length
        rest, k_win, v_win, outs = jax.lax.fori_loop(0, jnp.clip(steps, 1, n), step, (rest, k_win, v_win, outs))
        tokens, valid, logprob, top_ids, top_vals = outs
        state = rest.replace(
            k=tuple(kw + pages[window:] for kw, pages in zip(k_win, state.k, strict=True)),
            v=tuple(vw + pages[window:] for vw, pages in zip(v_win, state.v, strict=True)),
        )
        return state, (tokens, valid, state.active, logprob, top_ids, top_vals)

    def _abstract(self, tree: Any, shardings: Any) -> Any:
        return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings)

    def _compile(self, kind: str, size: int):
        """The compiled executable for one shape (compiled now if warm-up did not)."""
        key = (kind, size)
        if key not in self._compiled:
            self._compiled[key] = self._lower(kind, size).compile()
        return self._compiled[key]

    def _lower(self, kind: str, size: int):
        rep = self._replicated
        i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        state_abs = self._abstract(jax.eval_shape(self._empty_state), self.state_shardings)
        params_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.params)
        pool_abs = self._abstract(self._pool, (self.prefix_shardings.ctx_k, self.prefix_shardings.ctx_v))
        if kind in ("prefill", "prefill_context"):
            fn = jax.jit(
                functools.partial(self._prefill_fn, context=kind == "prefill_context"),
                out_shardings=(self._prefix_shardings(with_context=False), rep),
            )
            r = self.prefill_rows(size)
            sampling_abs = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), SlotSampling.empty(r)
            )
            row_abs = jax.ShapeDtypeStruct((1, size), jnp.int32, sharding=rep)
            per_prompt = jax.ShapeDtypeStruct((r,), jnp.int32, sharding=rep)
            want_abs = jax.ShapeDtypeStruct((r,), bool, sharding=rep)
            args = (params_abs, pool_abs, row_abs, row_abs, row_abs, *[per_prompt] * 5, want_abs, sampling_abs)
        elif kind == "store":
            fn = jax.jit(self._store_fn, out_shardings=(self.prefix_shardings.ctx_k, self.prefix_shardings.ctx_v))
            prefix_abs = self._abstract(
                jax.eval_shape(functools.partial(self._abstract_prefix, size)), self.prefix_shardings
            )
            source = jax.ShapeDtypeStruct((self.config.prefix_cache_len,), jnp.int32, sharding=rep)
            args = (pool_abs, prefix_abs, source)
        elif kind == "insert":
            fn = jax.jit(self._insert_fn, donate_argnums=(1,), out_shardings=self.state_shardings)
            prefix_abs = self._abstract(
                jax.eval_shape(functools.partial(self._abstract_prefix, size)), self.prefix_shardings
            )
            args = (prefix_abs, state_abs, i32, i32)
        elif kind == "init":
            fn = jax.jit(self._empty_state, out_shardings=self.state_shardings)
            args = ()
        elif kind == "release":
            fn = jax.jit(self._release_fn, donate_argnums=(0,), out_shardings=self.state_shardings)
            args = (state_abs, i32)
        elif kind == "generate":
            fn = jax.jit(
                functools.partial(self._generate_fn, window=size),
                donate_argnums=(1,),
                out_shardings=(self.state_shardings, rep),
            )
            args = (params_abs, state_abs, i32)
        else:
            raise KeyError(kind)
        return fn.lower(*args)

    def _abstract_prefix(self, t: int) -> DevicePrefix:
        c = self.model_config
        shape = (c.num_kv_heads, t, c.head_dim)
        r = self.prefill_rows(t)
        z = jnp.zeros((r,), jnp.int32)
        pool_k, pool_v = self._empty_pool()
        return DevicePrefix(
            k=tuple(jnp.zeros(shape, self.dtype) for _ in range(c.num_layers)),
            v=tuple(jnp.zeros(shape, self.dtype) for _ in range(c.num_layers)),
            start=z,
            length=z,
            ctx_k=pool_k,
            ctx_v=pool_v,
            ctx_start=z,
            ctx_len=z,
            token=z,
            remaining=z,
            want_logprobs=jnp.zeros((r,), bool),
            sampling=SlotSampling.empty(r),
        )

    def warmup(self, max_workers: int | None = None) -> float:
        """Compiles every prefill bucket, insert bucket, decode window and the release step; returns seconds taken.

        Shapes compile in parallel threads (XLA compiles outside the GIL), one per core by default.
        """
        start = time.perf_counter()
        shapes = [(kind, t) for kind in self.prefill_kinds for t in self.config.prefill_buckets]
        shapes += [("generate", w) for w in self.config.windows]
        shapes += [("insert", t) for t in self.config.prefill_buckets] + [("release", 0), ("init", 0)]
        todo = [s for s in shapes if s not in self._compiled]
        with concurrent.futures.ThreadPoolExecutor(max_workers or os.cpu_count() or 1) as pool:
            compiled = list(pool.map(lambda shape: self._lower(*shape).compile(), todo))
        self._compiled.update(zip(todo, compiled, strict=True))
        elapsed = time.perf_counter() - start
        log.info("warm-up compiled %d shapes in %.1f s", len(todo), elapsed)
        return elapsed

    @property
    def prefill_kinds(self) -> tuple[str, ...]:
        """The compiled steps one prefill bucket needs: with the prefix cache, a variant reading it and its store."""
        return ("prefill", "prefill_context", "store") if self.config.prefix_cache_len else ("prefill",)

    # ----- the engine API ---------------------------------------------------------------------------------------

    def bucket_for(self, length: int) -> int:
        """The prefill bucket a prompt of `length` tokens runs in."""
        for t in self.config.prefill_buckets:
            if length <= t:
                return t
        raise CapacityError(
            f"prompt has {length} tokens but the longest prefill is {self.config.max_prefill_len}; "
            "shorten the prompt or raise max_prefill_len"
        )

    def check_request(self, prompt_len: int, params: SamplingParams) -> None:
        """Raises ValueError / CapacityError saying what to change when the request cannot run."""
        if prompt_len < 1:
            raise ValueError("prompt is empty; send at least one token")
        params.validate(self.model_config.vocab_size)
        self.bucket_for(prompt_len)
        if prompt_len + params.max_tokens > self.config.max_seq_len:
            raise CapacityError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.config.max_seq_len} tokens; lower max_tokens to at most {self.config.max_seq_len - prompt_len}"
            )

    def check_prompt(self, tokens: Sequence[int], params: SamplingParams) -> None:
        """`check_request` plus the token ids themselves: raises ValueError / CapacityError saying what to change."""
        self.check_request(len(tokens), params)
        bad = [t for t in tokens if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.model_config.vocab_size})")

    def prefill_rows(self, bucket: int) -> int:
        """Prompts a prefill call of `bucket` tokens packs at most (see PREFILL_TOKENS_PER_ROW)."""
        return min(self.config.prefill_segments, max(MIN_PREFILL_ROWS, bucket // PREFILL_TOKENS_PER_ROW))

    def packs(self, lengths: Sequence[int]) -> list[list[int]]:
        """How `prefill_batch` groups prompts of these lengths, in order: as many per call as fit, their total within
        `max_prefill_len` and their count within `prefill_rows` of the bucket that total runs in."""
        out: list[list[int]] = []
        total = 0
        for i, n in enumerate(lengths):
            fits = bool(out) and total + n <= self.config.max_prefill_len
            if not fits or len(out[-1]) >= self.prefill_rows(self.bucket_for(total + n)):
                out.append([])
                total = 0
            out[-1].append(i)
            total += n
        return out

    def prefill(self, tokens: Sequence[int], params: SamplingParams, seed: int) -> Prefix:
        """Runs one prompt and samples its first token (copied to the host: the caller streams it at once)."""
        return self.prefill_batch([(tokens, params, seed)])[0]

    def prefill_batch(self, requests: Sequence[tuple[Sequence[int], SamplingParams, int]]) -> list[Prefix]:
        """Runs prompts (tokens, params, seed) packed side by side, a few per call (see `packs`), and samples each
        one's first token. Measured on XLA:CPU: a dot over 256 packed positions runs at ~1.3-1.4x the FLOP/s of one
        over 64, and packing skips the padding of one-prompt buckets.

        A prompt whose first tokens are in the prefix cache computes only the rest; prompts of this batch are cached
        as their pack runs, so later packs already find them."""
        for tokens, params, _ in requests:
            self.check_prompt(tokens, params)
        try:
            return self._prefill_packs(requests)
        except Exception:
            # a failed pack may have poisoned the cache it stored into: start the cache over, then let the caller
            # fail these requests
            self._pool = self._new_pool()
            self.clear_prefix_cache()
            raise

    def _prefill_packs(self, requests: Sequence[tuple[Sequence[int], SamplingParams, int]]) -> list[Prefix]:
        launched = []
        todo = list(range(len(requests)))
        while todo:
            hits = [self._match(requests[i][0]) for i in todo]
            ready = self._ready(todo, hits, requests)
            pack = [ready[j] for j in self.packs([len(requests[todo[j]][0]) - hits[j][1] for j in ready])[0]]
            launched.append(self._launch([(todo[j], *hits[j]) for j in pack], requests))
            packed = set(pack)
            todo = [i for j, i in enumerate(todo) if j not in packed]
        out: list[Prefix | None] = [None] * len(requests)
        eos = self.model_config.eos_token_ids
        for pack, bucket, device, (logprob, top_ids, top_vals) in launched:
            token, logprob, top_ids, top_vals = jax.device_get((device.token, logprob, top_ids, top_vals))
            for row, (i, _, cached) in enumerate(pack):
                tokens, params, _ = requests[i]
                first = int(token[row])
                stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
                lps = None
                if params.logprobs is not None:
                    n_top = params.logprobs
                    lps = TokenLogprobs(
                        float(logprob[row]),
                        tuple(
                            (int(a), float(b)) for a, b in zip(top_ids[row, :n_top], top_vals[row, :n_top], strict=True)
                        ),
                    )
                out[i] = Prefix(
                    device=device,
                    bucket=bucket,
                    row=row,
                    length=len(tokens),
                    cached=cached,
                    token=first,
                    finished=first in stops or params.max_tokens == 1,
                    logprobs=lps,
                )
        return out  # type: ignore[return-value]

    def _ready(self, todo: list[int], hits: list[tuple[int, int]], requests: Sequence) -> list[int]:
        """Positions in `todo` that should run now: a prompt that shares at least MIN_PREFIX_HIT more tokens with
        an earlier prompt of the batch than it found in the cache waits until that prompt is cached (a later pack
        finds it), so a burst of prompts with a common system prompt or template computes it once, not once per
        pack row (W2: 1964 -> 2079 of 2678 prompt tokens read from the cache)."""
        if not self.config.prefix_cache_len:
            return list(range(len(todo)))
        c = self.config.prefix_cache_len
        ready, leaders = [], []
        for j, (i, (_, cached)) in enumerate(zip(todo, hits, strict=True)):
            ids = np.asarray(requests[i][0])
            shared = max((_common_prefix(ids[: len(ids) - 1], lead) for lead in leaders), default=0)
            if shared - cached >= MIN_PREFIX_HIT:
                continue
            ready.append(j)
            if self._worth_caching(len(ids), cached):
                leaders.append(ids[:c])
        return ready

    def _worth_caching(self, length: int, cached: int) -> bool:
        """Whether `_cache_prompts` stores a prompt of `length` tokens that read `cached` of them from the cache:
        one that is at least half new and leaves more than MIN_PREFIX_HIT tokens to match."""
        return min(length, self.config.prefix_cache_len) > MIN_PREFIX_HIT and 2 * cached <= length

    def _launch(self, pack: list[tuple[int, int, int]], requests: Sequence) -> tuple:
        """Dispatches one packed prefill of (request index, cache start, cached tokens) rows, then caches its
        prompts; returns (pack, bucket, device prefix, logprob arrays) without waiting for the device."""
        eos = self.model_config.eos_token_ids
        bucket = self.bucket_for(sum(len(requests[i][0]) - cached for i, _, cached in pack))
        r = self.prefill_rows(bucket)
        tokens_row = np.zeros((1, bucket), np.int32)
        positions = np.zeros((1, bucket), np.int32)
        segments = np.full((1, bucket), -1, np.int32)
        start, length, ctx_start, ctx_len, remaining = (np.zeros((r,), np.int32) for _ in range(5))
        want = np.zeros((r,), bool)
        rows = [SlotSampling.from_params(SamplingParams(), 0, eos)] * r
        at = 0
        for row, (i, cache_start, cached) in enumerate(pack):
            tokens, params, seed = requests[i]
            n = len(tokens) - cached
            tokens_row[0, at : at + n] = tokens[cached:]
            positions[0, at : at + n] = np.arange(cached, len(tokens))
            segments[0, at : at + n] = row
            start[row], length[row], remaining[row] = at, n, params.max_tokens - 1
            ctx_start[row], ctx_len[row] = cache_start, cached
            want[row] = params.logprobs is not None
            rows[row] = SlotSampling.from_params(params, seed, eos)
            at += n
            self.prefix_stats.prompts += 1
            self.prefix_stats.prompt_tokens += len(tokens)
            self.prefix_stats.hit_prompts += cached > 0
            self.prefix_stats.hit_tokens += cached
        sampling = jax.tree.map(lambda *a: np.concatenate(a), *rows)
        kind = "prefill_context" if ctx_len.any() else "prefill"
        pool = self._pool
        device, lps = self._compile(kind, bucket)(
            self.params, pool, tokens_row, positions, segments, start, length, ctx_start, ctx_len, remaining, want,
            sampling,
        )  # fmt: skip
        device = device.replace(ctx_k=pool[0], ctx_v=pool[1])
        self._cache_prompts(pack, requests, device, bucket, start)
        return pack, bucket, device, lps

    def _match(self, tokens: Sequence[int]) -> tuple[int, int]:
        """(cache position, tokens) of the longest cached prefix of `tokens` that leaves at least one token to
        compute; (0, 0) when it is shorter than MIN_PREFIX_HIT or the cache is off."""
        best = (0, 0)
        ids = np.asarray(tokens)
        for entry in self._prefix_entries:
            if min(len(entry.tokens), len(ids) - 1) <= best[1]:
                continue
            same = _common_prefix(entry.tokens, ids[: len(ids) - 1])
            if same > best[1]:
                best = (entry.start, same)
        return best if best[1] >= MIN_PREFIX_HIT else (0, 0)

    def _cache_prompts(self, pack: list, requests: Sequence, device: DevicePrefix, bucket: int, start) -> None:
        """Copies into the prefix cache the prompts of a just-dispatched pack that are at least half new (the first
        `prefix_cache_len` tokens of each): a ring, the oldest entries overwritten first. The host index changes
        only once the copy is dispatched."""
        c = self.config.prefix_cache_len
        source = np.arange(c, dtype=np.int32)  # positions not written keep their contents
        entries, cursor = list(self._prefix_entries), self._pool_cursor
        taken: list[tuple[int, int]] = []  # ranges written by this call: a later copy must not wrap onto them
        for row, (i, cache_start, cached) in enumerate(pack):
            tokens = np.asarray(requests[i][0], np.int32)
            n = min(len(tokens), c)
            if not self._worth_caching(len(tokens), cached):
                continue
            at = 0 if cursor + n > c else cursor
            if any(at < end and lo < at + n for lo, end in taken):
                break
            taken.append((at, at + n))
            cursor = at + n
            entries = [e for e in entries if e.start + len(e.tokens) <= at or e.start >= at + n]
            entries.append(_CachedPrompt(tokens[:n], at))
            i_pos = np.arange(n)
            source[at : at + n] = np.where(i_pos < cached, cache_start + i_pos, c + start[row] + i_pos - cached)
        if taken:
            self._pool = self._compile("store", bucket)(self._pool, device, source)
            self._prefix_entries, self._pool_cursor = entries, cursor

    def clear_prefix_cache(self) -> None:
        """Forgets every cached prompt (the next prompts are computed in full)."""
        self._prefix_entries = []
        self._pool_cursor = 0

    def insert(self, prefix: Prefix, state: DecodeState, slot: int) -> DecodeState:
        """Places a prefilled prompt into `slot` (its previous contents are overwritten)."""
        if not 0 <= slot < self.config.num_slots:
            raise IndexError(f"slot {slot} outside [0, {self.config.num_slots})")
        state = self._compile("insert", prefix.bucket)(prefix.device, state, np.int32(slot), np.int32(prefix.row))
        self._host_lengths[slot] = prefix.length
        self._host_active[slot] = not prefix.finished
        return state

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        """Stops a slot (cancelled, or finished on the host by a stop string); its cache is reused as is."""
        self._host_active[slot] = False
        return self._compile("release", 0)(state, np.int32(slot))

    def window_for(self, longest: int, steps: int | None = None) -> int:
        """Pages the decode attention must cover for sequences up to `longest` tokens through one dispatch."""
        need = longest + (steps or self.config.decode_steps)
        for w in self.config.windows:
            if need <= w * self.config.page_size:
                return w
        return self.config.num_pages

    def generate(self, state: DecodeState, steps: int | None = None) -> tuple[DecodeState, StepOutput]:
        """Advances every active slot `steps` tokens (default and most: `decode_steps`); one dispatch and one copy
        back to the host. Any `steps` runs the same compiled program (the loop's trip count is an argument)."""
        steps = self.config.decode_steps if steps is None else steps
        if not 1 <= steps <= self.config.decode_steps:
            raise ValueError(f"steps must be in [1, {self.config.decode_steps}] (decode_steps), got {steps}")
        longest = int(self._host_lengths[self._host_active].max(initial=0))
        self.last_window = self.window_for(longest, steps)
        state, out = self._compile("generate", self.last_window)(self.params, state, np.int32(steps))
        tokens, valid, active, logprob, top_ids, top_vals = jax.device_get(out)
        self._host_lengths += valid.sum(axis=0)
        self._host_active = np.array(active)
        return state, StepOutput(tokens, valid, active, logprob, top_ids, top_vals)

    def kv_positions_read(self, lengths: np.ndarray, valid: np.ndarray, steps: int, window: int) -> int:
        """Cache positions (per layer, per kv head) one `generate` dispatch's attention read: every page of the window
        for every slot and step (XLA), or each slot's positions up to its length (the kernel). lengths: per-slot
        lengths before the dispatch; valid: its StepOutput.valid; steps: the steps it ran."""
        span = window * self.config.page_size
        if self.attention == "xla":
            return steps * len(lengths) * span
        taken = np.cumsum(valid[:steps], axis=0) - valid[:steps]  # tokens each slot added before each step
        return int(np.minimum(np.asarray(lengths)[None, :] + taken + 1, span).sum())

    @property
    def host_lengths(self) -> np.ndarray:
        """Tokens cached per slot, as the host last saw them."""
        return self._host_lengths

    def slot_active(self, slot: int) -> bool:
        """Whether the device is still generating for `slot` (as of the last dispatch the host saw)."""
        return bool(self._host_active[slot])

    @property
    def compiled_shapes(self) -> list[tuple[str, int]]:
        return sorted(self._compiled)
