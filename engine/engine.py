"""The engine: the weights, a paged KV memory shared by fixed-shape slots, and the steps that run on them.

- `prefill_batch(prompts)` runs prompts packed side by side (a few per call, padded to a bucket),
  writes their K/V straight into pages of the pool and samples each one's first token. A prompt whose opening is
  already cached (an earlier turn of the same chat, a shared system prompt) reuses those pages and computes only the
  rest; a prompt longer than `max_prefill_len` is computed in chunks, and with a token budget the caller can spread
  the chunks over several steps (`Prefix.done`).
- `insert(prefix, slot)` arms a slot with a prefilled prompt: its page table row and its sampling knobs.
- `generate(steps)` advances every slot up to `decode_steps` tokens in one dispatch (a loop on device whose trip
  count is an argument), empty and finished slots masked, and copies the tokens back to the host once.
- `release(slot)` ends a slot: its pages are indexed by their tokens (prompt and completion) and stay cached until
  the memory is needed.

KV memory (engine.attention, engine.kv): per layer one pool of `kv_pages` pages of `page_size` positions; a slot holds
a row of a page table, which the host owns and passes to each dispatch. Admission reserves the pages a request can
ever need (prompt + max_tokens, less the cached pages it shares), so decode never runs dry: a request that does not
fit waits in the queue, and one that could never fit is refused with the limit named. Decode attends over the first
`window` pages of each table row (window from 1, 2, 3, 4, 6, 8, ... covering the longest active sequence), one
compiled shape per window.

Every shape is compiled ahead of time by `warmup()`; afterwards nothing compiles, whatever requests come and go.

This module is the facade and the host's bookkeeping; the rest of the engine is in rooms of its own:
- engine.api: EngineConfig, Prefix, StepOutput, and `EngineLike`, what the scheduler uses of an engine;
- engine.placement: sharding rules, the memory budget and pool size, state shardings, the kernel choice;
- engine.steps: the device steps, pure functions over the `DecodeState` pytree;
- engine.compile: the AOT table of shapes, lowering, the compiled-executable cache, warm-up;
- engine.prefill: prompt packing and one packed call's arrays;
- engine.mock_engine: an EngineLike without a model, for scheduler tests.
Here: `HostBook`, the slots and pages as the host sees them (shared with the mock engine), and `Engine`, which
builds the model and runs the device steps on the same pages.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from engine import kernels, placement, prefill
from engine.api import (
    ADMISSION_CHOICES,
    ATTENTION_CHOICES,
    LINEAR_CHOICES,
    MAX_PREFILL_SEGMENTS,
    CapacityError,
    EngineConfig,
    Prefix,
    PrefixCacheStats,
    StepOutput,
    TokenLogprobs,
    default_dtype,
)
from engine.attention import SINK_PAGE
from engine.compile import HOST_COPY_PAGES, StepCompiler
from engine.config import ModelConfig
from engine.host_memory import to_huge_pages
from engine.kv import Match, PagePool
from engine.kv.host import HostTier
from engine.model import Packed, Transformer, abstract_params, one_token_products, runtime_head, runtime_layer
from engine.placement import MIN_KERNEL_LINEAR_SLOTS, MIN_PALLAS_GPU_SLOTS, MemoryBudget, device_memory_bytes
from engine.prefill import MIN_PREFILL_ROWS, MIN_SHARED_TOKENS, PREFILL_TOKENS_PER_ROW
from engine.sampling import SamplingParams
from engine.steps import DecodeState, DevicePrefix
from sharding.rules import MeshAxes, ShardingReport, logical_to_spec, single_device_mesh, tree_shardings

__all__ = [  # the engine's names as they were before the split into rooms, for the code that imports them from here
    "ADMISSION_CHOICES",
    "ATTENTION_CHOICES",
    "HOST_COPY_PAGES",
    "LINEAR_CHOICES",
    "MAX_PREFILL_SEGMENTS",
    "MIN_KERNEL_LINEAR_SLOTS",
    "MIN_PALLAS_GPU_SLOTS",
    "MIN_PREFILL_ROWS",
    "MIN_SHARED_TOKENS",
    "PREFILL_TOKENS_PER_ROW",
    "CapacityError",
    "DecodeState",
    "DevicePrefix",
    "Engine",
    "EngineConfig",
    "HostBook",
    "MemoryBudget",
    "Prefix",
    "PrefixCacheStats",
    "StepOutput",
    "TokenLogprobs",
    "default_dtype",
    "device_memory_bytes",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Slot:
    """The host's view of one slot: its pages, what it has reserved, and the tokens whose K/V its pages hold."""

    pages: list[int]
    reserved: int
    tokens: list[int]
    length: int  # tokens in the cache (the last sampled token is not yet)
    max_pages: int  # pages the request can ever need (prompt + max_tokens)


