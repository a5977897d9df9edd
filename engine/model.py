"""The Llama-family transformer as a Flax module: a pure function of (params, tokens, positions, KV cache).

Dimension letters (README glossary): B batch/slots, T query length, S cache (key) length, D model dim,
N query heads, K kv heads, G query heads per kv head (N = K * G), H head dim, F MLP dim, V vocab, L layers.

Two entry shapes share one parameter tree:
- prefill: tokens [B, T] with no cache; causal attention inside the T tokens; returns each layer's K/V
  ([L, B, T, K, H]) for the engine to insert into slots.
- decode: tokens [B, 1] with the cache window (k, v: [L, B, K, S, H]) and per-slot lengths [B]; each query attends
  to its slot's cached positions < length plus itself; returns the new K/V ([L, B, K, H]) for the engine to write.
  The cache is only *read* inside the layer scan, and written once per step outside it, so XLA never copies it.

Layers are stacked on a leading `layers` axis and run under `nn.scan`, so compile time does not grow with depth.
Every parameter declares its logical axes with `nn.with_logical_partitioning`; `sharding/` maps them onto a mesh.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engine.config import ModelConfig

# Logical axes of every parameter (stacked layer params get a leading "layers" axis).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "attn_norm": ("embed",),
    "wq": ("embed", "q_heads", "head_dim"),
    "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"),
    "bq": ("q_heads", "head_dim"),
    "bk": ("kv_heads", "head_dim"),
    "bv": ("kv_heads", "head_dim"),
    "wo": ("q_heads", "head_dim", "embed"),
    "mlp_norm": ("embed",),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
}
# Logical axes of the KV cache arrays (k and v each).
CACHE_AXES = ("layers", "slots", "kv_heads", "cache_seq", "head_dim")

_NEG_INF = -1e30  # large finite: keeps fully-masked rows NaN-free


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] of the rotary embedding, with Llama-3 scaling when configured."""
    h = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    s = config.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x [B, T, n, H] by positions [B, T] (HF "rotate half" convention)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, scaled, cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], dtype: Any, init: Any) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, PARAM_AXES[name]), shape, dtype)


class Block(nn.Module):
    """One pre-norm decoder block: attention (GQA + RoPE) then a SwiGLU MLP, both residual."""

    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cache, positions, lengths):
        c, dt = self.config, self.dtype
        d, n, k, h, f, g = c.dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.q_per_kv
        normal, ones, zeros = nn.initializers.normal(0.02), nn.initializers.ones, nn.initializers.zeros
        attn_norm = _param(self, "attn_norm", (d,), dt, ones)
        wq = _param(self, "wq", (d, n, h), dt, normal)
        wk = _param(self, "wk", (d, k, h), dt, normal)
        wv = _param(self, "wv", (d, k, h), dt, normal)
        wo = _param(self, "wo", (n, h, d), dt, normal)
        mlp_norm = _param(self, "mlp_norm", (d,), dt, ones)
        w_gate = _param(self, "w_gate", (d, f), dt, normal)
        w_up = _param(self, "w_up", (d, f), dt, normal)
        w_down = _param(self, "w_down", (f, d), dt, normal)

        with jax.named_scope("attention"):
            y = rms_norm(x, attn_norm, c.rms_norm_eps)
            q = jnp.einsum("BTD,DNH->BTNH", y, wq)
            k_new = jnp.einsum("BTD,DKH->BTKH", y, wk)
            v_new = jnp.einsum("BTD,DKH->BTKH", y, wv)
            if c.qkv_bias:
                q = q + _param(self, "bq", (n, h), dt, zeros)
                k_new = k_new + _param(self, "bk", (k, h), dt, zeros)
                v_new = v_new + _param(self, "bv", (k, h), dt, zeros)
            inv_freq = jnp.asarray(rope_inv_freq(c))
            q = apply_rope(q, positions, inv_freq)
            k_new = apply_rope(k_new, positions, inv_freq)
            b, t = q.shape[:2]
            q = q.reshape(b, t, k, g, h) * (1.0 / math.sqrt(h))
            if cache is None:
                out = _causal_attention(q, k_new, v_new)
                kv_out = (k_new, v_new)  # [B, T, K, H] each
            else:
                out = _decode_attention(q[:, 0], k_new[:, 0], v_new[:, 0], cache, lengths)[:, None]
                kv_out = (k_new[:, 0], v_new[:, 0])  # [B, K, H] each
            x = x + jnp.einsum("BTNH,NHD->BTD", out.reshape(b, t, n, h), wo)

        with jax.named_scope("mlp"):
            y = rms_norm(x, mlp_norm, c.rms_norm_eps)
            gate = jnp.einsum("BTD,DF->BTF", y, w_gate)
            up = jnp.einsum("BTD,DF->BTF", y, w_up)
            x = x + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w_down)
        return x, kv_out


