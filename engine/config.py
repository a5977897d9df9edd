"""Model configuration: one frozen dataclass for the Llama family, built from an HF config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this engine does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float
    """How much the context was stretched (8.0 for Llama-3.1)."""
    low_freq_factor: float
    """Wavelengths above original_max_position / low_freq_factor are divided by `factor`."""
    high_freq_factor: float
    """Wavelengths below original_max_position / high_freq_factor are left alone."""
    original_max_position: int
    """Context length the model was pre-trained with before scaling."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder. Dimension letters follow the README glossary."""

    vocab_size: int
    """V: number of token ids."""
    dim: int
    """D: width of the residual stream."""
    num_layers: int
    """L: number of transformer blocks."""
    num_heads: int
    """N: query heads."""
    num_kv_heads: int
    """K: key/value heads (grouped-query attention when K < N)."""
    head_dim: int
    """H: width of one attention head."""
    mlp_dim: int
    """F: hidden width of the SwiGLU MLP."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: RopeScaling | None = None
    """Llama-3 style RoPE scaling, or None for plain RoPE."""
    max_position_embeddings: int = 2048
    """Longest context the model was trained for; the engine's max_seq_len may not exceed it."""
    tie_embeddings: bool = False
    """Whether the output projection reuses the token embedding matrix."""
    qkv_bias: bool = False
    """Whether q/k/v projections carry a bias (Qwen2)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence id, if the model has one."""
    eos_token_ids: tuple[int, ...] = ()
    """Ids that end a generation unless a request sets ignore_eos."""
    name: str = "llama"
    """Human-readable model name, for logs and GetModelInfo."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def q_per_kv(self) -> int:
        """G: query heads sharing one kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, f, n, k, h = self.dim, self.mlp_dim, self.num_heads, self.num_kv_heads, self.head_dim
        per_layer = 2 * d + d * n * h * 2 + 2 * d * k * h + 3 * d * f
        if self.qkv_bias:
            per_layer += (n + 2 * k) * h
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    def kv_bytes_per_token(self, bytes_per_elem: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_elem

    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token's forward pass, attention over the context excluded."""
        embed_lookup = self.vocab_size * self.dim  # a gather, not a matmul
        return 2 * (self.num_params - embed_lookup * (0 if self.tie_embeddings else 1))

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | os.PathLike) -> ModelConfig:
        """Builds the config from an HF `config.json` (a dict, the file, or the folder holding it)."""
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                config = json.load(f)
        archs = tuple(config.get("architectures") or ())
        if not any(a in SUPPORTED_HF_ARCHITECTURES for a in archs):
            raise UnsupportedModelError(
                f"architecture {list(archs)} is not supported; meshserve runs {', '.join(SUPPORTED_HF_ARCHITECTURES)}"
            )
        num_heads = config["num_attention_heads"]
        dim = config["hidden_size"]
        # transformers >= 5 writes `rope_parameters` (theta inside); earlier versions `rope_theta` + `rope_scaling`
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=config["vocab_size"],
            dim=dim,
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or dim // num_heads,
            mlp_dim=config["intermediate_size"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=config.get("rope_theta") or rope.get("rope_theta") or 10000.0,
            rope_scaling=_hf_rope_scaling(rope),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias="Qwen2ForCausalLM" in archs or bool(config.get("attention_bias", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=config.get("_name_or_path") or archs[0],
        )

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], *, has_output_weight: bool) -> ModelConfig:
        """Builds the config from GGUF metadata (key -> python value) and whether `output.weight` exists."""
        arch = metadata.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported; meshserve runs {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            return metadata.get(f"{arch}.{key}", default)

        num_heads = int(get("attention.head_count"))
        dim = int(get("embedding_length"))
        vocab = get("vocab_size") or len(metadata["tokenizer.ggml.tokens"])
        scaling = None
        if get("rope.scaling.type") == "llama3" or get("rope.scaling.factor"):
            scaling = RopeScaling(
                factor=float(get("rope.scaling.factor")),
                low_freq_factor=float(get("rope.scaling.low_freq_factor", 1.0)),
                high_freq_factor=float(get("rope.scaling.high_freq_factor", 4.0)),
                original_max_position=int(get("rope.scaling.original_context_length", 8192)),
            )
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        return cls(
            vocab_size=int(vocab),
            dim=dim,
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads)),
            head_dim=int(get("attention.key_length") or get("rope.dimension_count") or dim // num_heads),
            mlp_dim=int(get("feed_forward_length")),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_embeddings=not has_output_weight,
            qkv_bias=arch == "qwen2",
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            name=str(metadata.get("general.name") or arch),
        )

    def to_json(self) -> str:
        """Serializes the config (stored beside orbax checkpoints)."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Inverse of `to_json`."""
        data = json.loads(text)
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids") or ())
        return cls(**data)


def _hf_rope_scaling(scaling: Mapping[str, Any] | None) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported; meshserve supports 'llama3'")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small random-weight config for fast tests (GQA with 2 query heads per kv head)."""
    base = dict(
        vocab_size=256,
        dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=128,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_embeddings=False,
        eos_token_ids=(1,),
        bos_token_id=0,
        name="tiny-random-llama",
    )
    base.update(overrides)
    return ModelConfig(**base)


def llama_1b_config(**overrides: Any) -> ModelConfig:
    """A ~1.2B-parameter Llama (Llama-3.2-1B shapes, tied 128K vocabulary) for random-weight accelerator runs."""
    base = dict(
        vocab_size=128256,
        dim=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=8192,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_embeddings=True,
        bos_token_id=0,
        eos_token_ids=(1,),
        name="random-llama-1b",
    )
    base.update(overrides)
    return ModelConfig(**base)