class HostBook:
    """The host's bookkeeping of slots and KV pages, in plain Python: the page pool (free / held / cached pages,
    reservations, the prefix index), the pages each prompt takes on its way into a slot (including its cached
    opening, from either tier), each slot's pages and the tokens they hold, and what the device last reported.

    `Engine` adds the device steps that fill and read the same pages; `MockEngine` (engine.mock_engine) adds tokens
    one can compute by hand, so both admit, grow, preempt and cache pages alike."""

    def __init__(self, model_config: ModelConfig, config: EngineConfig) -> None:
        self.model_config = model_config
        self.config = config
        self.host: HostTier | None = None
        self.prefix_stats = PrefixCacheStats()
        self._restores: list[tuple[list[int], tuple[np.ndarray, ...]]] = []  # (pages, HostTier.read's) to the device
        self._slots: list[_Slot | None] = [None] * config.num_slots
        self._host_lengths = np.zeros(config.num_slots, np.int64)
        self._host_active = np.zeros(config.num_slots, bool)
        self.last_window = 0

    def _new_book(self, kv_pages: int) -> None:
        """All slots free and a new pool of `kv_pages` pages (its counters carry on: they are since start-up)."""
        self._host_lengths[:] = 0
        self._host_active[:] = False
        self._slots = [None] * self.config.num_slots
        stats = self.pool.stats if hasattr(self, "pool") else None
        self.pool = PagePool(kv_pages, self.config.page_size, index=self.config.prefix_caching)
        if stats is not None:
            self.pool.stats = stats  # counters are since start-up
        if self.host is not None:
            self.pool.spilled = []
        self._restores = []

    # ----- admission --------------------------------------------------------------------------------------------

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

    def pages_released_by(self, slot: int) -> int:
        """Pages that releasing `slot` would make available to new reservations (its unused reservation and the
        pages no other sequence shares)."""
        s = self._slots[slot]
        return 0 if s is None else s.reserved + sum(self.pool.refs[p] == 1 for p in s.pages)

    def can_admit(self, pages: int) -> bool:
        """Whether a request reserving `pages` fits the KV memory now (free + evictable pages, less reservations)."""
        return pages <= self.pool.available()

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

    # ----- a prompt's pages -------------------------------------------------------------------------------------

    def _peek(self, p: Prefix) -> Match:
        """What the prefix index holds of a prompt (the last token is always computed: its logits pick the first)."""
        return self.pool.match(p.tokens.tolist(), limit=p.length - 1)

    def _attach(self, p: Prefix, sharers: dict[int, int]) -> None:
        """Takes a prompt's cached opening: matching full pages shared as they are (each one less to allocate), then
        a partly matching page taken over when it is a partly filled page nobody holds and no other prompt of this
        call wants (`PagePool.adoptable`), else copied into a page of the prompt's own (copy-on-write).
        `sharers`: prompts of this call per partial page."""
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
                arrays = self.host.read(keys)
                pages = [self.pool.allocate(reserved=True) for _ in keys]
                p.reserved -= len(keys)
                p.pages += pages
                self._restores.append((pages, arrays))
                p.host_cached = found.tokens(size)
                copy, cached = None, len(match.pages) * size + p.host_cached
                self.host.stats.hit_tokens += p.host_cached
                self.prefix_stats.host_hit_tokens += p.host_cached
                self._index(p.tokens[:cached], p.pages)  # later prompts of this call find them on the device
        if copy is not None and self.pool.adoptable(copy) and sharers.get(copy, 0) <= 1:
            # an evictable partial page (typically the end of this conversation's previous turn) becomes this
            # prompt's: one page less to allocate and no copy
            self.pool.adopt(copy)
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

    def _grow(self, p: Prefix, end: int) -> None:
        """Allocates (from its reservation) the pages a prefix needs to hold `end` positions."""
        while len(p.pages) * self.config.page_size < end:
            p.pages.append(self.pool.allocate(reserved=True))
            p.reserved -= 1

    def _computed(self, p: Prefix, n: int) -> None:
        """Records that the device computed (or was handed, by a dispatched copy) `n` more positions of a prefix:
        the page it copied from may go, and its pages are indexed (later prompts find them)."""
        if p.copy_from is not None:  # the copy is dispatched: its source may go
            self.pool.release(p.copy_from)
            p.copy_from = None
        p.computed += n
        self._index(p.tokens[: p.computed], p.pages)

    def _first_token(self, p: Prefix, first: int, logprobs: TokenLogprobs | None) -> None:
        """A done prompt's first token; a prompt that ends there (a stop id, or max_tokens == 1) gives its pages
        back at once."""
        p.token, p.logprobs = first, logprobs
        p.finished = first in p.params.stop_ids(self.model_config.eos_token_ids) or p.params.max_tokens == 1
        if p.finished:
            self.discard(p)

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

    def _index(self, tokens: np.ndarray, pages: Sequence[int]) -> None:
        n = -(-len(tokens) // self.config.page_size)
        if n:
            self.pool.insert(tokens.tolist(), pages[:n])

    def clear_prefix_cache(self) -> None:
        """Forgets every cached prefix, in both tiers (the next prompts are computed in full)."""
        self.pool.clear_index()
        self.pool.take_spilled()
        if self.host is not None:
            self.host.clear()

    # ----- slots ------------------------------------------------------------------------------------------------

    def _check_insert(self, prefix: Prefix, slot: int) -> None:
        if not 0 <= slot < self.config.num_slots:
            raise IndexError(f"slot {slot} outside [0, {self.config.num_slots})")
        if self._slots[slot] is not None:
            raise ValueError(f"slot {slot} is in use; release it first")
        if not prefix.done or prefix.finished or prefix.released:
            raise ValueError("only a prefix that is done, not finished and not discarded can be inserted")

    def _seat(self, prefix: Prefix, slot: int) -> None:
        """`slot` takes over a prefix's pages and the rest of its reservation."""
        prefix.released = True  # the slot holds the pages now
        most = self.pool.pages_for(prefix.length + prefix.params.max_tokens)
        self._slots[slot] = _Slot(
            prefix.pages, prefix.reserved, [*prefix.tokens.tolist(), prefix.token], prefix.length, most
        )
        self._host_lengths[slot] = prefix.length
        self._host_active[slot] = True

    def _unseat(self, slot: int) -> None:
        """Frees `slot`: its pages are indexed by the tokens they hold and given back, its reservation returned."""
        s = self._slots[slot]
        self._slots[slot] = None
        self._host_active[slot] = False
        self._host_lengths[slot] = 0
        self._index(np.asarray(s.tokens[: s.length], np.int32), s.pages)
        for page in s.pages:
            self.pool.release(page)
        self.pool.unreserve(s.reserved)

    def _dispatch_steps(self, steps: int | None) -> int:
        steps = self.config.decode_steps if steps is None else steps
        if not 1 <= steps <= self.config.decode_steps:
            raise ValueError(f"steps must be in [1, {self.config.decode_steps}] (decode_steps), got {steps}")
        return steps

    def window_for(self, longest: int, steps: int | None = None) -> int:
        """Pages the decode attention must cover for sequences up to `longest` tokens through one dispatch."""
        need = longest + (steps or self.config.decode_steps)
        for w in self.config.windows:
            if need <= w * self.config.page_size:
                return w
        return self.config.num_pages

    def _grow_slots(self, steps: int) -> None:
        """Pages for every position a dispatch of `steps` may write, within what each request can ever need: from
        its reservation first, then (admission 'grow') from the pool, which the scheduler made sure can give them."""
        p = self.config.page_size
        for s in self._slots:
            if s is None:
                continue
            need = min(-(-(s.length + steps) // p), s.max_pages)
            while len(s.pages) < need:
                s.pages.append(self.pool.allocate(reserved=s.reserved > 0))
                s.reserved -= s.reserved > 0

    def _decoded(self, tokens: np.ndarray, valid: np.ndarray, active: np.ndarray) -> None:
        """Takes in a dispatch's tokens [steps, B] (where `valid`) and which slots still generate after it."""
        for b, s in enumerate(self._slots):
            if s is not None and self._host_active[b]:
                new = tokens[valid[:, b], b].tolist()
                s.tokens.extend(new)
                s.length += len(new)
        self._host_lengths += valid.sum(axis=0)
        self._host_active = np.array(active) & np.array([s is not None for s in self._slots])

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


class Engine(HostBook):
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
        super().__init__(c, config)
        self.dtype = jnp.dtype(config.dtype)
        self.mesh = mesh or single_device_mesh()
        self.rules, self.sharding_notes = placement.resolve_engine_rules(c, self.dtype, self.mesh, rules, config)
        self.attention = placement.choose_attention(c, config, self.dtype, self.mesh, self.rules)
        # q, k and v as one product wherever no mesh axis splits heads (see fuse_qkv_layer)
        self.fuse_qkv = all(logical_to_spec((a,), self.rules, self.mesh)[0] is None for a in ("q_heads", "kv_heads"))
        self.linear = placement.choose_linear(c, config, self.dtype, self.mesh)
        if "kernel" in (self.attention, self.linear):
            kernels.set_spin_micros(config.kernel_spin_us)

        # The model: constructed here and nowhere else; the kernels chosen above plug into it (None: XLA's ops).
        packed = None
        self.kernel_prefetch: dict | None = None
        """Whether the kernels' one-token products (every product of a one-slot decode step; the head of a prefill
        of one prompt) prefetch their weights: kernels.one_token_prefetch's answer for this model and weight format
        on this machine. None with XLA's products."""
        if self.linear == "kernel":
            int8 = config.quantize == "int8"
            rows = kernels.INT8_PANEL_ROWS if int8 else kernels.PANEL_ROWS
            self.kernel_prefetch = kernels.one_token_prefetch(one_token_products(c, rows), int8=int8)
            product = kernels.packed_int8_product if int8 else kernels.linear
            packed = Packed(rows, functools.partial(product, prefetch=self.kernel_prefetch["prefetch"]), int8=int8)
        attend = prefill_attend = None
        if self.attention == "kernel":
            attend = placement.kernel_attend(self.mesh, self.rules)
            prefill_attend = placement.kernel_prefill_attend(self.mesh, self.rules)
        elif self.attention == "pallas":
            attend = placement.pallas_attend(self.mesh, self.rules)
        self.model = Transformer(
            c,
            self.dtype,
            attend,
            fuse_qkv=self.fuse_qkv,
            packed=packed,
            prefill_attend=prefill_attend,
            quantize=config.quantize,
            kv_dtype=config.kv_dtype,
        )

        self.budget = placement.memory_budget(c, config, self.dtype, self.mesh, self.rules)
        log.info("%s", self.budget.describe())
        placement.check_fits(self.budget, config, self.mesh, self.rules)
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

        abstract, logical = abstract_params(
            c, self.dtype, fuse_qkv=self.fuse_qkv, packed=packed, quantize=config.quantize
        )
        self.param_shardings = tree_shardings(logical, self.rules, self.mesh, abstract)
        # one layer at a time: the extra memory is one layer's weights
        prepare = jax.jit(
            functools.partial(runtime_layer, config=c, fuse_qkv=self.fuse_qkv, packed=packed, quantize=config.quantize)
        )
        head = jax.jit(functools.partial(runtime_head, config=c, packed=packed, quantize=config.quantize))
        given = params
        params = {
            **head({k: v for k, v in params.items() if not k.startswith("layer_")}),
            **{k: prepare(v) for k, v in params.items() if k.startswith("layer_")},
        }
        self.params = jax.device_put(params, self.param_shardings)
        if config.huge_pages:
            self.params = to_huge_pages(self.params, keep=given)
        self.compiler = StepCompiler(
            self.model,
            config,
            self.dtype,
            self.mesh,
            self.rules,
            self.budget.kv_pages,
            self.params,
            host_tier=self.host is not None,
        )
        self.state_shardings = self.compiler.state_shardings
        log.info("%s", self.describe_sharding().describe())
        self._state: DecodeState | None = None
        self.reset()

    # ----- placement --------------------------------------------------------------------------------------------

    resolve_rules = staticmethod(placement.resolve_engine_rules)
    checkpoint_target = staticmethod(placement.checkpoint_target)
    unstack_params = staticmethod(placement.unstack_params)

    def describe_sharding(self) -> ShardingReport:
        """The mesh, the rule table in effect, and weight / KV pool bytes held by each device."""
        return placement.sharding_report(
            self.mesh, self.rules, self.sharding_notes, self.params, self.compiler.state_abstract
        )

    # ----- state and compiled steps -----------------------------------------------------------------------------

    def reset(self) -> None:
        """An empty KV pool and all slots free, allocated directly in their shardings; the host bookkeeping (page
        tables, reservations, the prefix index) starts over with it."""
        self._new_book(self.budget.kv_pages)
        self._state = None  # the old pools go before the new ones are allocated
        self._state = self._compile("init", 0)()

    @property
    def state(self) -> DecodeState:
        """The device state (KV pools and per-slot rows); read-only for callers (tests, metrics)."""
        return self._state

    def _compile(self, kind: str, size: int):
        """The compiled executable for one shape (compiled now if warm-up did not); every dispatch goes through
        here."""
        return self.compiler.get(kind, size)

    def warmup(self, max_workers: int | None = None) -> float:
        """Compiles every prefill bucket, the insert of each bucket's rows, every decode window and the release
        step; returns seconds taken. Shapes compile in parallel threads (XLA compiles outside the GIL), one per core
        by default."""
        return self.compiler.warmup(max_workers)

    @property
    def shapes(self) -> list[tuple[str, int]]:
        """Every (step, size) the engine runs: warm-up compiles exactly these."""
        return self.compiler.shapes

    @property
    def compiled_shapes(self) -> list[tuple[str, int]]:
        return sorted(self.compiler.compiled)

    # ----- prefill ----------------------------------------------------------------------------------------------

    def bucket_for(self, length: int) -> int:
        """The prefill bucket a call of `length` tokens runs in."""
        return prefill.bucket_for(self.config, length)

    def prefill_rows(self, bucket: int) -> int:
        """Prompts a prefill call of `bucket` tokens packs at most (see PREFILL_TOKENS_PER_ROW)."""
        return prefill.prefill_rows(self.config, bucket)

    def packs(self, lengths: Sequence[int]) -> list[list[int]]:
        """How prompts computing these many tokens are grouped into prefill calls (see engine.prefill.packs)."""
        return prefill.packs(self.config, lengths)

    def _prefill_cost(self, n: int, start: int) -> int:
        """What computing positions [start, start + n) costs, in tokens at no context (see prefill.prefill_cost)."""
        return prefill.prefill_cost(self.model_config, n, start)

    def _tokens_within(self, budget: int, start: int) -> int:
        """Most tokens from position `start` whose `_prefill_cost` fits `budget` (at least 1 when budget > 0)."""
        return prefill.tokens_within(self.model_config, budget, start)

    def prefill(self, tokens: Sequence[int], params: SamplingParams, seed: int) -> Prefix:
        """Runs one prompt and samples its first token (copied to the host: the caller streams it at once)."""
        return self.prefill_batch([(tokens, params, seed)])[0]

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

    def _compute(self, prefixes: list[Prefix], token_budget: int | None) -> None:
        """Runs prefill calls until every prefix is done or the budget is spent; samples the first token of each
        prompt that completes."""
        budget = token_budget
        launched = []
        todo = [i for i, p in enumerate(prefixes) if not p.done]
        while todo and (budget is None or budget > 0):
            ready, peeks = prefill.ready(todo, prefixes, self._peek, self.config.prefix_caching)
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
            pack = prefill.fit_context(pack, prefixes, self.config)
            launched.append(self._launch(pack, prefixes))
            if budget is not None:
                budget -= sum(self._prefill_cost(n, prefixes[i].computed - n) for i, n in pack)
            todo = [i for i in todo if not prefixes[i].done]
        for pack, bucket, device, lps in launched:
            finishing = [(row, i) for row, (i, _) in enumerate(pack) if prefixes[i].done]
            if not finishing:
                continue
            token, logprob, top_ids, top_vals = jax.device_get((device.token, *lps))
            for row, i in finishing:
                p = prefixes[i]
                logprobs = None
                if p.params.logprobs is not None:
                    n_top = p.params.logprobs
                    top = zip(top_ids[row, :n_top], top_vals[row, :n_top], strict=True)
                    logprobs = TokenLogprobs(float(logprob[row]), tuple((int(a), float(b)) for a, b in top))
                p.device, p.bucket, p.row = device, bucket, row
                self._first_token(p, int(token[row]), logprobs)

    def _launch(self, pack: list[tuple[int, int]], prefixes: list[Prefix]) -> tuple:
        """Dispatches one packed prefill of (prefix index, tokens to compute) rows and indexes what it computes;
        returns (pack, bucket, device prefix, logprob arrays) without waiting for the device."""
        bucket = self.bucket_for(sum(n for _, n in pack))
        for i, n in pack:
            self._grow(prefixes[i], prefixes[i].computed + n)
        arrays = prefill.pack_arrays(pack, prefixes, self.config, bucket, self.model_config.eos_token_ids)
        self._sync_host_tier()
        self._state, device, lps = self._compile("prefill", bucket)(self.params, self._state, *arrays)
        for i, n in pack:
            self._computed(prefixes[i], n)
        return pack, bucket, device, lps

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
            arrays = self._compile("spill", w)(self._state, pages)
            size = self.config.page_size
            self.host.add([(s.key, s.parent, s.tokens, len(s.tokens) == size) for s in part], arrays)
        for pages, arrays in self._restores:
            for i in range(0, len(pages), w):
                n = len(pages[i : i + w])
                dest = np.full((w,), SINK_PAGE, np.int32)
                dest[:n] = pages[i : i + w]
                padded = []
                for a in arrays:
                    aw = np.zeros((a.shape[0], w, *a.shape[2:]), a.dtype)
                    aw[:, :n] = a[:, i : i + n]
                    padded.append(aw)
                self._state = self._compile("restore", w)(self._state, dest, *padded)
        self._restores = []

    # ----- slots ------------------------------------------------------------------------------------------------

    def insert(self, prefix: Prefix, slot: int) -> None:
        """Places a prefilled prompt (done, not finished) into a free `slot`: the slot takes over its pages and the
        rest of its reservation."""
        self._check_insert(prefix, slot)
        key = ("insert", prefill.insert_bucket(self.config, prefix.bucket))
        self._state = self._compile(*key)(prefix.device, self._state, np.int32(slot), np.int32(prefix.row),
                                          np.int32(prefix.length))  # fmt: skip
        self._seat(prefix, slot)

    def release(self, slot: int) -> None:
        """Ends a slot (finished, cancelled, or stopped on the host by a stop string): its pages are indexed by the
        tokens they hold and given back (they stay cached until the memory is needed), its reservation returned."""
        if self._slots[slot] is None:
            return
        if self._host_active[slot]:
            self._state = self._compile("release", 0)(self._state, np.int32(slot))
        self._unseat(slot)

    def generate(self, steps: int | None = None) -> StepOutput:
        """Advances every active slot `steps` tokens (default and most: `decode_steps`); one dispatch and one copy
        back to the host. Any `steps` runs the same compiled program (the loop's trip count is an argument)."""
        steps = self._dispatch_steps(steps)
        longest = int(self._host_lengths[self._host_active].max(initial=0))
        window = self.last_window = self.window_for(longest, steps)
        self._grow_slots(steps)
        table = np.zeros((self.config.num_slots, window), np.int32)
        for b, s in enumerate(self._slots):
            if s is not None and self._host_active[b]:
                row = s.pages[:window]
                table[b, : len(row)] = row
        self._sync_host_tier()
        self._state, out = self._compile("generate", window)(self.params, self._state, table, np.int32(steps))
        tokens, valid, active, logprob, top_ids, top_vals = jax.device_get(out)
        self._decoded(tokens, valid, active)
        return StepOutput(tokens, valid, active, logprob, top_ids, top_vals)

    def kv_positions_read(self, lengths: np.ndarray, valid: np.ndarray, steps: int, window: int) -> int:
        """Cache positions (per layer, per kv head) one `generate` dispatch's attention read: every page of the window
        for every slot and step (XLA; a sliding-window layer only the ceil(sliding_window / P) + 1 pages that can
        hold its window, averaged over the layers), or each slot's positions up to its length (the kernel).
        lengths: per-slot lengths before the dispatch; valid: its StepOutput.valid; steps: the steps it ran."""
        p, c = self.config.page_size, self.model_config
        span = window * p
        if self.attention == "xla":
            if not c.sliding_layers:
                return steps * len(lengths) * span
            windowed = min(span, (-(-c.sliding_window // p) + 1) * p)
            sliding = len(c.sliding_layers)
            per_layer = ((c.num_layers - sliding) * span + sliding * windowed) / c.num_layers
            return int(steps * len(lengths) * per_layer)
        taken = np.cumsum(valid[:steps], axis=0) - valid[:steps]  # tokens each slot added before each step
        return int(np.minimum(np.asarray(lengths)[None, :] + taken + 1, span).sum())