def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q [B, T, K, G, H] (pre-scaled), k/v [B, T, K, H] -> [B, T, K, G, H]; query t sees keys <= t."""
    t = q.shape[1]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k).astype(jnp.float32)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)


def _decode_attention(q, k_new, v_new, cache, lengths):
    """One query per slot against its cached keys plus its own new key.

    q [B, K, G, H] (pre-scaled); k_new/v_new [B, K, H]; cache (k, v) [B, K, S, H]; lengths [B] cached tokens.
    """
    k_cache, v_cache = cache
    s = k_cache.shape[2]
    # multiply-and-reduce instead of a batched dot: XLA fuses it with the layer's cache slice (no copy) and
    # streams the cache once; batched [G, H] x [H, S] dots are tiny and slow on every backend's dot emitter
    scores = jnp.sum(q[:, :, :, None, :] * k_cache[:, :, None, :, :], axis=-1, dtype=jnp.float32)
    valid = jnp.arange(s)[None, :] < lengths[:, None]  # [B, S]
    scores = jnp.where(valid[:, None, None, :], scores, _NEG_INF)
    self_score = jnp.einsum("BKGH,BKH->BKG", q, k_new).astype(jnp.float32)[..., None]
    peak = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), self_score)
    p_cache = jnp.exp(scores - peak)
    p_self = jnp.exp(self_score - peak)
    denom = jnp.sum(p_cache, axis=-1, keepdims=True) + p_self
    weights = (p_cache / denom).astype(v_cache.dtype)
    out = jnp.sum(weights[..., None] * v_cache[:, :, None, :, :], axis=3)  # [B, K, G, H]
    return out + (p_self / denom).astype(v_new.dtype) * v_new[:, :, None, :]


class Transformer(nn.Module):
    """Token ids -> logits (float32), plus the K/V each layer produced for the engine to cache."""

    config: ModelConfig
    dtype: Any = jnp.float32
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, tokens, positions, cache=None, lengths=None, logits_index=None):
        """tokens/positions [B, T]; cache (k, v) [L, B, K, S, H] or None; lengths [B] (decode only).

        logits_index [B]: compute logits only at that position of each row (prefill's last real token) ->
        [B, V]; None -> logits for every position [B, T, V].
        """
        c = self.config
        embed = _param(self, "embed", (c.vocab_size, c.dim), self.dtype, nn.initializers.normal(0.02))
        x = jnp.take(embed, tokens, axis=0)  # [B, T, D]
        layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            unroll=self.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.dtype, name="layers")
        x, kv = layers(x, cache, positions, lengths)
        x = rms_norm(x, _param(self, "final_norm", (c.dim,), self.dtype, nn.initializers.ones), c.rms_norm_eps)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]  # [B, D]
        if c.tie_embeddings:
            logits = jnp.einsum("...D,VD->...V", x, embed)
        else:
            head = _param(self, "lm_head", (c.dim, c.vocab_size), self.dtype, nn.initializers.normal(0.02))
            logits = jnp.einsum("...D,DV->...V", x, head)
        return logits.astype(jnp.float32), kv


def abstract_params(config: ModelConfig, dtype: Any) -> tuple[Any, Any]:
    """(abstract param tree of ShapeDtypeStruct, matching tree of logical PartitionSpecs), nothing allocated."""
    model = Transformer(config, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)["params"]
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def init_params(config: ModelConfig, dtype: Any, seed: int = 0) -> Any:
    """Random parameters (tests and benchmarks on configs with no checkpoint)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(Transformer(config, dtype).init(jax.random.key(seed), tokens, tokens)["params"])
