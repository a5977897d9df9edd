"""The baseline people would otherwise use: HF transformers' static-batch `generate` on the same weights and ids.

Fairness (shared/PERFORMANCE.md): the same prompt token ids, the same weights (converted from the engine's own
parameters, so any checkpoint meshserve can load works), the same dtype, the same output lengths (greedy, EOS
switched off for the call, so rows run through it as with ignore_eos), left padding, warm-up excluded, and the best of
several batch sizes (static batching pays for padding and for the longest row, so the best size depends on the set).

Needs torch and transformers (the `reference` extra); they are imported only when a baseline runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from engine.config import ModelConfig
from engine.model import unfuse_layer, unpack_head


def hf_config(config: ModelConfig) -> Any:
    """The transformers LlamaConfig of the same architecture (no qkv bias: Llama/Mistral layouts only)."""
    from transformers import LlamaConfig

    if config.qkv_bias:
        raise NotImplementedError("the HF baseline converts Llama-layout models only (this one has a qkv bias)")
    kwargs: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.mlp_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids) or None,
    )
    s = config.rope_scaling
    if s is not None:
        kwargs["rope_scaling"] = {
            "rope_type": "llama3",
            "rope_theta": config.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
    return LlamaConfig(**kwargs)


def hf_state_dict(config: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """Engine params (per-layer layout) as HF Llama tensors ([out, in] linear weights), float32 numpy."""
    p = unpack_head(jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(params)), config)
    d = config.dim
    out = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"]  # the engine runs linear weights [out, in], as HF stores them
    for i in range(config.num_layers):
        layer, pre = unfuse_layer(p[f"layer_{i}"], config), f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = layer["attn_norm"]
        out[pre + "post_attention_layernorm.weight"] = layer["mlp_norm"]
        out[pre + "self_attn.q_proj.weight"] = layer["wq"].reshape(-1, d)  # [N, H, D] -> [N*H, D]
        out[pre + "self_attn.k_proj.weight"] = layer["wk"].reshape(-1, d)
        out[pre + "self_attn.v_proj.weight"] = layer["wv"].reshape(-1, d)
        out[pre + "self_attn.o_proj.weight"] = layer["wo"].reshape(d, -1)  # [D, N, H] -> [D, N*H]
        out[pre + "mlp.gate_proj.weight"] = layer["w_gate"]
        out[pre + "mlp.up_proj.weight"] = layer["w_up"]
        out[pre + "mlp.down_proj.weight"] = layer["w_down"]
    return out


def hf_model(config: ModelConfig, params: Any, dtype: str) -> Any:
    """A LlamaForCausalLM in eval mode holding exactly the engine's weights, in `dtype` ("float32" / "bfloat16")."""
    import torch
    from transformers import LlamaForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = LlamaForCausalLM(hf_config(config))
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in hf_state_dict(config, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # rotary inv_freq buffers are derived, and a tied lm_head is the embedding itself
    missing = [
        m for m in missing if not m.endswith("inv_freq") and not (config.tie_embeddings and m == "lm_head.weight")
    ]
    if missing or unexpected:
        raise ValueError(f"HF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_embeddings:
        model.tie_weights()
    return model.to(torch_dtype).eval()


@dataclasses.dataclass
class BaselineRun:
    """One batch size's result: median wall time over `repeats` full passes over the prompt set."""

    batch_size: int
    wall_s: float
    output_tokens: int
    runs_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def generate_batch(model: Any, batch: Sequence[Sequence[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy static-batch generation of exactly `new_tokens` per row, left padded; returns the new ids per row."""
    import torch

    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            eos_token_id=None,  # exactly new_tokens per row, like ignore_eos (min_new_tokens would mask EOS instead)
            do_sample=False,
            pad_token_id=pad_id,
        )
    new = out[:, width:]
    if new.shape[1] != new_tokens:
        raise RuntimeError(f"HF generate returned {new.shape[1]} new tokens, expected {new_tokens}")
    return new.tolist()


def run_baseline(
    model: Any,
    prompts: Sequence[Sequence[int]],
    new_tokens: Sequence[int],
    *,
    batch_sizes: Sequence[int],
    repeats: int = 3,
    pad_id: int = 0,
    progress: Callable[[], None] | None = None,
) -> tuple[list[BaselineRun], list[list[int]]]:
    """Times full passes over `prompts` at each batch size (prompts with equal output length are batched together).

    Returns each batch size's run and the tokens of the last pass (for checking both systems produce the same
    text). `progress` is called after every pass.
    """
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(new_tokens):
        groups.setdefault(n, []).append(i)
    # Warm-up (excluded): one short batch, so lazy initialization and allocator growth are not timed.
    generate_batch(model, [prompts[0]], min(4, new_tokens[0]), pad_id)
    runs, outputs = [], [[] for _ in prompts]
    for size in batch_sizes:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for n, members in groups.items():
                for lo in range(0, len(members), size):
                    chunk = members[lo : lo + size]
                    for i, toks in zip(
                        chunk, generate_batch(model, [prompts[i] for i in chunk], n, pad_id), strict=True
                    ):
                        outputs[i] = toks
            times.append(time.perf_counter() - start)
            if progress is not None:
                progress()
        runs.append(BaselineRun(size, statistics.median(times), sum(new_tokens), times))
    return runs, outputs


def versions() -> dict[str, str]:
    """torch and transformers versions, for the result JSON."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
