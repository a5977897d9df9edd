"""Prompt sets: the standard W1-W3 workloads, a JSONL file, or random token prompts of given lengths.

A `Prompt` is one of a chat (rendered with the model's chat template), plain text, or token ids, plus how many tokens
to generate. Every benchmark encodes prompts once with `encode` and hands the same token ids to every system it
compares (meshserve, the HF baseline, the server), so prompt handling never differs between them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

W1_COUNT = 1
W2_COUNT = 64
OUTPUT_TOKENS = 128
"""Every standard workload generates exactly this many tokens per prompt (greedy, EOS ignored)."""


def story_prompt(i: int) -> str:
    """The standard prompt text of shared/PERFORMANCE.md."""
    return f"Write a short story about a robot number {i}."


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: exactly one of `messages`, `text` or `token_ids`."""

    id: str
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    max_tokens: int = OUTPUT_TOKENS

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.messages, self.text, self.token_ids)) != 1:
            raise ValueError(f"prompt {self.id!r}: give exactly one of messages, text or token_ids")
        if self.max_tokens < 1:
            raise ValueError(f"prompt {self.id!r}: max_tokens must be >= 1, got {self.max_tokens}")


def chat_prompts(count: int, max_tokens: int = OUTPUT_TOKENS) -> list[Prompt]:
    """The standard chat prompts i = 0 .. count - 1 (W1 is count 1, W2 and W3 count 64)."""
    return [
        Prompt(f"robot-{i}", messages=({"role": "user", "content": story_prompt(i)},), max_tokens=max_tokens)
        for i in range(count)
    ]


def workload(name: str, max_tokens: int = OUTPUT_TOKENS) -> list[Prompt]:
    """The named standard set: "w1" (one prompt), "w2" or "w3" (64 prompts)."""
    counts = {"w1": W1_COUNT, "w2": W2_COUNT, "w3": W2_COUNT}
    if name.lower() not in counts:
        serving = " (w4 and w5 run under `benchmark.py serve`)" if name.lower() in ("w4", "w5") else ""
        raise ValueError(f"unknown workload {name!r}; choose one of w1, w2, w3{serving}")
    return chat_prompts(counts[name.lower()], max_tokens)


def random_token_prompts(
    lengths: Sequence[int], vocab_size: int, *, count: int = 1, seed: int = 0, max_tokens: int = OUTPUT_TOKENS
) -> list[Prompt]:
    """`count` prompts per length of uniformly random token ids in [2, vocab_size) (ids 0 and 1 are often BOS/EOS)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for length in lengths:
        if length < 1:
            raise ValueError(f"prompt lengths must be >= 1, got {length}")
        for j in range(count):
            ids = rng.integers(min(2, vocab_size - 1), vocab_size, size=length)
            prompts.append(Prompt(f"random-{length}-{j}", token_ids=tuple(int(t) for t in ids), max_tokens=max_tokens))
    return prompts


def jsonl_prompts(path: str, max_tokens: int = OUTPUT_TOKENS) -> list[Prompt]:
    """Prompts from a JSONL file: one object per line with "messages", "prompt" (a user message) or "text" (raw
    text), or "token_ids"; optional "id" and "max_tokens". ValueError names the line of a bad entry."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n} is not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n} must be a JSON object")
            prompts.append(_from_json(obj, str(obj.get("id", len(prompts))), max_tokens, f"{path}:{n}"))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _from_json(obj: dict[str, Any], prompt_id: str, max_tokens: int, where: str) -> Prompt:
    tokens = int(obj.get("max_tokens", max_tokens))
    try:
        if "messages" in obj:
            return Prompt(prompt_id, messages=tuple(dict(m) for m in obj["messages"]), max_tokens=tokens)
        if "prompt" in obj:
            return Prompt(prompt_id, messages=({"role": "user", "content": obj["prompt"]},), max_tokens=tokens)
        if "text" in obj:
            return Prompt(prompt_id, text=obj["text"], max_tokens=tokens)
        if "token_ids" in obj:
            return Prompt(prompt_id, token_ids=tuple(int(t) for t in obj["token_ids"]), max_tokens=tokens)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    raise ValueError(f"{where}: needs one of messages, prompt, text or token_ids")


def encode(prompt: Prompt, tokenizer: Any) -> list[int]:
    """The prompt's token ids: the chat template applied to messages, BOS handled as the server does for text."""
    if prompt.token_ids is not None:
        return list(prompt.token_ids)
    if prompt.messages is not None:
        return tokenizer.encode_chat(list(prompt.messages))
    return tokenizer.encode(prompt.text)
