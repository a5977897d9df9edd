"""A mock engine: the scheduler's `EngineLike` with no model and no device, and tokens one can compute by hand.

A prompt's first token is (its last token + 1) % vocab_size, and each slot's next token is (its previous token + 1)
% vocab_size: a request for the prompt [..., x] produces x+1, x+2, x+3, ... (mod the vocabulary), so a request
preempted and resumed (its prompt plus what it generated) continues the same sequence. Stop ids (the request's and,
unless `ignore_eos`, the model's EOS) and max_tokens end a request as on the real engine: a stop id is the last
token produced. A `generate` dispatch advances every active slot `steps` tokens (default `decode_steps`). Every
token produced has log-probability 0 (it was certain), and the alternatives listed after it are the next ids at -inf.

Pages go through the real `engine.kv.PagePool` by the real engine's own bookkeeping (`engine.engine.HostBook`):
reservations, the prefix index (a finished request's pages stay cached; a prompt that starts the same way shares
them), growth under admission 'grow' and `pages_short`, so admission, preemption and the page accounting behave as
with the real engine. One difference: a prefill token budget counts plain tokens (the real engine counts a token at
a long context for more, engine.prefill.prefill_cost). As JetStream's mock_engine: the orchestration tested without
a model (tests/test_scheduler_mock.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.api import CapacityError, EngineConfig, Prefix, StepOutput, TokenLogprobs
from engine.config import tiny_config
from engine.engine import HostBook
from engine.sampling import MAX_LOGPROBS, SamplingParams

MOCK_CONFIG = EngineConfig(
    num_slots=4, max_seq_len=256, max_prefill_len=64, page_size=16, decode_steps=4, dtype="float32"
)
"""A small default: 4 slots of 16 pages of 16 positions, 4 tokens per dispatch."""


class MockEngine(HostBook):
    """An `EngineLike` without a model: the next token is the previous one + 1 (mod `vocab_size`)."""

    def __init__(
        self, config: EngineConfig = MOCK_CONFIG, *, vocab_size: int = 256, eos_token_ids: Sequence[int] = (1,)
    ) -> None:
        """`config.kv_pages` sizes the pool (None: every slot's full context, and the sink, as on CPU)."""
        model_config = tiny_config(
            vocab_size=vocab_size, eos_token_ids=tuple(eos_token_ids), max_position_embeddings=config.max_seq_len
        )
        super().__init__(model_config, config)
        self.kv_pages = config.kv_pages or config.num_slots * config.num_pages + 1
        if self.kv_pages - 1 < config.num_pages:
            raise CapacityError(
                f"the KV pool holds {self.kv_pages - 1} pages of {config.page_size} positions, fewer than one "
                f"full-context request needs ({config.num_pages} pages for max_seq_len={config.max_seq_len})"
            )
        self.prefill_log: list[int] = []
        """Prompt tokens computed by each `prefill_batch` call, in order."""
        self.dispatches = 0
        """`generate` calls so far."""
        self.reset()

    def reset(self) -> None:
        """All slots free and an empty pool (counters since start-up carry on)."""
        self._new_book(self.kv_pages)
        b = self.config.num_slots
        self._last = np.zeros(b, np.int64)  # each slot's last token: the next one is this + 1
        self._remaining = np.zeros(b, np.int64)  # tokens each slot may still produce
        self._stops: list[frozenset[int]] = [frozenset()] * b

    def _next(self, token: int) -> int:
        return (int(token) + 1) % self.model_config.vocab_size

    def _top(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        """The alternatives listed for a produced token: itself with log-probability 0 (it was certain), then the
        ids after it with -inf."""
        ids = (token + np.arange(MAX_LOGPROBS)) % self.model_config.vocab_size
        return ids.astype(np.int32), np.where(np.arange(MAX_LOGPROBS) == 0, 0.0, -np.inf).astype(np.float32)

    def _logprobs(self, params: SamplingParams, token: int) -> TokenLogprobs | None:
        if params.logprobs is None:
            return None
        ids, vals = self._top(token)
        return TokenLogprobs(0.0, tuple((int(a), float(b)) for a, b in zip(ids, vals, strict=True))[: params.logprobs])

    def prefill_batch(
        self, requests: Sequence[tuple[Sequence[int], SamplingParams, int] | Prefix], token_budget: int | None = None
    ) -> list[Prefix]:
        """Computes the prompts in order, at most `token_budget` tokens in all (None: every prompt whole); each
        prompt first takes what the prefix index holds of it. A prompt done gets its first token."""
        prefixes = [r if isinstance(r, Prefix) else self.open_prompt(*r) for r in requests]
        budget, total = token_budget, 0
        for p in prefixes:
            if p.done:
                continue
            if not p.attached:
                self._attach(p, {})
            n = p.length - p.computed
            if budget is not None:
                n = min(n, budget - total)
            if n <= 0:
                break
            self._grow(p, p.computed + n)
            self._computed(p, n)
            total += n
            if p.done:
                first = self._next(p.tokens[-1])
                self._first_token(p, first, self._logprobs(p.params, first))
        self.prefill_log.append(total)
        return prefixes

    def insert(self, prefix: Prefix, slot: int) -> None:
        """Places a done, not finished prompt into a free `slot`."""
        self._check_insert(prefix, slot)
        self._last[slot] = prefix.token
        self._remaining[slot] = prefix.params.max_tokens - 1
        self._stops[slot] = frozenset(prefix.params.stop_ids(self.model_config.eos_token_ids))
        self._seat(prefix, slot)

    def generate(self, steps: int | None = None) -> StepOutput:
        """Advances every active slot `steps` tokens (default and most: `decode_steps`), each the previous + 1."""
        steps = self._dispatch_steps(steps)
        longest = int(self._host_lengths[self._host_active].max(initial=0))
        self.last_window = self.window_for(longest, steps)
        self._grow_slots(steps)
        n, b = self.config.decode_steps, self.config.num_slots
        tokens, valid = np.zeros((n, b), np.int32), np.zeros((n, b), bool)
        top_ids, top_vals = np.zeros((n, b, MAX_LOGPROBS), np.int32), np.zeros((n, b, MAX_LOGPROBS), np.float32)
        active = self._host_active.copy()
        for i in range(steps):
            for slot in np.flatnonzero(active):
                token = self._next(self._last[slot])
                tokens[i, slot], valid[i, slot] = token, True
                top_ids[i, slot], top_vals[i, slot] = self._top(token)
                self._last[slot] = token
                self._remaining[slot] -= 1
                active[slot] = token not in self._stops[slot] and self._remaining[slot] > 0
        self._decoded(tokens, valid, active)
        self.dispatches += 1
        return StepOutput(tokens, valid, active.copy(), np.zeros((n, b), np.float32), top_ids, top_vals)

    def release(self, slot: int) -> None:
        """Ends a slot: its pages are cached and given back, its reservation returned."""
        if self._slots[slot] is not None:
            self._unseat(slot)
