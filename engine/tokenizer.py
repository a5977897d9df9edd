"""Text <-> token ids for the engine: one `Tokenizer` built from GGUF metadata, an HF folder, or our own saved copy.

The engine and the scheduler only ever see token ids; this room owns everything about how text becomes ids and back:
the byte-level BPE model, which pre-tokenizer split its merges were learned on, which tokens are special, whether a
BOS is prepended, and the chat template that turns a conversation into one prompt string.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: GPT-2, SmolLM, Llama-3, Qwen2) are built from
GGUF metadata; sentencepiece vocabularies are refused with a clear error rather than tokenized subtly wrong.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import gguf
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

logger = logging.getLogger(__name__)

ALLOWED_ROLES = ("system", "user", "assistant", "tool")
META_FILE = "meshserve_tokenizer.json"
TOKENIZER_FILE = "tokenizer.json"

# llama.cpp's token_type values (gguf.TokenType).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Split regexes of the byte-level families, as in their tokenizer.json files (and llama.cpp's llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "gpt-4o": _GPT4O_SPLIT,
    "llama4": _GPT4O_SPLIT,
}
# Llama-3's tokenizer.json (and llama.cpp) look a whole pre-token up in the vocabulary before merging.
_IGNORE_MERGES_PRE = frozenset({"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"})

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character a byte-level vocabulary spells it with."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer whose splits the merges of a `tokenizer.ggml.pre` family were learned on."""
    if pre == "smollm":
        # SmolLM2's own tokenizer.json: every digit is its own pre-token, then GPT-2's split.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    split = _SPLIT_BY_PRE.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in ("gpt-2", "gpt2", "default"):
        # Same fallback as transformers' GGUF loader; a wrong split only changes rare merges, so warn, don't fail.
        logger.warning("Unknown tokenizer.ggml.pre %r; using GPT-2's pre-tokenizer.", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _render_tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandboxed environment transformers renders it in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _render_tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_content(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a plain string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class Tokenizer:
    """A `tokenizers` tokenizer plus what the engine needs beside it: special ids, BOS policy and chat template."""

    def __init__(
        self,
        hf_tokenizer: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool,
        chat_template: str | None,
    ):
        """Wrap an HF `tokenizers.Tokenizer` whose post-processor adds nothing; BOS is our decision (`add_bos`)."""
        self._tok = hf_tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.add_bos = add_bos
        self.chat_template = chat_template

    # ---- constructors -------------------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes from its metadata (key -> python value).

        Raises ValueError for tokenizer models other than byte-level BPE ("gpt2"), naming the model.
        """
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"Unsupported GGUF tokenizer model {model!r}: only byte-level BPE ('gpt2') vocabularies are supported."
            )
        pre = metadata.get("tokenizer.ggml.pre") or "default"
        tokens = list(metadata["tokenizer.ggml.tokens"])
        token_types = metadata.get("tokenizer.ggml.token_type")
        token_types = [1] * len(tokens) if token_types is None else [int(t) for t in token_types]
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        # A few converters store a token's raw text instead of its byte-level spelling; respell those so they match.
        vocab = {
            (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
            for i, t in enumerate(tokens)
        }
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", ())]
        bpe = models.BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=False,
            ignore_merges=pre in _IGNORE_MERGES_PRE,
        )
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        # Control tokens are special; user-defined ones (like `<think>`) are matched whole but kept by
        # skip_special_tokens, as llama.cpp and transformers do. A control token spelled outside the byte alphabet
        # is a converter mislabel; adding it would create a new id beyond the model's vocabulary.
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, token_types, strict=False)
            if ty == _TOKEN_TYPE_CONTROL and set(t) <= alphabet
        ]
        user_defined = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, token_types, strict=False)
            if ty == _TOKEN_TYPE_USER_DEFINED and t in vocab
        ]
        tok.add_special_tokens(special)
        tok.add_tokens(user_defined)

        eos_ids = [
            metadata[key]
            for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if metadata.get(key) is not None
        ]
        return cls(
            tok,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos_ids,
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_gguf_file(cls, path: str) -> Tokenizer:
        """Build the tokenizer of a GGUF file, reading only its `tokenizer.*` metadata."""
        reader = gguf.GGUFReader(path)
        metadata = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
        return cls.from_gguf_metadata(metadata)

    @classmethod
    def from_hf_folder(cls, path: str) -> Tokenizer:
        """Load an HF model folder: tokenizer.json, tokenizer_config.json and, when present, config.json /
        generation_config.json (their eos ids are added) and chat_template.jinja."""
        tok = HFTokenizer.from_file(os.path.join(path, TOKENIZER_FILE))
        tok_config = _read_json(os.path.join(path, "tokenizer_config.json"))
        model_config = _read_json(os.path.join(path, "config.json"))
        gen_config = _read_json(os.path.join(path, "generation_config.json"))

        bos = _token_content(tok_config.get("bos_token"))
        bos_id = tok.token_to_id(bos) if bos else None
        if bos_id is None:
            bos_id = model_config.get("bos_token_id")
        eos = _token_content(tok_config.get("eos_token"))
        eos_ids = [tok.token_to_id(eos)] if eos and tok.token_to_id(eos) is not None else []
        eos_ids += _as_id_list(model_config.get("eos_token_id")) + _as_id_list(gen_config.get("eos_token_id"))

        if "add_bos_token" in tok_config:
            add_bos = bool(tok_config["add_bos_token"])
        else:
            # Llama-3 style folders add BOS through the post-processor rather than a flag.
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
        # We add BOS ourselves, so the post-processor must not add it a second time.
        tok.post_processor = None

        template = tok_config.get("chat_template")
        if isinstance(template, list):
            # Multiple named templates; "default" is the one transformers uses without being asked.
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_path = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        return cls(tok, bos_token_id=bos_id, eos_token_ids=eos_ids, add_bos=add_bos, chat_template=template)

    def save(self, directory: str) -> None:
        """Write tokenizer.json and meshserve_tokenizer.json into `directory` (created if missing)."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, TOKENIZER_FILE))
        meta = {
            "chat_template": self.chat_template,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
            "add_bos": self.add_bos,
        }
        with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=2)

    @classmethod
    def load(cls, directory: str) -> Tokenizer:
        """Load a tokenizer written by `save`."""
        tok = HFTokenizer.from_file(os.path.join(directory, TOKENIZER_FILE))
        meta = _read_json(os.path.join(directory, META_FILE))
        return cls(
            tok,
            bos_token_id=meta.get("bos_token_id"),
            eos_token_ids=meta.get("eos_token_ids", []),
            add_bos=bool(meta.get("add_bos", False)),
            chat_template=meta.get("chat_template"),
        )

    # ---- text <-> ids -------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (byte-level spelling) of an id, or None when the id is out of range."""
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised. BOS is prepended only when
        `add_special_tokens` and the model asks for it (`add_bos`)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 decode to U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------------------------

    def _special_text(self, token_id: int | None) -> str:
        # Decoded rather than looked up: a byte-level entry is spelled in the byte alphabet, not as its text.
        if token_id is None:
            return ""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation into one prompt string with the model's chat template.

        Raises ValueError when there is no template, a role is not one of ALLOWED_ROLES, content is not a string,
        or the template itself refuses the conversation (`raise_exception`).
        """
        if self.chat_template is None:
            raise ValueError("This tokenizer has no chat template.")
        validated = []
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in ALLOWED_ROLES:
                raise ValueError(f"messages[{i}] has role {role!r}; expected one of {ALLOWED_ROLES}.")
            content = message.get("content")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}] content must be a string, got {type(content).__name__}.")
            validated.append(dict(message))
        eos_id = self.eos_token_ids[0] if self.eos_token_ids else None
        try:
            return _compile_template(self.chat_template).render(
                messages=validated,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._special_text(self.bos_token_id),
                eos_token=self._special_text(eos_id),
            )
        except jinja2.TemplateError as e:
            # Templates call raise_exception on conversations they cannot render (e.g. roles not alternating):
            # that is the caller's input at fault, so it surfaces as the same error type as the checks above.
            raise ValueError(f"The chat template rejected the conversation: {e}") from e

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of a conversation; BOS is not prepended again when the template already wrote it."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        bos = self._special_text(self.bos_token_id)
        return self.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def make_tiny_tokenizer(vocab_size: int = 256) -> Tokenizer:
    """A byte-level tokenizer for tiny random models: id b is byte b, no merges, a simple chat template.

    Ids 0 and 1 are still the bytes 0x00 and 0x01 (so any text round-trips), but the tokenizer declares
    bos_token_id=0 and eos_token_ids=(1,) and does not prepend BOS. Ids 256 and up, when `vocab_size` asks for
    them, are special filler tokens `<extra_N>`.
    """
    if vocab_size < 256:
        raise ValueError(f"A byte-level tokenizer needs at least 256 ids, got vocab_size={vocab_size}.")
    spelling = bytes_to_unicode()
    tok = HFTokenizer(models.BPE(vocab={spelling[b]: b for b in range(256)}, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(f"<extra_{i}>", special=True, normalized=False) for i in range(vocab_size - 256)]
    )
    return Tokenizer(tok, bos_token_id=0, eos_token_ids=(1,), add_bos=False, chat_template=TINY_CHAT_TEMPLATE)
