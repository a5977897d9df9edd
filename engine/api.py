"""What crosses the engine's boundary: its configuration, the prompt handle and outputs it hands back, and
`EngineLike`, the narrow interface the scheduler is written against.

`Engine` (engine.engine) implements `EngineLike` on a model and a device; `MockEngine` (engine.mock_engine) without
either, with tokens one can compute by hand, so the scheduler is tested without a model (as JetStream's
engine_api / mock_engine pair does). The flow through it, per request: `open_prompt` -> `prefill_batch` (until the
Prefix is `done`) -> `insert(prefix, slot)` -> `generate()` per dispatch -> `release(slot)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import jax
import numpy as np

from engine.attention import context_block_pages
from engine.config import ModelConfig
from engine.kv import PagePool
from engine.kv.host import HostTier
from engine.sampling import SamplingParams

if TYPE_CHECKING:
    from engine.steps import DevicePrefix


class CapacityError(ValueError):
    """The requested configuration does not fit the device, or a request does not fit the context or the KV memory."""


def default_dtype() -> str:
    """float32 on CPU (XLA:CPU bf16 matmuls are ~25x slower), bfloat16 on TPU/GPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, x = [], lo
    while x < hi:
        out.append(x)
        x *= 2
    return (*out, hi)


def _and_halves(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 1.5 lo, 2 lo, 3 lo, 4 lo, ... up to hi (and hi itself): a size rounded up to the next of these is less than
    1.5x what it needed (4/3x just past a 1.5x step), where powers of two alone approach 2x."""
    twos = _powers_of_two(lo, hi)
    return tuple(sorted({*twos, *(3 * x // 2 for x in twos if x % 2 == 0 and 3 * x // 2 < hi)}))


ATTENTION_CHOICES = ("auto", "kernel", "pallas", "xla")
LINEAR_CHOICES = ("auto", "kernel", "xla")
QUANTIZE_CHOICES = ("none", "int8")
KV_DTYPE_CHOICES = ("auto", "int8")
ADMISSION_CHOICES = ("reserve", "grow")
MAX_PREFILL_SEGMENTS = 32  # a context page names the rows that see it in one int32 bit mask
MAX_KERNEL_SPIN_US = 1_000_000  # a second of spinning per call is a mistake, not a setting


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
    fine_prefill_buckets: bool = True
    """Prefill buckets at powers of two and 1.5x them (16, 24, 32, 48, 64, 96, ...): past the smallest, a call
    computes less than 1.5x the tokens it holds, where powers of two alone approach 2x (a 41-token prompt runs in 48,
    not 64). False: powers of two only, about half the prefill compiles at warm-up."""
    prefill_segments: int = 32
    """Most prompts packed into one prefill call (their total length within `max_prefill_len`); a call of T tokens
    packs at most max(MIN_PREFILL_ROWS, T // PREFILL_TOKENS_PER_ROW) of them (see `engine.prefill.prefill_rows`)."""
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
    (XLA's dot, any backend and sharding) or 'auto' (the kernel on a one-device CPU mesh in float32 with one slot or
    at least MIN_KERNEL_LINEAR_SLOTS, or with int8 weights, where a C++ compiler exists, else xla)."""
    quantize: str = "none"
    """Weight format: 'int8' quantizes the linear weights, the embedding and the head at load to int8 with a float32
    scale per output channel (engine.quant; weight-only, activations stay in `dtype`), a quarter of float32's bytes
    and half of bfloat16's; 'none' runs them in `dtype`."""
    huge_pages: bool = True
    """On CPU, copy the weights at load into one mapping in 2 MiB pages where the kernel allows transparent huge
    pages (engine.host_memory): a decode step streams every weight, and 4 KiB pages cost it TLB misses and prefetch
    stops. No effect on other devices."""
    kernel_spin_us: int = 200
    """The CPU kernels' helper threads wait this long for the next call spinning, then sleep (process-wide: the
    last engine built sets it). A batch-1 decode step makes ~150 kernel calls; waking a sleeping thread for each
    cost ~1-2 us of ~30. 0 hands every call's work to XLA's thread pool instead (no spinning, e.g. where several
    processes share the cores; scripts/serve.py's default: spinning cost TTFT through the gateway 3-4 ms on a
    2-core VM)."""
    kv_dtype: str = "auto"
    """KV cache format: 'auto' stores K and V in `dtype`; 'int8' stores int8 values with one bfloat16 scale per
    token and kv head beside the pages (engine.attention.Int8Pages), which attention dequantizes as it reads: per
    token 2 * (H + 2) bytes per kv head and layer instead of 2 * H * itemsize (1.94x bfloat16's tokens, 3.9x
    float32's, in the same memory). The host tier and the prefix cache keep the int8 form."""

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
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.kv_dtype not in KV_DTYPE_CHOICES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPE_CHOICES)}, got {self.kv_dtype!r}")
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
        if not 0 <= self.kernel_spin_us <= MAX_KERNEL_SPIN_US:
            raise ValueError(f"kernel_spin_us must be in [0, {MAX_KERNEL_SPIN_US}], got {self.kernel_spin_us}")

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        lo, hi = min(self.min_prefill_len, self.max_prefill_len), self.max_prefill_len
        return _and_halves(lo, hi) if self.fine_prefill_buckets else _powers_of_two(lo, hi)

    @property
    def num_pages(self) -> int:
        """Page table entries per slot (pages of the longest sequence)."""
        return self.max_seq_len // self.page_size

    @property
    def windows(self) -> tuple[int, ...]:
        """Decode windows in pages: 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5x them) up to all pages, so a
        dispatch reads less than 1.5x the pages its longest sequence needs, from 5 + 2 log2(pages) compiles."""
        return _and_halves(1, self.num_pages)

    @property
    def context_pages(self) -> int:
        """Cached pages one prefill call may read (a whole sequence's), rounded up to whole context blocks."""
        cb = context_block_pages(self.page_size)
        return -(-self.num_pages // cb) * cb


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
    attached: bool = False  # its cached opening was looked up (see HostBook._attach)
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


class EngineLike(Protocol):
    """Exactly what the scheduler (engine.scheduler: `Scheduler` and `Executor`) uses of an engine.

    Every engine call the scheduler makes is in a `StepPlan`, run by the `Executor`: `open_prompt`,
    `prefill_batch`, `insert`, `generate`, `release`, `discard`, `reset`. The rest it reads to plan (admission and
    preemption by pages) and to report (stats)."""

    config: EngineConfig
    model_config: ModelConfig
    """Read for `eos_token_ids` (a request's stop ids)."""
    pool: PagePool
    """The KV pages' bookkeeping: `available()` for admission, the page counts for stats."""
    host: HostTier | None
    """The host KV tier, for stats (None: no tier)."""
    prefix_stats: PrefixCacheStats
    last_window: int
    """Pages of each table row the last `generate` dispatch read."""

    @property
    def host_lengths(self) -> np.ndarray:
        """Tokens cached per slot, as the host last saw them."""
        ...

    def check_prompt(self, tokens: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError / CapacityError saying what to change when the request cannot run."""
        ...

    def pages_needed(self, prompt_len: int, max_tokens: int) -> int:
        """Pages a request reserves at admission (see EngineConfig.admission)."""
        ...

    def pages_short(self, steps: int | None = None, releasing: Sequence[int] = ()) -> int:
        """Pages the next dispatch needs beyond what the pool can give, once `releasing` is released (> 0: it
        cannot run)."""
        ...

    def pages_released_by(self, slot: int) -> int:
        """Pages that releasing `slot` would make available to new reservations."""
        ...

    def slot_active(self, slot: int) -> bool:
        """Whether the device is still generating for `slot` (as of the last dispatch)."""
        ...

    def open_prompt(self, tokens: Sequence[int], params: SamplingParams, seed: int, generated: int = 0) -> Prefix:
        """A new prompt's Prefix with its pages reserved; raises ValueError / CapacityError having taken nothing."""
        ...

    def prefill_batch(
        self, requests: Sequence[tuple[Sequence[int], SamplingParams, int] | Prefix], token_budget: int | None = None
    ) -> list[Prefix]:
        """Computes the prompts (at most `token_budget` tokens) and samples the first token of each one done."""
        ...

    def discard(self, prefix: Prefix) -> None:
        """Gives back what a Prefix that was never inserted holds."""
        ...

    def insert(self, prefix: Prefix, slot: int) -> None:
        """Places a done, not finished Prefix into a free slot."""
        ...

    def generate(self, steps: int | None = None) -> StepOutput:
        """Advances every active slot up to `steps` tokens (default `config.decode_steps`) in one dispatch."""
        ...

    def release(self, slot: int) -> None:
        """Ends a slot: its pages are cached and given back, its reservation returned."""
        ...

    def reset(self) -> None:
        """All slots free and an empty KV pool (after a failed dispatch, or at start-up)."""
        ...
