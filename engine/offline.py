"""Offline batch generation: a list of prompts through the continuous-batching scheduler, no server.

Each item is a text prompt, a chat (list of role/content messages) or token ids, with its own sampling settings.
A bad item (unknown chat role, prompt too long, invalid sampling value) is reported in its own result and the others
still run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from engine.sampling import SamplingParams
from engine.scheduler import FINISH_ERROR, Request, RequestOutput, Scheduler


@dataclasses.dataclass(frozen=True)
class OfflineItem:
    """One prompt of a batch job: exactly one of `prompt`, `messages`, `token_ids`."""

    id: str
    params: SamplingParams
    prompt: str | None = None
    messages: Sequence[dict[str, str]] | None = None
    token_ids: Sequence[int] | None = None


@dataclasses.dataclass
class OfflineResult:
    """What one item produced (one output JSONL line)."""

    id: str
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    logprobs: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["logprobs"] is None:
            del out["logprobs"]
        return out


def encode_item(item: OfflineItem, tokenizer: Any) -> list[int]:
    """The item's prompt token ids (chat template applied to messages); ValueError on bad input."""
    given = [x is not None for x in (item.prompt, item.messages, item.token_ids)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    if item.token_ids is not None:
        return [int(t) for t in item.token_ids]
    if item.messages is not None:
        return tokenizer.encode_chat(list(item.messages))
    return tokenizer.encode(item.prompt)


def run_offline(
    scheduler: Scheduler,
    items: Sequence[OfflineItem],
    *,
    on_done: Callable[[OfflineResult], None] | None = None,
) -> list[OfflineResult]:
    """Generates every item with continuous batching; results come back in input order."""
    results = {item.id: OfflineResult(item.id) for item in items}
    if len(results) != len(items):
        raise ValueError("item ids must be unique")
    start = time.monotonic()

    def sink_for(result: OfflineResult) -> Callable[[RequestOutput], None]:
        def sink(out: RequestOutput) -> None:
            result.token_ids.extend(out.token_ids)
            result.text += out.text
            if out.logprobs is not None:
                result.logprobs = (result.logprobs or []) + [
                    {"logprob": lp.logprob, "top": [list(t) for t in lp.top]} for lp in out.logprobs
                ]
            if out.finished:
                result.finish_reason = out.finish_reason
                result.error = out.error
                result.prompt_tokens = out.prompt_tokens
                result.completion_tokens = out.completion_tokens
                result.ttft_s = out.ttft
                result.latency_s = time.monotonic() - start
                if on_done is not None:
                    on_done(result)

        return sink

    for item in items:
        result = results[item.id]
        try:
            tokens = encode_item(item, scheduler.tokenizer)
            result.prompt_tokens = len(tokens)
            scheduler.submit(Request(item.id, tokens, item.params, sink_for(result)))
        except ValueError as exc:
            result.finish_reason = FINISH_ERROR
            result.error = str(exc)
            if on_done is not None:
                on_done(result)
    scheduler.run_until_idle()
    return [results[item.id] for item in items]
