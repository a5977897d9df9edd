"""Streaming text for generated tokens: ids -> text deltas, and stop strings cut out of a stream of deltas.

The scheduler produces token ids one step at a time and the gRPC service streams text. Between them sit two small
state machines, one per request: `IncrementalDetokenizer` turns newly generated ids into the exact text they add
(never half a UTF-8 character), and `StopStringMatcher` decides how much of that text may be sent now without
leaking the beginning of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Decoded bytes that are not (yet) valid UTF-8 show up as the replacement character.
_REPLACEMENT = "\ufffd"
# Tokens of prompt context decoded ahead of the first generated token, so its leading space comes out right for
# decoders that treat the start of a sequence specially. A handful is enough: only the boundary matters.
_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one call per batch of new ids.

    Keeps a prefix/read offset pair into a small window of recent ids (as vLLM and TGI do): each call decodes only
    the window, text is emitted only once it no longer ends in an incomplete UTF-8 sequence, and for byte-level
    tokenizers the concatenation of all deltas and `flush()` equals `tokenizer.decode(generated_ids)` exactly.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = False,
    ):
        """`prompt_ids`, when given, supplies a few tokens of left context; their text is never emitted."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = [int(i) for i in (prompt_ids or ())][-_CONTEXT_TOKENS:]
        if context and self._decode(context).endswith(_REPLACEMENT):
            # A prompt ending mid-character would glue its dangling bytes onto the first generated token.
            context = []
        # Window of ids: [0, _read) is text already emitted (or context), [_prefix, _read) is re-decoded each call
        # so the boundary between old and new text decodes the same way it will in the full sequence.
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append newly generated ids; return the text they complete (possibly empty while a character is split)."""
        self._ids.extend(int(i) for i in token_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text) :]
        # Drop ids that no later decode needs, keeping the window (and so each call's cost) small.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return delta

    def flush(self) -> str:
        """Return any held-back text (including a trailing U+FFFD for bytes that never completed)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        delta = new_text[len(prefix_text) :]
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return delta


class StopStringMatcher:
    """Cuts a stream of text deltas just before the first stop string, without ever emitting part of one.

    The stop is the one whose last character arrives first (ties: the one starting earliest), so the result does
    not depend on how the text is split into deltas. Text that might still grow into a stop string is held back
    until it cannot, or until `flush()`.
    """

    def __init__(self, stop_strings: Sequence[str]):
        """Raises ValueError on an empty stop string (it would match before any text)."""
        if any(not s for s in stop_strings):
            raise ValueError("Stop strings must be non-empty.")
        self._stops = tuple(dict.fromkeys(stop_strings))
        self._held = ""
        self.stopped = False
        """Whether a stop string has been hit; afterwards every call returns empty text."""
        self.matched: str | None = None
        """The stop string that was hit, if any."""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Take the next delta; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        if best is not None:
            self.stopped, self.matched, self._held = True, best[2], ""
            return text[: best[1]], True
        held = self._partial_suffix_len(text)
        self._held = text[len(text) - held :] if held else ""
        return text[: len(text) - held], False

    def _partial_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = min(len(text), max(len(s) for s in self._stops) - 1)
        for k in range(longest, 0, -1):
            suffix = text[-k:]
            if any(s.startswith(suffix) for s in self._stops):
                return k
        return 0

    def flush(self) -> str:
        """Release held text at the end of a generation that did not stop on a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
