"""Model configuration: one frozen dataclass for the decoder families the engine runs (Llama, Qwen2/3, Mistral,
Gemma 2/3 text), built from an HF config.json or GGUF metadata.

A family is a set of features (q/k norms, sliding-window layers, soft-capping, ...), each a field of ModelConfig
whose default is the Llama behaviour: the model branches on them in Python at trace time, so a feature a config
lacks compiles to no code at all."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

SUPPORTED_HF_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)
# Architectures we know and decline, with what is missing (one line each).
_UNSUPPORTED_HF_ARCHITECTURES = {
    "Gemma3ForConditionalGeneration": "the vision tower is not supported; text-only Gemma3ForCausalLM is",
    "Mistral3ForConditionalGeneration": "the vision tower is not supported; text-only MistralForCausalLM is",
    "LlavaForConditionalGeneration": "the vision tower is not supported",
    "Qwen3MoeForCausalLM": "mixture-of-experts MLPs are not supported; dense Qwen3ForCausalLM is",
    "MixtralForCausalLM": "mixture-of-experts MLPs are not supported; dense MistralForCausalLM is",
    "GemmaForCausalLM": "Gemma 1 is not supported; Gemma2ForCausalLM and Gemma3ForCausalLM are",
}
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
# How many layers one sliding/global period spans when an old config gives only a pattern (layer i is global when
# (i + 1) % pattern == 0), by architecture.
_DEFAULT_SLIDING_PATTERN = {"Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 6}
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this engine does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: Llama-3 style frequency-dependent ("llama3") or every frequency divided by `factor`
    ("linear", Gemma 3's global layers)."""

    factor: float
    """How much the context was stretched (8.0 for Llama-3.1)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position / low_freq_factor are divided by `factor`."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position / high_freq_factor are left alone."""
    original_max_position: int = 8192
    """llama3: context length the model was pre-trained with before scaling."""
    kind: str = "llama3"
    """Which scaling: "llama3" or "linear"."""

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALING_KINDS:
            raise UnsupportedModelError(
                f"rope_scaling type {self.kind!r} is not supported; meshserve supports {', '.join(ROPE_SCALING_KINDS)}"
            )


