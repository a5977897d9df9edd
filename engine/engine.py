"""The engine: the weights, a paged KV memory shared by fixed-shape slots, and three jitted steps.

- `prefill_batch(prompts)` runs prompts packed side by side (a few per call, padded to a power-of-two bucket),
  writes their K/V straight into pages of the pool and samples each one's first token. A prompt whose opening is
  already cached (an earlier turn of the same chat, a shared system prompt) reuses those pages and computes only the
  rest; a prompt longer than `max_prefill_len` is computed in chunks, and with a token budget the caller can spread
  the chunks over several steps (`Prefix.done`).
- `insert(prefix, state, slot)` arms a slot with a prefilled prompt: its page table row and its sampling knobs.
- `generate(state, steps)` advances every slot up to `decode_steps` tokens in one dispatch (a loop on device whose
  trip count is an argument), empty and finished slots masked, and copies the tokens back to the host once.
- `release(state, slot)` ends a slot: its pages are indexed by their tokens (prompt and completion) and stay cached
  until the memory is needed.

KV memory (engine.attention, engine.kv): per layer one pool of `kv_pages` pages of `page_size` positions; a slot holds
a row of a page table, which the host owns and passes to each dispatch. Admission reserves the pages a request can
ever need (prompt + max_tokens, less the cached pages it shares), so decode never runs dry: a request that does not
fit waits in the queue, and one that could never fit is refused with the limit named. Decode attends over the first
`window` pages of each table row (window from 1, 2, 3, 4, 6, 8, ... covering the longest active sequence), one
compiled shape per window.

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

from engine import kernels, pallas_attention
from engine.attention import (
    K_POOL_AXES,
    SINK_PAGE,
    V_POOL_AXES,
    PrefillPaging,
    context_block_pages,
    write_decode_kv,
)
from engine.config import ModelConfig
from engine.kv import Match, PagePool
from engine.kv.host import HostTier
from engine.model import (
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
    """The requested configuration does not fit the device, or a request does not fit the context or the KV memory."""


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


ATTENTION_CHOICES = ("auto", "kernel", "pallas", "xla")
# A packed prefill of T tokens computes logits (and samples) for at most max(MIN_PREFILL_ROWS, T //
# PREFILL_TOKENS_PER_ROW) prompts, and prefill_segments: each row costs a column of the output head and a row of
# sampling, which a lone prompt pays for every empty row. Measured on the AVX-512 VM (SmolLM2, a 41-token prompt in
# the 64 bucket): 32 rows 67-70 ms TTFT, 8 rows 59-62 ms.
MIN_PREFILL_ROWS = 8
PREFILL_TOKENS_PER_ROW = 8
MAX_PREFILL_SEGMENTS = 32  # a context page names the rows that see it in one int32 bit mask
LINEAR_CHOICES = ("auto", "kernel", "xla")
# Slots from which `linear='auto'` packs the weights for the CPU kernel: a decode step's products then fill at least
# one 16-float vector of tokens; below that XLA's matrix-vector products already stream the weights near the
# machine's bandwidth, and the kernel would compute 16 lanes for each token.
MIN_KERNEL_LINEAR_SLOTS = 16
MIN_PALLAS_GPU_SLOTS = 8
"""Slots from which `attention='auto'` picks the Pallas kernel on GPU. Measured on an H200 (random 1.1B Llama, bf16,
1000-token prompts, decode step): 1 slot 1.51 ms Pallas vs 1.37 ms XLA (one program per kv head leaves most of the
chip idle), 64 slots 2.33 vs 4.19 ms; the attention alone at 8 slots: 61.5 vs 60.7 us, at 64: 90 vs 263 us."""
ADMISSION_CHOICES = ("reserve", "grow")
HOST_COPY_PAGES = 32
"""Pages one copy between the device pool and the host tier moves (a fixed shape: one compiled gather and one
scatter; fewer pages are padded with the sink)."""
MIN_SHARED_TOKENS = 8
"""A prompt waits for an earlier prompt of the same batch to be cached when they share at least this many more
tokens than the cache already holds (see `Engine._ready`)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static shape and dtype choices; everything per-request lives in arrays instead."""

    num_slots: int = 8
    """B: requests decoded together."""
    max_seq_len: int = 2048
    """S: longest sequence (prompt + max_tokens) a slot may hold; a page table row has S / P entries."""
    max_prefill_len: int = 1024
    """Most tokens one prefill call computes (the largest bucket); longer prompts are computed in chunks."""
    min_prefill_len: int = 16
    """Smallest prefill bucket."""
    prefill_segments: int = 32
    """Most prompts packed into one prefill call (their total length within `max_prefill_len`); a call of T tokens
    packs at most max(MIN_PREFILL_ROWS, T // PREFILL_TOKENS_PER_ROW) of them (see `Engine.prefill_rows`)."""
    page_size: int = 64
    """P: positions per KV page."""
    kv_pages: int | None = None
    """Pages in the pool (each holds P positions of every layer); None: sized by `kv_memory_fraction` of the device's
    memory left after the weights on TPU/GPU, and num_slots * max_seq_len positions on CPU (where the host's RAM is
    shared with everything else)."""
    kv_memory_fraction: float = 0.85
    """Share of the device memory that weights + KV pages may take, when `kv_pages` is None on TPU/GPU."""
    prefix_caching: bool = True
    """Keep finished sequences' pages indexed by their tokens, so a prompt that starts the same way (the next turn
    of a chat, a shared system prompt) computes only the rest."""
    admission: str = "reserve"
    """How much KV memory a request takes at admission. 'reserve': every page it can ever need (prompt +
    max_tokens), so a running request never waits for memory, at the price of memory idle until (unless) it is
    used. 'grow': its prompt and one dispatch of tokens; it takes more pages as it grows, and when the pool runs dry
    the scheduler preempts the lowest-priority, youngest request (its pages stay cached, spilling to the host tier
    when they are evicted) and resumes it later from what is cached, recomputing only what is not."""
    host_kv_bytes: int = 0
    """Host RAM for the second tier of the prefix cache (engine.kv.host): full pages evicted from the device pool are
    copied there off the decode path and copied back on a hit instead of being recomputed; 0: no host tier."""
    decode_steps: int = 8
    """Decode steps per dispatch: more amortizes host overhead, fewer frees finished slots sooner."""
    dtype: str = dataclasses.field(default_factory=default_dtype)
    """Weights, activations and cache dtype."""
    memory_fraction: float = 0.9
    """Share of device memory weights + KV pages may take before start-up refuses."""
    attention: str = "auto"
    """Decode attention: 'kernel' (the hand-written CPU kernel, engine.kernels), 'pallas' (engine.pallas_attention's
    kernels for TPU and GPU), 'xla' (engine.attention's jnp formulation, any backend) or 'auto' (the CPU kernel on
    CPU in float32 where a C++ compiler exists, Pallas on TPU/GPU where it takes the shapes, else xla)."""
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
        if not 1 <= self.prefill_segments <= MAX_PREFILL_SEGMENTS:
            raise CapacityError(f"prefill_segments must be in [1, {MAX_PREFILL_SEGMENTS}], got {self.prefill_segments}")
        if self.kv_pages is not None and self.kv_pages < 2:
            raise CapacityError(f"kv_pages must be >= 2 (one is the sink), got {self.kv_pages}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise CapacityError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.admission not in ADMISSION_CHOICES:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION_CHOICES)}, got {self.admission!r}")
        if self.host_kv_bytes < 0:
            raise CapacityError(f"host_kv_bytes must be >= 0, got {self.host_kv_bytes}")

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        return _powers_of_two(min(self.min_prefill_len, self.max_prefill_len), self.max_prefill_len)

    @property
    def num_pages(self) -> int:
        """Page table entries per slot (pages of the longest sequence)."""
        return self.max_seq_len // self.page_size

    @property
    def windows(self) -> tuple[int, ...]:
        """Decode windows in pages: 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5x them) up to all pages, so a
        dispatch reads at most a third more pages than its longest sequence needs, from 5 + 2 log2(pages) compiles."""
        twos = _powers_of_two(1, self.num_pages)
        return tuple(sorted({*twos, *(3 * w // 2 for w in twos if w > 1 and 3 * w // 2 < self.num_pages)}))

    @property
    def context_pages(self) -> int:
        """Cached pages one prefill call may read (a whole sequence's), rounded up to whole context blocks."""
        cb = context_block_pages(self.page_size)
        return -(-self.num_pages // cb) * cb


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries on device: the KV pools and one row per slot."""

    k: tuple  # [L] of k_pool [Np, K, H, P]
    v: tuple  # [L] of v_pool [Np, K, P, H]
    lengths: jax.Array  # [B] tokens in the cache = position of the next input token
    tokens: jax.Array  # [B] next input token (the last one sampled)
    active: jax.Array  # [B] bool: still generating
    remaining: jax.Array  # [B] tokens the request may still generate
    generated: jax.Array  # [B] tokens generated so far (the request's random stream index)
    want_logprobs: jax.Array  # [B] bool
    sampling: SlotSampling


@struct.dataclass
class DevicePrefix:
    """One packed prefill's per-row results on device, ready for `insert` (row r: the r-th prompt of the pack)."""

    token: jax.Array  # [R] first sampled token
    remaining: jax.Array  # [R] max_tokens - 1
    generated: jax.Array  # [R] tokens generated before the prompt was read (a resumed request's), plus its first
    want_logprobs: jax.Array  # [R] bool
    sampling: SlotSampling  # [R]


@dataclasses.dataclass
class PrefixCacheStats:
    """Prompt tokens prefilled since start-up, and those whose K/V came from cached pages instead."""

    prompts: int = 0
    prompt_tokens: int = 0
    hit_prompts: int = 0
    hit_tokens: int = 0
    """Prompt tokens served from cached pages, either tier."""
    host_hit_tokens: int = 0
    """Of hit_tokens, those restored from the host tier."""


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of a generated token and the most likely alternatives (id, logprob), best first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass
class Prefix:
    """One prompt on its way into a slot: the pages it holds and, once `done`, its first token.

    A prompt is `done` when all its tokens' K/V are in its pages; until then (a long prompt under a token budget)
    the caller passes it back to `prefill_batch` to compute the next chunk. Whoever holds a Prefix must hand it to
    `insert` or `discard` (its pages and reservation are held until then); a prefix `finished` at its first token
    gives its pages back by itself."""

    tokens: np.ndarray
    params: SamplingParams
    seed: int
    pages: list[int]
    reserved: int  # pages still reserved for this sequence beyond `pages`
    cached: int  # prompt tokens whose K/V came from cached pages (either tier)
    computed: int  # prompt tokens whose K/V are in the pages (cached included)
    host_cached: int = 0  # of `cached`, tokens restored from the host tier
    generated: int = 0  # tokens of `tokens` the request generated before (a preempted request resumed)
    attached: bool = False  # its cached opening was looked up (see Engine._attach)
    copy_from: int | None = None  # a cached page whose first positions this prompt starts from (copied, then freed)
    device: DevicePrefix | None = None
    bucket: int = 0
    row: int = 0
    token: int = -1
    finished: bool = False  # the first token already ends the request (stop id, or max_tokens == 1)
    logprobs: TokenLogprobs | None = None
    released: bool = False

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def done(self) -> bool:
        return self.computed == len(self.tokens)


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
    kv_bytes_per_page: int
    kv_pages: int
    page_size: int
    device_bytes: int | None

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
            f"memory: weights {self.weight_bytes / gib:.3f} GiB; KV pool {self.kv_pages} pages x {self.page_size} "
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


@dataclasses.dataclass
class _Slot:
    """The host's view of one slot: its pages, what it has reserved, and the tokens whose K/V its pages hold."""

    pages: list[int]
    reserved: int
    tokens: list[int]
    length: int  # tokens in the cache (the last sampled token is not yet)
    max_pages: int  # pages the request can ever need (prompt + max_tokens)


class Engine:
    """Owns the compiled steps, the weights and the KV memory: the device state (pools, slot rows) and its host
    bookkeeping (page tables, reservations, the prefix index) change together, only through this class."""

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
        k_spec = logical_to_spec(K_POOL_AXES, self.rules, self.mesh)
        slot_spec = logical_to_spec(("slots",), self.rules, self.mesh)
        platform = self.mesh.devices.flat[0].platform
        self.attention = self._resolve_pallas(platform, k_spec) or self._resolve_kernel(
            "attention",
            "decode attention",
            "the sharding rules split head_dim, cache_seq or the pages, which it needs whole on each device"
            if k_spec[0] is not None or k_spec[2] is not None or k_spec[3] is not None
            else "the sharding rules split the slots, and every device would then write only its own slots' K/V "
            "into its copy of the shared pool"
            if slot_spec[0] is not None
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
        attend = {"kernel": self._kernel_attention, "pallas": self._pallas_attention}.get(self.attention)
        self.model = Transformer(c, self.dtype, attend, fuse_qkv=self.fuse_qkv, packed=packed)
        self.budget = self._memory_budget()
        log.info("%s", self.budget.describe())
        self._check_fits()
        self.host: HostTier | None = None
        if config.host_kv_bytes:
            if jax.process_count() > 1:
                raise ValueError("host_kv_bytes: the host KV tier runs on one host (this engine spans processes)")
            self.host = HostTier(config.host_kv_bytes, self.budget.kv_bytes_per_page)
            log.info(
                "host KV tier: %d pages (%.2f GiB) of %d positions",
                self.host.capacity_pages,
                self.host.capacity_pages * self.budget.kv_bytes_per_page / 2**30,
                config.page_size,
            )
        self._restores: list[tuple[list[int], np.ndarray, np.ndarray]] = []  # (pages, k, v) to copy to the device

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
        self.prefix_stats = PrefixCacheStats()
        log.info("%s", self.describe_sharding().describe())
        self._compiled: dict[tuple[str, int], Any] = {}
        self._slots: list[_Slot | None] = [None] * config.num_slots
        self._host_lengths = np.zeros(config.num_slots, np.int64)
        self._host_active = np.zeros(config.num_slots, bool)
        self.last_window = 0
        self._state: DecodeState | None = None
        self.reset()

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
            pages = config.kv_pages or 2  # the count does not change which rules apply, only the bytes
            sizes |= {"slots": config.num_slots, "cache_seq": config.page_size, "kv_pages": pages}
            kv_shape = (2 * c.num_layers * pages, c.num_kv_heads, c.head_dim, config.page_size)
            arrays.append(ArrayLayout("kv_pool", K_POOL_AXES, kv_shape, itemsize))
        # the engine (config given) warns; the checkpoint target and unstacking resolve the same table quietly
        return resolve_rules(DEFAULT_RULES if rules is None else rules, mesh, sizes, arrays, warn=config is not None)

    def describe_sharding(self) -> ShardingReport:
        """The mesh, the rule table in effect, and weight / KV pool bytes held by each device."""
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
        per_page = per_token * e.page_size
        weights = c.num_params * self.dtype.itemsize
        device = device_memory_bytes(self.mesh.local_devices[0])
        pages = e.kv_pages
        if pages is None:
            on_cpu = all(d.platform == "cpu" for d in self.mesh.devices.flat)
            if on_cpu or device is None:
                pages = e.num_slots * e.num_pages + 1
            else:
                # the pool is split over the mesh axes that split kv heads; weights over all devices (roughly)
                kv_split = _shards(logical_to_spec(K_POOL_AXES, self.rules, self.mesh), self.mesh)
                free = device * e.kv_memory_fraction * self.mesh.size - weights
                pages = int(free // per_page * kv_split // self.mesh.size)
        return MemoryBudget(weights, per_token, per_page, max(pages, 0), e.page_size, device)

    def _check_fits(self) -> None:
        b, e = self.budget, self.config
        if b.kv_pages < 2 or (b.kv_pages - 1) < e.num_pages:
            raise CapacityError(
                f"the KV pool holds {max(b.kv_pages - 1, 0)} pages of {e.page_size} positions, fewer than one "
                f"full-context request needs ({e.num_pages} pages for max_seq_len={e.max_seq_len}); raise kv_pages "
                "or kv_memory_fraction, or lower max_seq_len"
            )
        if b.device_bytes is None:
            return
        kv_ways = _shards(logical_to_spec(K_POOL_AXES, self.rules, self.mesh), self.mesh)
        per_device = b.weight_bytes / self.mesh.size + b.kv_bytes_total / kv_ways
        limit = b.device_bytes * e.memory_fraction
        if per_device > limit:
            fit = int((limit - b.weight_bytes / self.mesh.size) * kv_ways // b.kv_bytes_per_page)
            raise CapacityError(
                f"weights + a KV pool of {b.kv_pages} pages need {per_device / 2**30:.2f} GiB per device but only "
                f"{limit / 2**30:.2f} GiB is available; use at most {max(fit, 0)} kv_pages"
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

    def _resolve_pallas(self, platform: str, k_spec: PartitionSpec) -> str | None:
        """'pallas' where the config asks for it (or 'auto' on TPU/GPU) and the kernel takes this engine's shapes;
        None to let `_resolve_kernel` decide. 'pallas' where it cannot run is a ValueError saying why."""
        choice = self.config.attention
        if choice not in ("auto", "pallas") or (choice == "auto" and platform not in ("tpu", "gpu")):
            return None
        c, e = self.model_config, self.config
        q = jax.ShapeDtypeStruct((e.num_slots, c.num_kv_heads, c.q_per_kv, c.head_dim), self.dtype)
        pool_k = jax.ShapeDtypeStruct((2, c.num_kv_heads, c.head_dim, e.page_size), self.dtype)
        pool_v = jax.ShapeDtypeStruct((2, c.num_kv_heads, e.page_size, c.head_dim), self.dtype)
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

    def _pallas_attention(self, q, k_new, v_new, k_pool, v_pool, table, lengths):
        """The write through the page table in XLA (every device of a data axis sees every slot's write), then the
        Pallas kernel on each device's slots and kv heads."""
        k_pool, v_pool = write_decode_kv(k_pool, v_pool, k_new, v_new, table, lengths)
        spec = functools.partial(logical_to_spec, rules=self.rules, mesh=self.mesh)
        q_spec = spec(("slots", "kv_heads", None, None))
        backend = self.mesh.devices.flat[0].platform
        out = jax.shard_map(
            functools.partial(pallas_attention.paged_attend_pallas, backend=backend),
            mesh=self.mesh,
            in_specs=(q_spec, spec(K_POOL_AXES), spec(V_POOL_AXES), spec(("slots", None)), spec(("slots",))),
            out_specs=q_spec,
            check_vma=False,
        )(q, k_pool, v_pool, table, lengths)
        return out, k_pool, v_pool

    def _kernel_attention(self, q, k_new, v_new, k_pool, v_pool, table, lengths):
        """The CPU kernel on each device's kv heads (attention never mixes heads, so no collective)."""
        spec = functools.partial(logical_to_spec, rules=self.rules, mesh=self.mesh)
        q_spec, new_spec = spec(("slots", "kv_heads", None, None)), spec(("slots", "kv_heads", None))
        return jax.shard_map(
            kernels.decode_attention,
            mesh=self.mesh,
            in_specs=(q_spec, new_spec, new_spec, spec(K_POOL_AXES), spec(V_POOL_AXES), spec(("slots", None)),
                      spec(("slots",))),
            out_specs=(q_spec, spec(K_POOL_AXES), spec(V_POOL_AXES)),
            check_vma=False,
        )(q, k_new, v_new, k_pool, v_pool, table, lengths)  # fmt: skip

    def _spec(self, logical: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_spec(tuple(logical), self.rules, self.mesh))

    def _state_shardings(self) -> DecodeState:
        per_slot = self._spec(("slots",))
        layers = self.model_config.num_layers
        return DecodeState(
            k=tuple(self._spec(K_POOL_AXES) for _ in range(layers)),
            v=tuple(self._spec(V_POOL_AXES) for _ in range(layers)),
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

    # ----- state ------------------------------------------------------------------------------------------------

    def _empty_state(self) -> DecodeState:
        c, e = self.model_config, self.config
        n = self.budget.kv_pages
        k_pool = (n, c.num_kv_heads, c.head_dim, e.page_size)
        v_pool = (n, c.num_kv_heads, e.page_size, c.head_dim)
        b = e.num_slots
        i32 = functools.partial(jnp.zeros, dtype=jnp.int32)
        return DecodeState(
            k=tuple(jnp.zeros(k_pool, self.dtype) for _ in range(c.num_layers)),
            v=tuple(jnp.zeros(v_pool, self.dtype) for _ in range(c.num_layers)),
            lengths=i32((b,)),
            tokens=i32((b,)),
            active=jnp.zeros((b,), bool),
            remaining=i32((b,)),
            generated=i32((b,)),
            want_logprobs=jnp.zeros((b,), bool),
            sampling=SlotSampling.empty(b),
        )

    def reset(self) -> None:
        """An empty KV pool and all slots free, allocated directly in their shardings; the host bookkeeping (page
        tables, reservations, the prefix index) starts over with it."""
        self._host_lengths[:] = 0
        self._host_active[:] = False
        self._slots = [None] * self.config.num_slots
        stats = self.pool.stats if hasattr(self, "pool") else None
        self.pool = PagePool(self.budget.kv_pages, self.config.page_size, index=self.config.prefix_caching)
        if stats is not None:
            self.pool.stats = stats  # counters are since start-up
        if self.host is not None:
            self.pool.spilled = []
        self._restores = []
        self._state = None  # the old pools go before the new ones are allocated
        self._state = self._compile("init", 0)()

    # ----- compiled steps ---------------------------------------------------------------------------------------

    def _prefill_fn(self, params, state: DecodeState, tokens, positions, segments, paging: PrefillPaging, copy_src,
                    copy_dst, last, remaining, generated, want_logprobs, sampling):  # fmt: skip
        """Packed prefill: tokens/positions/segments [1, T] hold up to R prompts (segment r). First the pages a row
        starts from by copy (copy_src -> copy_dst, [R]; unused entries copy the sink onto itself) are copied; then
        every layer writes its K/V where `paging` says and attends inside each segment and to the cached pages the
        segment may see; the logits at each prompt's last token (`last` [R]) pick its first token."""
        pools = tuple(
            (k.at[copy_dst].set(k[copy_src]), v.at[copy_dst].set(v[copy_src]))
            for k, v in zip(state.k, state.v, strict=True)
        )
        logits, pools = self.model.apply(
            {"params": params},
            tokens,
            positions,
            pool=pools,
            segment_ids=segments,
            paging=paging,
            logits_index=last[None],
            vocab_major=True,
        )
        logits = logits[:, 0]  # [V, R]
        token = sample(logits, sampling, generated, vocab_axis=0)  # a resumed request continues its random stream
        logprob, top_ids, top_vals = self._logprobs(logits, token, want_logprobs)
        state = state.replace(k=tuple(k for k, _ in pools), v=tuple(v for _, v in pools))
        prefix = DevicePrefix(token, remaining, generated + 1, want_logprobs, sampling)
        return state, prefix, (logprob, top_ids, top_vals)

    def _insert_fn(self, prefix: DevicePrefix, state: DecodeState, slot, row, length):
        """Arms `slot` with row `row` of a packed prefix: its length, first token and knobs (its K/V are already in
        its pages)."""
        token = prefix.token[row]
        sampling_row = jax.tree.map(lambda a: a[row][None], prefix.sampling)
        first_stops = hits_stop(token[None], sampling_row.stop_ids)[0]
        sampling = jax.tree.map(lambda all_, one: all_.at[slot].set(one[0]), state.sampling, sampling_row)
        remaining = prefix.remaining[row]
        return state.replace(
            lengths=state.lengths.at[slot].set(length),
            tokens=state.tokens.at[slot].set(token),
            active=state.active.at[slot].set(~first_stops & (remaining > 0)),
            remaining=state.remaining.at[slot].set(remaining),
            generated=state.generated.at[slot].set(prefix.generated[row]),
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

    @staticmethod
    def _spill_fn(state: DecodeState, pages):
        """The pools' pages [W] of every layer: k [L, W, K, H, P], v [L, W, K, P, H] (a copy; the pools stay)."""
        return jnp.stack([k[pages] for k in state.k]), jnp.stack([v[pages] for v in state.v])

    @staticmethod
    def _restore_fn(state: DecodeState, pages, k, v):
        """Writes pages [W] of every layer from k [L, W, K, H, P], v [L, W, K, P, H] (see `_spill_fn`)."""
        return state.replace(
            k=tuple(pool.at[pages].set(x.astype(pool.dtype)) for pool, x in zip(state.k, k, strict=True)),
            v=tuple(pool.at[pages].set(x.astype(pool.dtype)) for pool, x in zip(state.v, v, strict=True)),
        )

    def _release_fn(self, state: DecodeState, slot):
        return state.replace(active=state.active.at[slot].set(False))

    def _generate_fn(self, params, state: DecodeState, table, steps, *, window: int):
        """`steps` (<= decode_steps, a runtime value) decode steps through the page table [B, window]; outputs have
        decode_steps rows, the rows past `steps` marked invalid."""
        b, n = self.config.num_slots, self.config.decode_steps

        # The rotary angles of every position the window holds, computed once outside the loop: each step gathers its
        # rows. Computed inside, XLA:CPU fused cos/sin into every layer's q and k rotation, per element (SmolLM2 at
        # 64 slots: those fusions took 5.7 ms of a ~85 ms step, 2.1 ms after).
        cos, sin = rope_angles(jnp.arange(window * self.config.page_size), self.model_config)

        def step(i, carry):
            st, outs = carry
            at = st.lengths[:, None]  # [B, 1]; past the window only for idle slots, whose output is dropped
            logits, pools = self.model.apply(
                {"params": params},
                st.tokens[:, None],
                at,
                pool=tuple(zip(st.k, st.v, strict=True)),
                table=table,
                lengths=st.lengths,
                vocab_major=True,
                rope=(jnp.take(cos, at, axis=0, mode="clip"), jnp.take(sin, at, axis=0, mode="clip")),
            )
            logits = logits[:, :, 0]  # [V, B]
            token = sample(logits, st.sampling, st.generated, vocab_axis=0)
            lp = self._logprobs(logits, token, st.want_logprobs & st.active)
            live = st.active
            step_int = live.astype(jnp.int32)
            remaining = st.remaining - step_int
            st = st.replace(
                k=tuple(k for k, _ in pools),  # the model wrote each slot's new K/V at its length
                v=tuple(v for _, v in pools),
                lengths=st.lengths + step_int,
                tokens=jnp.where(live, token, st.tokens),
                active=live & ~hits_stop(token, st.sampling.stop_ids) & (remaining > 0),
                remaining=remaining,
                generated=st.generated + step_int,
            )
            outs = tuple(o.at[i].set(x) for o, x in zip(outs, (token, live, *lp), strict=True))
            return st, outs

        outs = (
            jnp.zeros((n, b), jnp.int32),
            jnp.zeros((n, b), bool),
            jnp.zeros((n, b), jnp.float32),
            jnp.zeros((n, b, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((n, b, MAX_LOGPROBS), jnp.float32),
        )
        # a while loop with a runtime trip count: one compiled program serves every dispatch length
        state, outs = jax.lax.fori_loop(0, jnp.clip(steps, 1, n), step, (state, outs))
        tokens, valid, logprob, top_ids, top_vals = outs
        return state, (tokens, valid, state.active, logprob, top_ids, top_vals)

    def _abstract(self, tree: Any, shardings: Any) -> Any:
        return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings)

    def _compile(self, kind: str, size: int):
        """The compiled executable for one shape (compiled now if warm-up did not)."""
        key = (kind, size)
        if key not in self._compiled:
            self._compiled[key] = self._lower(kind, size).compile()
        return self._compiled[key]

    def _prefill_rows_abstract(self, r: int) -> tuple:
        rep = self._replicated
        sampling_abs = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), SlotSampling.empty(r)
        )
        per_row = jax.ShapeDtypeStruct((r,), jnp.int32, sharding=rep)
        return per_row, jax.ShapeDtypeStruct((r,), bool, sharding=rep), sampling_abs

    def _lower(self, kind: str, size: int):
        rep = self._replicated
        i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        state_abs = self._abstract(jax.eval_shape(self._empty_state), self.state_shardings)
        params_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.params)
        if kind == "prefill":
            r = self.prefill_rows(size)
            per_row, want_abs, sampling_abs = self._prefill_rows_abstract(r)
            prefix_sh = DevicePrefix(rep, rep, rep, rep, jax.tree.map(lambda _: rep, SlotSampling.empty(1)))
            fn = jax.jit(self._prefill_fn, donate_argnums=(1,), out_shardings=(self.state_shardings, prefix_sh, rep))
            row_abs = jax.ShapeDtypeStruct((1, size), jnp.int32, sharding=rep)
            per_token = jax.ShapeDtypeStruct((size,), jnp.int32, sharding=rep)
            per_ctx = jax.ShapeDtypeStruct((self.config.context_pages,), jnp.int32, sharding=rep)
            paging = PrefillPaging(per_token, per_token, per_ctx, per_ctx, per_ctx, i32,
                                   block_pages=context_block_pages(self.config.page_size))  # fmt: skip
            args = (params_abs, state_abs, row_abs, row_abs, row_abs, paging, per_row, per_row, per_row, per_row,
                    per_row, want_abs, sampling_abs)  # fmt: skip
        elif kind == "insert":
            fn = jax.jit(self._insert_fn, donate_argnums=(1,), out_shardings=self.state_shardings)
            r = self.prefill_rows(size)
            per_row, want_abs, sampling_abs = self._prefill_rows_abstract(r)
            args = (DevicePrefix(per_row, per_row, per_row, want_abs, sampling_abs), state_abs, i32, i32, i32)
        elif kind == "init":
            fn = jax.jit(self._empty_state, out_shardings=self.state_shardings)
            args = ()
        elif kind == "release":
            fn = jax.jit(self._release_fn, donate_argnums=(0,), out_shardings=self.state_shardings)
            args = (state_abs, i32)
        elif kind in ("spill", "restore"):
            pages = jax.ShapeDtypeStruct((size,), jnp.int32, sharding=rep)
            k_sh, v_sh = self._spec((None, *K_POOL_AXES)), self._spec((None, *V_POOL_AXES))
            if kind == "spill":
                fn = jax.jit(self._spill_fn, out_shardings=(k_sh, v_sh))
                args = (state_abs, pages)
            else:
                fn = jax.jit(self._restore_fn, donate_argnums=(0,), out_shardings=self.state_shardings)
                c = self.model_config
                k_abs = jax.ShapeDtypeStruct(
                    (c.num_layers, size, c.num_kv_heads, c.head_dim, self.config.page_size), self.dtype, sharding=k_sh
                )
                v_abs = jax.ShapeDtypeStruct(
                    (c.num_layers, size, c.num_kv_heads, self.config.page_size, c.head_dim), self.dtype, sharding=v_sh
                )
                args = (state_abs, pages, k_abs, v_abs)
        elif kind == "generate":
            fn = jax.jit(
                functools.partial(self._generate_fn, window=size),
                donate_argnums=(1,),
                out_shardings=(self.state_shardings, rep),
            )
            table = jax.ShapeDtypeStruct((self.config.num_slots, size), jnp.int32, sharding=self._spec(("slots", None)))
            args = (params_abs, state_abs, table, i32)
        else:
            raise KeyError(kind)
        return fn.lower(*args)

    def warmup(self, max_workers: int | None = None) -> float:
        """Compiles every prefill bucket, the insert of each bucket's rows, every decode window and the release
        step; returns seconds taken. Shapes compile in parallel threads (XLA compiles outside the GIL), one per core
        by default."""
        start = time.perf_counter()
        todo = [s for s in self.shapes if s not in self._compiled]
        with concurrent.futures.ThreadPoolExecutor(max_workers or os.cpu_count() or 1) as pool:
            compiled = list(pool.map(lambda shape: self._lower(*shape).compile(), todo))
        self._compiled.update(zip(todo, compiled, strict=True))
        elapsed = time.perf_counter() - start
        log.info("warm-up compiled %d shapes in %.1f s", len(todo), elapsed)
        return elapsed

    @property
    def shapes(self) -> list[tuple[str, int]]:
        """Every (step, size) the engine runs: warm-up compiles exactly these."""
        rows = sorted({self.prefill_rows(t) for t in self.config.prefill_buckets})
        inserts = {r: t for t in reversed(self.config.prefill_buckets) for r in [self.prefill_rows(t)]}
        return (
            [("prefill", t) for t in self.config.prefill_buckets]
            + [("generate", w) for w in self.config.windows]
            + [("insert", inserts[r]) for r in rows]
            + [("release", 0), ("init", 0)]
            + ([("spill", HOST_COPY_PAGES), ("restore", HOST_COPY_PAGES)] if self.host is not None else [])
        )

    # ----- the engine API ---------------------------------------------------------------------------------------

    def bucket_for(self, length: int) -> int:
        """The prefill bucket a call of `length` tokens runs in."""
        for t in self.config.prefill_buckets:
            if length <= t:
                return t
        raise CapacityError(
            f"a prefill call of {length} tokens exceeds max_prefill_len={self.config.max_prefill_len}"
        )  # prompts longer than that are chunked before they get here

    def pages_needed(self, prompt_len: int, max_tokens: int) -> int:
        """Pages a request reserves at admission (shared pages only lower it): every position it can ever write, or
        with admission 'grow' its prompt and one dispatch (see EngineConfig.admission)."""
        if self.config.admission == "grow":
            max_tokens = min(max_tokens, self.config.decode_steps)
        return self.pool.pages_for(prompt_len + max_tokens)

    def pages_short(self, steps: int | None = None, releasing: Sequence[int] = ()) -> int:
        """Pages the active slots (less `releasing`) need beyond their reservations for a dispatch of `steps`,
        minus what the pool can give them once `releasing` is released: > 0 means the dispatch cannot run
        (admission 'grow': preempt first; 'reserve' never runs short)."""
        steps = self.config.decode_steps if steps is None else steps
        p, need = self.config.page_size, 0
        for b, s in enumerate(self._slots):
            if s is None or b in releasing or not self._host_active[b]:
                continue
            need += max(0, min(-(-(s.length + steps) // p), s.max_pages) - len(s.pages) - s.reserved)
        return need - self.pool.available() - sum(self.pages_released_by(b) for b in releasing)

    def check_request(self, prompt_len: int, params: SamplingParams) -> None:
        """Raises ValueError / CapacityError saying what to change when the request cannot run."""
        if prompt_len < 1:
            raise ValueError("prompt is empty; send at least one token")
        params.validate(self.model_config.vocab_size)
        if prompt_len >= self.config.max_seq_len:
            raise CapacityError(
                f"prompt has {prompt_len} tokens but the context holds {self.config.max_seq_len} (prompt + at least "
                "one generated token); shorten the prompt"
            )
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
        """How prompts computing these many tokens are grouped into prefill calls, in order: as many per call as fit,
        their total within `max_prefill_len` and their count within `prefill_rows` of the bucket that total runs in."""
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

    def can_admit(self, pages: int) -> bool:
        """Whether a request reserving `pages` fits the KV memory now (free + evictable pages, less reservations)."""
        return pages <= self.pool.available()

    def prefill_batch(
        self, requests: Sequence[tuple[Sequence[int], SamplingParams, int] | Prefix], token_budget: int | None = None
    ) -> list[Prefix]:
        """Runs prompts (tokens, params, seed) packed side by side, a few per call (see `packs`), and samples each
        one's first token; a Prefix that is not `done` yet (a long prompt) continues where it stopped.

        Each new prompt first takes what the prefix index holds of it (whole pages shared, a partly matching page
        copied) and reserves the pages it can ever need; prompts of this batch are indexed as their pack is
        dispatched, so later packs already find them. Prompts longer than `max_prefill_len` run in chunks of that
        size. With `token_budget`, at most that much is computed (whole prompts first come first; a token at a long
        context counts for more, see `_prefill_cost`): what is left is returned with `done` False, for a later
        call. Raises CapacityError, having taken nothing, when the
        new prompts' reservations do not fit the KV memory."""
        prefixes = [r if isinstance(r, Prefix) else self.open_prompt(*r) for r in requests]
        try:
            self._compute(prefixes, token_budget)
        except Exception:
            # a failed call may have written some of these pages: forget everything cached and give the pages back
            for p in prefixes:
                self.discard(p)
            self.clear_prefix_cache()
            self._restores = []
            raise
        return prefixes

    def open_prompt(self, tokens: Sequence[int], params: SamplingParams, seed: int, generated: int = 0) -> Prefix:
        """A new prompt's Prefix, ready for `prefill_batch`, with its pages reserved (`pages_needed`). Raises
        ValueError / CapacityError (having taken nothing) when the request is invalid or its pages do not fit now.
        `generated`: tokens at the end of `tokens` the request generated before it was preempted (its random stream
        goes on from there).

        What the prefix index holds of it is looked up when it is about to run (`_attach`), not here: a prompt that
        waits for an earlier prompt of its batch then finds that one's pages."""
        self.check_prompt(tokens, params)
        ids = np.asarray(tokens, np.int32)
        total = self.pages_needed(len(ids), params.max_tokens)
        if total > self.pool.available():
            raise CapacityError(
                f"the KV memory has {self.pool.available()} pages available and this request needs {total}; retry "
                "when running requests finish"
            )
        self.pool.reserve(total)
        return Prefix(ids, params, seed, [], total, 0, 0, generated=generated)

    def _peek(self, p: Prefix) -> Match:
        """What the prefix index holds of a prompt (the last token is always computed: its logits pick the first)."""
        return self.pool.match(p.tokens.tolist(), limit=p.length - 1)

    def _attach(self, p: Prefix, sharers: dict[int, int]) -> None:
        """Takes a prompt's cached opening: matching full pages shared as they are (each one less to allocate), then
        a partly matching page taken over when nobody holds it and no other prompt of this call wants it, else
        copied into a page of the prompt's own (copy-on-write). `sharers`: prompts of this call per partial page."""
        p.attached = True
        match = self._peek(p)
        for page in match.pages:
            self.pool.retain(page)
            self.pool.unreserve(1)
            p.reserved -= 1
        p.pages = list(match.pages)
        copy, cached = match.copy_from, match.tokens
        if self.host is not None and self.config.prefix_caching:
            size = self.config.page_size
            found = self.host.chain(match.key, p.tokens.tolist(), size, len(match.pages), p.length - 1)
            if found.tokens(size) > match.copy_tokens:  # more than the device's partly matching page
                keys = [*found.keys, *([found.partial] if found.partial is not None else [])]
                k, v = self.host.read(keys)
                pages = [self.pool.allocate(reserved=True) for _ in keys]
                p.reserved -= len(keys)
                p.pages += pages
                self._restores.append((pages, k, v))
                p.host_cached = found.tokens(size)
                copy, cached = None, len(match.pages) * size + p.host_cached
                self.host.stats.hit_tokens += p.host_cached
                self.prefix_stats.host_hit_tokens += p.host_cached
                self._index(p.tokens[:cached], p.pages)  # later prompts of this call find them on the device
        if copy is not None and self.pool.refs[copy] == 0 and sharers.get(copy, 0) <= 1:
            self.pool.adopt(copy)  # an evictable page becomes this prompt's: one page less to allocate
            self.pool.unreserve(1)
            p.reserved -= 1
            p.pages.append(copy)
        elif copy is not None and (self.pool.refs[copy] > 0 or self.pool.available() >= 1):
            self.pool.retain(copy)  # until the copy is dispatched
            p.copy_from = copy
            p.pages.append(self.pool.allocate(reserved=True))
            p.reserved -= 1
        elif copy is not None:
            cached -= match.copy_tokens  # holding the page to copy from would eat into reservations: compute it
        p.cached = p.computed = cached
        self.prefix_stats.prompts += 1
        self.prefix_stats.prompt_tokens += p.length
        self.prefix_stats.hit_prompts += cached > 0
        self.prefix_stats.hit_tokens += cached

    def discard(self, prefix: Prefix) -> None:
        """Gives back what a Prefix holds that was never inserted (its computed pages stay cached)."""
        if prefix.released:
            return
        prefix.released = True
        src = prefix.copy_from
        if src is not None:
            self.pool.release(src)
            prefix.copy_from = None
        self._index(prefix.tokens[: prefix.computed], prefix.pages)
        for page in prefix.pages:
            self.pool.release(page)
        self.pool.unreserve(prefix.reserved)

    def _sync_host_tier(self) -> None:
        """Before any step that writes the pools: copies out the full pages eviction freed since the last step
        (their contents are intact until then; the gather is ordered before the step that reuses them) and copies
        in the host-tier hits taken since. The copies to host memory finish on the tier's thread."""
        if self.host is None:
            return
        w = HOST_COPY_PAGES
        spilled = []
        for s in self.pool.take_spilled():
            if s.key in self.host:
                self.host.touch(s.key)  # restored earlier and still there: nothing to copy
            else:
                spilled.append(s)
        for i in range(0, len(spilled), w):
            part = spilled[i : i + w]
            pages = np.full((w,), SINK_PAGE, np.int32)
            pages[: len(part)] = [s.page for s in part]
            k, v = self._compile("spill", w)(self._state, pages)
            size = self.config.page_size
            self.host.add([(s.key, s.parent, s.tokens, len(s.tokens) == size) for s in part], k, v)
        for pages, k, v in self._restores:
            for i in range(0, len(pages), w):
                n = len(pages[i : i + w])
                dest = np.full((w,), SINK_PAGE, np.int32)
                dest[:n] = pages[i : i + w]
                kw = np.zeros((k.shape[0], w, *k.shape[2:]), k.dtype)
                vw = np.zeros((v.shape[0], w, *v.shape[2:]), v.dtype)
                kw[:, :n], vw[:, :n] = k[:, i : i + n], v[:, i : i + n]
                self._state = self._compile("restore", w)(self._state, dest, kw, vw)
        self._restores = []

    def _index(self, tokens: np.ndarray, pages: Sequence[int]) -> None:
        n = -(-len(tokens) // self.config.page_size)
        if n:
            self.pool.insert(tokens.tolist(), pages[:n])

    def _compute(self, prefixes: list[Prefix], token_budget: int | None) -> None:
        """Runs prefill calls until every prefix is done or the budget is spent; samples the first token of each
        prompt that completes."""
        budget = token_budget
        launched = []
        todo = [i for i, p in enumerate(prefixes) if not p.done]
        while todo and (budget is None or budget > 0):
            ready, peeks = self._ready(todo, prefixes)
            sharers: dict[int, int] = {}
            for m in peeks.values():
                if m.copy_from is not None:
                    sharers[m.copy_from] = sharers.get(m.copy_from, 0) + 1
            rows: list[tuple[int, int]] = []  # (prefix index, tokens computed in this call)
            total = 0
            for i in ready:
                p = prefixes[i]
                if not p.attached:
                    self._attach(p, sharers)
                n = min(p.length - p.computed, self.config.max_prefill_len)
                if budget is not None:
                    n = min(n, self._tokens_within(budget - total, p.computed))
                if n <= 0:
                    break
                rows.append((i, n))
                total += self._prefill_cost(n, p.computed)
            packs = self.packs([n for _, n in rows])
            pack = [rows[j] for j in packs[0]]
            pack = self._fit_context(pack, prefixes)
            launched.append(self._launch(pack, prefixes))
            if budget is not None:
                budget -= sum(self._prefill_cost(n, prefixes[i].computed - n) for i, n in pack)
            todo = [i for i in todo if not prefixes[i].done]
        eos = self.model_config.eos_token_ids
        for pack, bucket, device, lps in launched:
            finishing = [(row, i) for row, (i, _) in enumerate(pack) if prefixes[i].done]
            if not finishing:
                continue
            token, logprob, top_ids, top_vals = jax.device_get((device.token, *lps))
            for row, i in finishing:
                p = prefixes[i]
                first = int(token[row])
                stops = p.params.stop_ids(eos)
                if p.params.logprobs is not None:
                    n_top = p.params.logprobs
                    top = zip(top_ids[row, :n_top], top_vals[row, :n_top], strict=True)
                    p.logprobs = TokenLogprobs(float(logprob[row]), tuple((int(a), float(b)) for a, b in top))
                p.device, p.bucket, p.row, p.token = device, bucket, row, first
                p.finished = first in stops or p.params.max_tokens == 1
                if p.finished:
                    self.discard(p)

    @property
    def _attention_crossover(self) -> float:
        """Context length at which a prompt token's attention FLOPs equal its weight FLOPs (SmolLM2: ~3,900)."""
        c = self.model_config
        return 2 * c.num_params / (4 * c.num_layers * c.num_heads * c.head_dim)

    def _prefill_cost(self, n: int, start: int) -> int:
        """What computing positions [start, start + n) costs, in tokens at no context: attention over a long context
        makes a token dearer (the token budget bounds the time a step spends in prefill, not the token count)."""
        return int(np.ceil(n * (1 + (start + n / 2) / self._attention_crossover)))

    def _tokens_within(self, budget: int, start: int) -> int:
        """Most tokens from position `start` whose `_prefill_cost` fits `budget` (at least 1 when budget > 0)."""
        if budget <= 0:
            return 0
        x = self._attention_crossover
        # n (1 + (start + n/2) / x) <= budget: the positive root of n^2 / (2x) + n (1 + start / x) - budget = 0
        a, b = 1 / (2 * x), 1 + start / x
        n = int((-b + np.sqrt(b * b + 4 * a * budget)) / (2 * a))
        while n > 1 and self._prefill_cost(n, start) > budget:
            n -= 1
        return max(n, 1)

    def _ready(self, todo: list[int], prefixes: list[Prefix]) -> tuple[list[int], dict[int, Match]]:
        """Prefixes in `todo` that should run now, and what the index holds of those not started: a prompt that
        shares at least MIN_SHARED_TOKENS more tokens with an earlier prompt of the batch than the index holds of it
        waits until that prompt is indexed (a later pack finds it), so a burst of prompts with a common system
        prompt or template computes it once, not once per pack row."""
        ready, leaders, peeks = [], [], {}
        for i in todo:
            p = prefixes[i]
            if not p.attached:
                peeks[i] = self._peek(p)
                if self.config.prefix_caching:
                    shared = max((_common_prefix(p.tokens[: p.length - 1], lead) for lead in leaders), default=0)
                    if shared - peeks[i].tokens >= MIN_SHARED_TOKENS:
                        del peeks[i]
                        continue
            ready.append(i)
            leaders.append(p.tokens)
        return ready, peeks

    def _fit_context(self, pack: list[tuple[int, int]], prefixes: list[Prefix]) -> list[tuple[int, int]]:
        """The longest head of `pack` whose rows' cached pages, together, fit one call's context list."""
        seen: set[int] = set()
        for j, (i, _) in enumerate(pack):
            ctx = set(self._context_pages(prefixes[i]))
            if j and len(seen | ctx) > self.config.context_pages:
                return pack[:j]
            seen |= ctx
        return pack

    def _context_pages(self, p: Prefix) -> list[tuple[int, int]]:
        """(page, positions it holds) of a prefix's computed positions, as its next prefill call reads them. A page
        still to be copied is read from its source: rows copying the same positions of the same page share one
        context entry (a burst of prompts with a common opening reads one page, not one each); the same page seen
        to different lengths is two entries, so no row sees past its own."""
        size = self.config.page_size
        pages = p.pages[: -(-p.computed // size)]
        if p.copy_from is not None:
            pages[p.computed // size] = p.copy_from
        return [(page, min(size, p.computed - k * size)) for k, page in enumerate(pages)]

    def _launch(self, pack: list[tuple[int, int]], prefixes: list[Prefix]) -> tuple:
        """Dispatches one packed prefill of (prefix index, tokens to compute) rows and indexes what it computes;
        returns (pack, bucket, device prefix, logprob arrays) without waiting for the device."""
        e, eos = self.config, self.model_config.eos_token_ids
        p_size = e.page_size
        bucket = self.bucket_for(sum(n for _, n in pack))
        r = self.prefill_rows(bucket)
        tokens_row = np.zeros((1, bucket), np.int32)
        positions = np.zeros((1, bucket), np.int32)
        segments = np.full((1, bucket), -1, np.int32)
        dest_page = np.full((bucket,), SINK_PAGE, np.int32)
        dest_offset = np.zeros((bucket,), np.int32)
        last, remaining, generated, copy_src, copy_dst = (np.zeros((r,), np.int32) for _ in range(5))
        want = np.zeros((r,), bool)
        rows = [SlotSampling.from_params(SamplingParams(), 0, eos)] * r
        ctx: dict[tuple[int, int], int] = {}  # (page, valid positions) -> row bit mask
        at = 0
        for row, (i, n) in enumerate(pack):
            p = prefixes[i]
            start = p.computed
            end = start + n
            self._grow(p, end)
            pos = np.arange(start, end)
            tokens_row[0, at : at + n] = p.tokens[start:end]
            positions[0, at : at + n] = pos
            segments[0, at : at + n] = row
            dest_page[at : at + n] = np.asarray(p.pages, np.int32)[pos // p_size]
            dest_offset[at : at + n] = pos % p_size
            last[row], remaining[row], generated[row] = at + n - 1, p.params.max_tokens - 1, p.generated
            want[row] = p.params.logprobs is not None
            rows[row] = SlotSampling.from_params(p.params, p.seed, eos)
            src = p.copy_from
            if src is not None:
                copy_src[row], copy_dst[row] = src, p.pages[start // p_size]
            for entry in self._context_pages(p):
                ctx[entry] = ctx.get(entry, 0) | 1 << row
            at += n
        if len(ctx) > e.context_pages:
            raise AssertionError(f"{len(ctx)} context pages exceed the call's {e.context_pages}")  # _fit_context
        ctx_pages, ctx_rows, ctx_valid = (np.zeros((e.context_pages,), np.int32) for _ in range(3))
        for j, ((page, valid), mask) in enumerate(ctx.items()):
            ctx_pages[j], ctx_rows[j], ctx_valid[j] = page, np.int32(np.uint32(mask).view(np.int32)), valid
        cb = context_block_pages(p_size)
        paging = PrefillPaging(dest_page, dest_offset, ctx_pages, ctx_rows, ctx_valid, np.int32(-(-len(ctx) // cb)),
                               block_pages=cb)  # fmt: skip
        sampling = jax.tree.map(lambda *a: np.concatenate(a), *rows)
        self._sync_host_tier()
        self._state, device, lps = self._compile("prefill", bucket)(
            self.params, self._state, tokens_row, positions, segments, paging, copy_src, copy_dst, last, remaining,
            generated, want, sampling,
        )  # fmt: skip
        for i, n in pack:
            p = prefixes[i]
            if p.copy_from is not None:  # the copy is dispatched: its source may go
                self.pool.release(p.copy_from)
                p.copy_from = None
            p.computed += n
            self._index(p.tokens[: p.computed], p.pages)
        return pack, bucket, device, lps

    def _grow(self, p: Prefix, end: int) -> None:
        """Allocates (from its reservation) the pages a prefix needs to hold `end` positions."""
        while len(p.pages) * self.config.page_size < end:
            p.pages.append(self.pool.allocate(reserved=True))
            p.reserved -= 1

    def insert(self, prefix: Prefix, slot: int) -> None:
        """Places a prefilled prompt (done, not finished) into a free `slot`: the slot takes over its pages and the
        rest of its reservation."""
        if not 0 <= slot < self.config.num_slots:
            raise IndexError(f"slot {slot} outside [0, {self.config.num_slots})")
        if self._slots[slot] is not None:
            raise ValueError(f"slot {slot} is in use; release it first")
        if not prefix.done or prefix.finished or prefix.released:
            raise ValueError("only a prefix that is done, not finished and not discarded can be inserted")
        key = ("insert", self._insert_bucket(prefix.bucket))
        self._state = self._compile(*key)(prefix.device, self._state, np.int32(slot), np.int32(prefix.row),
                                          np.int32(prefix.length))  # fmt: skip
        prefix.released = True  # the slot holds the pages now
        most = self.pool.pages_for(prefix.length + prefix.params.max_tokens)
        self._slots[slot] = _Slot(
            prefix.pages, prefix.reserved, [*prefix.tokens.tolist(), prefix.token], prefix.length, most
        )
        self._host_lengths[slot] = prefix.length
        self._host_active[slot] = True

    def _insert_bucket(self, bucket: int) -> int:
        """The smallest bucket with as many rows as `bucket` (inserts compile once per row count)."""
        r = self.prefill_rows(bucket)
        return min(t for t in self.config.prefill_buckets if self.prefill_rows(t) == r)

    def release(self, slot: int) -> None:
        """Ends a slot (finished, cancelled, or stopped on the host by a stop string): its pages are indexed by the
        tokens they hold and given back (they stay cached until the memory is needed), its reservation returned."""
        s = self._slots[slot]
        if s is None:
            return
        if self._host_active[slot]:
            self._state = self._compile("release", 0)(self._state, np.int32(slot))
        self._slots[slot] = None
        self._host_active[slot] = False
        self._host_lengths[slot] = 0
        self._index(np.asarray(s.tokens[: s.length], np.int32), s.pages)
        for page in s.pages:
            self.pool.release(page)
        self.pool.unreserve(s.reserved)

    def window_for(self, longest: int, steps: int | None = None) -> int:
        """Pages the decode attention must cover for sequences up to `longest` tokens through one dispatch."""
        need = longest + (steps or self.config.decode_steps)
        for w in self.config.windows:
            if need <= w * self.config.page_size:
                return w
        return self.config.num_pages

    def generate(self, steps: int | None = None) -> StepOutput:
        """Advances every active slot `steps` tokens (default and most: `decode_steps`); one dispatch and one copy
        back to the host. Any `steps` runs the same compiled program (the loop's trip count is an argument)."""
        steps = self.config.decode_steps if steps is None else steps
        if not 1 <= steps <= self.config.decode_steps:
            raise ValueError(f"steps must be in [1, {self.config.decode_steps}] (decode_steps), got {steps}")
        longest = int(self._host_lengths[self._host_active].max(initial=0))
        window = self.last_window = self.window_for(longest, steps)
        p = self.config.page_size
        table = np.zeros((self.config.num_slots, window), np.int32)
        for b, s in enumerate(self._slots):
            if s is None:
                continue
            # pages for every position this dispatch may write, within what the request can ever need: from its
            # reservation first, then (admission 'grow') from the pool, which the scheduler made sure can give them
            need = min(-(-(s.length + steps) // p), s.max_pages)
            while len(s.pages) < need:
                s.pages.append(self.pool.allocate(reserved=s.reserved > 0))
                s.reserved -= s.reserved > 0
            if self._host_active[b]:
                row = s.pages[:window]
                table[b, : len(row)] = row
        self._sync_host_tier()
        self._state, out = self._compile("generate", window)(self.params, self._state, table, np.int32(steps))
        tokens, valid, active, logprob, top_ids, top_vals = jax.device_get(out)
        for b, s in enumerate(self._slots):
            if s is not None and self._host_active[b]:
                new = tokens[valid[:, b], b].tolist()
                s.tokens.extend(new)
                s.length += len(new)
        self._host_lengths += valid.sum(axis=0)
        self._host_active = np.array(active) & np.array([s is not None for s in self._slots])
        return StepOutput(tokens, valid, active, logprob, top_ids, top_vals)

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
    def state(self) -> DecodeState:
        """The device state (KV pools and per-slot rows); read-only for callers (tests, metrics)."""
        return self._state

    def pages_released_by(self, slot: int) -> int:
        """Pages that releasing `slot` would make available to new reservations (its unused reservation and the
        pages no other sequence shares)."""
        s = self._slots[slot]
        return 0 if s is None else s.reserved + sum(self.pool.refs[p] == 1 for p in s.pages)

    def slot_pages(self, slot: int) -> list[int]:
        """The pages slot `slot` holds, in position order (empty when free)."""
        s = self._slots[slot]
        return [] if s is None else list(s.pages)

    @property
    def host_lengths(self) -> np.ndarray:
        """Tokens cached per slot, as the host last saw them."""
        return self._host_lengths

    def slot_active(self, slot: int) -> bool:
        """Whether the device is still generating for `slot` (as of the last dispatch the host saw)."""
        return bool(self._host_active[slot])

    def clear_prefix_cache(self) -> None:
        """Forgets every cached prefix, in both tiers (the next prompts are computed in full)."""
        self.pool.clear_index()
        self.pool.take_spilled()
        if self.host is not None:
            self.host.clear()

    @property
    def compiled_shapes(self) -> list[tuple[str, int]]:
        return sorted(self._compiled)


def _shards(spec: PartitionSpec, mesh: Mesh) -> int:
    """Into how many pieces a sharding with `spec` splits an array over `mesh`."""
    n = 1
    for axes in spec:
        for a in (axes,) if isinstance(axes, str) else axes or ():
            n *= mesh.shape[a]
    return n
