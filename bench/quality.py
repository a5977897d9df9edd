"""Quality of a weight (or KV) format against the engine in float32: perplexity on a corpus the repo ships, where the
teacher-forced argmax agrees, how far the logits move, and whether greedy generations stay the same.

Users of other engines report int8 / fp8 formats silently ruining accuracy; these figures are the gate (see
tests/test_quality.py) and the README's quality table. The corpus (`data/quality_corpus.txt`) is public-domain prose
(Lincoln, the US founding documents, Austen, Carroll, Dickens, Melville), short Python and C programs written for
this repo, and two paragraphs of plain explanation: ~2,900 tokens of SmolLM2's vocabulary.

Perplexity is read in windows of `window` tokens every `stride` tokens; each window scores only the tokens the
previous one did not, so every scored token sees at least `window - stride` tokens of context (the first window's
all of its own).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from engine.engine import Engine
from engine.sampling import SamplingParams

CORPUS = Path(__file__).parent / "data" / "quality_corpus.txt"

# Prompts whose greedy continuations are compared (chat turns, as the parity tests use).
GREEDY_CHATS: dict[str, list[dict[str, str]]] = {
    "fact": [{"role": "user", "content": "What is the capital of France, and why is it famous?"}],
    "code": [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    "explain": [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}],
    "list": [{"role": "user", "content": "Name five animals that live in the ocean."}],
}


FORMATS: dict[str, dict[str, str]] = {
    "int8 weights": {"quantize": "int8"},
    "int8 KV": {"kv_dtype": "int8"},
    "int8 weights + KV": {"quantize": "int8", "kv_dtype": "int8"},
}
"""The formats measured against the reference: EngineConfig fields each one changes."""


@dataclasses.dataclass(frozen=True)
class Quality:
    """One format's figures against the reference (the first engine given)."""

    name: str
    perplexity: float
    """exp(mean negative log-likelihood) of the corpus."""
    scored_tokens: int
    top1_agreement: float
    """Fraction of corpus positions whose argmax equals the reference's (1.0 for the reference)."""
    max_logit_error: float
    """Largest |logit - reference logit| over every position and vocabulary entry."""
    mean_logit_error: float
    """Mean |logit - reference logit|."""
    greedy_same: int
    """Prompts whose greedy continuation equals the reference's token for token."""
    greedy_prompts: int
    greedy_first_divergence: tuple[int, ...]
    """Per prompt, the index of the first new token that differs from the reference's (-1 where none does)."""

    def perplexity_ratio(self, reference: Quality) -> float:
        return self.perplexity / reference.perplexity


def corpus_ids(tokenizer, text: str | None = None) -> list[int]:
    """The corpus (or `text`) as token ids, without special tokens."""
    return tokenizer.encode(CORPUS.read_text() if text is None else text, add_special_tokens=False)


def _forward(engine: Engine):
    """The engine's model, all positions' logits of one row: tokens [1, T] -> [T, V] float32 (no KV pool)."""

    def run(params, tokens):
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        return engine.model.apply({"params": params}, tokens, positions)[0][0]

    return jax.jit(run)


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored index inside the window) of each window over n tokens."""
    out, start, scored_to = [], 0, 0
    while scored_to < n - 1:
        end = min(start + window, n)
        out.append((start, end, max(scored_to - start, 0)))
        scored_to = end - 1
        start += stride
    return out


def _greedy(engine: Engine, ids: Sequence[int], new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens after `ids` (EOS ignored), one request in slot 0."""
    prefix = engine.prefill(list(ids), SamplingParams(max_tokens=new_tokens, ignore_eos=True), 0)
    engine.insert(prefix, 0)
    got = [prefix.token]
    while engine.slot_active(0):
        out = engine.generate()
        got += out.tokens[out.valid[:, 0], 0].tolist()
    engine.release(0)
    return got


def evaluate(
    engines: Mapping[str, Engine],
    tokenizer,
    *,
    window: int = 512,
    stride: int = 256,
    greedy_tokens: int = 32,
    text: str | None = None,
) -> list[Quality]:
    """Figures for each engine against the first (the reference), on the corpus (or `text`)."""
    names = list(engines)
    ids = np.asarray(corpus_ids(tokenizer, text), np.int32)
    forwards = {name: _forward(e) for name, e in engines.items()}
    nll = dict.fromkeys(names, 0.0)
    agree = dict.fromkeys(names, 0)
    max_err = dict.fromkeys(names, 0.0)
    sum_err = dict.fromkeys(names, 0.0)
    scored = 0
    for start, end, first in _windows(len(ids), window, stride):
        targets = ids[start + 1 + first : end]
        logits = {}
        for name in names:
            out = np.asarray(forwards[name](engines[name].params, ids[None, start:end]))[first : end - start - 1]
            logits[name] = out
            logp = out - _logsumexp(out)
            nll[name] -= float(logp[np.arange(len(targets)), targets].sum())
        ref = logits[names[0]]
        for name in names:
            diff = np.abs(logits[name] - ref)
            agree[name] += int((logits[name].argmax(-1) == ref.argmax(-1)).sum())
            max_err[name] = max(max_err[name], float(diff.max()))
            sum_err[name] += float(diff.mean()) * len(targets)
        scored += len(targets)

    prompts = [tokenizer.encode_chat(chat) for chat in GREEDY_CHATS.values()]
    greedy = {name: [_greedy(e, p, greedy_tokens) for p in prompts] for name, e in engines.items()}
    out = []
    for name in names:
        divergence = tuple(
            next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), -1)
            for got, ref in zip(greedy[name], greedy[names[0]], strict=True)
        )
        out.append(
            Quality(
                name=name,
                perplexity=math.exp(nll[name] / scored),
                scored_tokens=scored,
                top1_agreement=agree[name] / scored,
                max_logit_error=max_err[name],
                mean_logit_error=sum_err[name] / scored,
                greedy_same=sum(d == -1 for d in divergence),
                greedy_prompts=len(prompts),
                greedy_first_divergence=divergence,
            )
        )
    return out


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def table(results: Sequence[Quality]) -> str:
    """A markdown table of the figures, the first row the reference."""
    ref = results[0]
    rows = [
        "| format | perplexity | vs reference | top-1 agreement | max / mean logit error | greedy same |",
        "|---|---|---|---|---|---|",
    ]
    for q in results:
        rows.append(
            f"| {q.name} | {q.perplexity:.3f} | {100 * (q.perplexity_ratio(ref) - 1):+.2f}% | "
            f"{100 * q.top1_agreement:.1f}% | {q.max_logit_error:.3f} / {q.mean_logit_error:.4f} | "
            f"{q.greedy_same}/{q.greedy_prompts} |"
        )
    return "\n".join(rows)