ROPE_SCALING_KINDS = ("llama3", "linear")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")


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
    qk_norm: bool = False
    """Whether q and k pass through a per-head RMSNorm over H before RoPE (Qwen3, Gemma 3)."""
    norm_offset: bool = False
    """Whether every RMSNorm scales by (1 + weight) instead of weight (Gemma)."""
    sandwich_norms: bool = False
    """Whether attention and MLP outputs are also normalized before joining the residual (Gemma 2/3)."""
    scale_embeddings: bool = False
    """Whether token embeddings are multiplied by sqrt(D), rounded to the compute dtype (Gemma)."""
    mlp_activation: str = "silu"
    """Activation of the gated MLP's gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)."""
    query_pre_attn_scalar: float | None = None
    """Queries are scaled by query_pre_attn_scalar ** -0.5; None: head_dim ** -0.5 (Gemma sets it)."""
    attn_logit_softcap: float | None = None
    """Attention scores become cap * tanh(score / cap) before the mask and softmax; None: no capping (Gemma 2)."""
    final_logit_softcap: float | None = None
    """Logits become cap * tanh(logit / cap); None: no capping (Gemma 2/3)."""
    sliding_window: int | None = None
    """Tokens a sliding-window layer's query sees: itself and the sliding_window - 1 before it (None: no such
    layers)."""
    sliding_layers: tuple[int, ...] = ()
    """Indices of the layers that attend within `sliding_window` (the others attend to the whole context)."""
    rope_local_theta: float | None = None
    """RoPE base of the sliding-window layers, unscaled (Gemma 3's rope_local_base_freq); None: they use rope_theta
    and rope_scaling like the others."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise UnsupportedModelError(
                f"MLP activation {self.mlp_activation!r} is not supported; "
                f"meshserve supports {', '.join(MLP_ACTIVATIONS)}"
            )
        if self.sliding_layers and not self.sliding_window:
            raise ValueError("sliding_layers needs a sliding_window")
        if any(not 0 <= i < self.num_layers for i in self.sliding_layers):
            raise ValueError(f"sliding_layers {self.sliding_layers} name layers outside [0, {self.num_layers})")

    def layer_window(self, i: int) -> int | None:
        """Tokens layer i's query sees (see sliding_window), or None for a layer that sees the whole context."""
        return self.sliding_window if i in self.sliding_layers else None

    @property
    def query_scale(self) -> float:
        """What queries are multiplied by before the score product."""
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)

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
        if self.qk_norm:
            per_layer += 2 * h
        if self.sandwich_norms:
            per_layer += 2 * d
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
        for a in archs:
            if a in _UNSUPPORTED_HF_ARCHITECTURES:
                raise UnsupportedModelError(f"architecture {a}: {_UNSUPPORTED_HF_ARCHITECTURES[a]}")
        arch = next((a for a in archs if a in SUPPORTED_HF_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"architecture {list(archs)} is not supported; meshserve runs {', '.join(SUPPORTED_HF_ARCHITECTURES)}"
            )
        gemma = arch.startswith("Gemma")
        num_heads = config["num_attention_heads"]
        dim = config["hidden_size"]
        num_layers = config["num_hidden_layers"]
        # transformers >= 5 writes `rope_parameters` (theta inside); earlier versions `rope_theta` + `rope_scaling`.
        # Gemma 3 under transformers >= 5 keeps one set per layer type.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        local_rope = None
        if "full_attention" in rope or "sliding_attention" in rope:
            local_rope = dict(rope.get("sliding_attention") or {})
            rope = dict(rope.get("full_attention") or {})
        rope_theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
        rope_local_theta = config.get("rope_local_base_freq") or (local_rope or {}).get("rope_theta")
        if local_rope and _hf_rope_scaling(local_rope) is not None:
            raise UnsupportedModelError("RoPE scaling on sliding-window layers is not supported")
        act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
        if act not in _HF_ACTIVATIONS:
            raise UnsupportedModelError(f"MLP activation {act!r} is not supported; meshserve supports silu, gelu_tanh")
        window, sliding = _hf_sliding_layers(config, arch, num_layers)
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=config["vocab_size"],
            dim=dim,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or dim // num_heads,
            mlp_dim=config["intermediate_size"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=_hf_rope_scaling(rope),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_embeddings=bool(config.get("tie_word_embeddings", gemma)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=config.get("_name_or_path") or arch,
            qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
            norm_offset=gemma,
            sandwich_norms=gemma,
            scale_embeddings=gemma,
            mlp_activation=_HF_ACTIVATIONS[act],
            query_pre_attn_scalar=config.get("query_pre_attn_scalar", 256) if gemma else None,  # HF's default
            attn_logit_softcap=config.get("attn_logit_softcapping") or None,
            final_logit_softcap=config.get("final_logit_softcapping") or None,
            sliding_window=window,
            sliding_layers=sliding,
            rope_local_theta=float(rope_local_theta) if rope_local_theta and window else None,
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
        data["sliding_layers"] = tuple(data.get("sliding_layers") or ())
        return cls(**data)


def _hf_rope_scaling(scaling: Mapping[str, Any] | None) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALING_KINDS:
        raise UnsupportedModelError(
            f"rope_scaling type {kind!r} is not supported; meshserve supports {', '.join(ROPE_SCALING_KINDS)}"
        )
    if kind == "linear":
        return RopeScaling(factor=float(scaling["factor"]), kind="linear")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _hf_sliding_layers(config: Mapping[str, Any], arch: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
    """(sliding_window, indices of the layers that use it) from an HF config: `layer_types` where given, else the
    family's pattern (Gemma) or max_window_layers (Qwen with use_sliding_window), else every layer (Mistral)."""
    window = config.get("sliding_window")
    if config.get("use_sliding_window") is False or not window:
        window = None
    types = config.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise UnsupportedModelError(f"layer types {unknown} are not supported; meshserve runs full and sliding")
        if len(types) != num_layers:
            raise UnsupportedModelError(f"layer_types names {len(types)} layers, the model has {num_layers}")
        sliding = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    elif arch in _DEFAULT_SLIDING_PATTERN:
        pattern = int(config.get("sliding_window_pattern") or _DEFAULT_SLIDING_PATTERN[arch])
        sliding = tuple(i for i in range(num_layers) if (i + 1) % pattern)
    elif config.get("max_window_layers") is not None:  # Qwen: the layers from max_window_layers on
        sliding = tuple(range(int(config["max_window_layers"]), num_layers))
    else:
        sliding = tuple(range(num_layers))
    if window is None:
        if sliding and types is not None:
            raise UnsupportedModelError("layer_types names sliding-window layers but the config has no sliding_window")
        return None, ()
    return (int(window), sliding) if sliding else (None, ())


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
