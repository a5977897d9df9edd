"""The decoder transformer (Llama, Qwen2/3, Mistral, Gemma 2/3 text: the features engine.config names) as a Flax
module: a pure function of (params, tokens, positions, KV cache).

Dimension letters (README glossary): B batch/slots, T query length, S cache (key) length, P page length,
D model dim, N query heads, K kv heads, G query heads per kv head (N = K * G), H head dim, F MLP dim, V vocab,
L layers.

Two entry shapes share one parameter tree, and the KV memory is a pool of pages per layer shared by every slot
(engine.attention):
- prefill: tokens [B, T]; causal attention inside the T tokens (and inside each segment, when several prompts are
  packed in one row). Without a pool it returns each layer's K/V ([B, T, K, H]); with one (the engine's packed
  prefill, B = 1) it writes them into the pool's pages and also attends to cached pages (a shared prefix, an
  earlier chunk of the same prompt), returning the updated pool.
- decode: tokens [B, 1] with each layer's pool, a page table [B, W] and per-slot lengths [B]; each layer first
  writes its new K/V at position `length` of every slot, then the query attends to positions <= length. Writing
  before reading keeps the update in place: read-then-write made XLA copy the cache to keep the old value alive for
  the read (measured at 64 slots with per-slot pages: ~48 ms of copies in a ~264 ms step).

Layers are unrolled over per-layer weight buffers. Measured on XLA:CPU (SmolLM2, one decode step): a `scan` over
stacked layers copies every layer's weight and cache slice out of the stacked buffer before each dot (the profile
shows `dynamic-slice` copies taking ~25% of the step). Separate buffers let every dot read its operand in place;
the price is compile time growing with depth (see README, "Design decisions").
Every parameter declares its logical axes with `nn.with_logical_partitioning`; `sharding/` maps them onto a mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engine import quant
from engine.attention import (
    NEG_INF,
    as_stored,
    paged_decode_attention_xla,
    prefill_attention_xla,
    write_prefill_kv,
)
from engine.config import ModelConfig

# Logical axes of every parameter in a checkpoint ([in, out] linear weights; layer params stacked on a leading
# "layers" axis).
CHECKPOINT_AXES: dict[str, tuple[str, ...]] = {
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
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "post_attn_norm": ("embed",),
    "post_mlp_norm": ("embed",),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
}
# The model runs linear weights [out, in] (see Block): each is its checkpoint array transposed by this permutation.
TO_RUNTIME: dict[str, tuple[int, ...]] = {
    "lm_head": (1, 0),
    "wq": (1, 2, 0),
    "wk": (1, 2, 0),
    "wv": (1, 2, 0),
    "wo": (2, 0, 1),
    "w_gate": (1, 0),
    "w_up": (1, 0),
    "w_down": (1, 0),
}
# Weights the model runs as one product, stacked on a leading axis of their own at unstack time (the checkpoint keeps
# them apart): k and v, gate and up. Measured on XLA:CPU (SmolLM2, 30 layers): a matrix-vector product pays ~25 us
# of its own beyond its bytes, and the two fewer products per layer take a one-slot decode step from 20.4 to 18.0
# ms in a model-shaped benchmark (the real decode step: 26.6-26.7 -> 25.4-25.8 ms at one slot, 147-150 -> 132-137
# ms at 64). Stacked on a new unsharded axis, each part keeps its own sharding (kv heads,
# MLP columns), so tensor parallelism splits the fused weight exactly as it split the parts.
FUSED: dict[str, tuple[str, str]] = {"wkv": ("wk", "wv"), "bkv": ("bk", "bv"), "w_gate_up": ("w_gate", "w_up")}
_RUNTIME_PART_AXES: dict[str, tuple[str, ...]] = {
    name: tuple(axes[i] for i in TO_RUNTIME[name]) if name in TO_RUNTIME else axes
    for name, axes in CHECKPOINT_AXES.items()
}
# Logical axes of every parameter as the model runs it.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    **{name: axes for name, axes in _RUNTIME_PART_AXES.items() if not any(name in p for p in FUSED.values())},
    **{name: (None, *_RUNTIME_PART_AXES[parts[0]]) for name, parts in FUSED.items()},
    # q, k and v rows stacked (see fuse_qkv_layer)
    "wqkv": (None, "embed"),
    "bqkv": (None,),
    # packed for a hand-written product (see Packed, pack_layer): [ceil(out / rows), in, rows]
    "wqkv_packed": (None, "embed", None),
    "wo_packed": (None, None, None),
    "w_gate_up_packed": (None, "embed", None),
    "w_down_packed": (None, "mlp", None),
    "embed_packed": (None, "embed", None),
    "lm_head_packed": (None, "embed", None),
}
# Weights that `quantize="int8"` stores as int8 values + float32 scales per output channel (engine.quant), with how
# many trailing axes of their runtime shape the product contracts (wo [D, N, H] contracts N and H).
QUANTIZED: dict[str, int] = {
    "embed": 1,
    "lm_head": 1,
    "wq": 1,
    "wkv": 1,
    "wqkv": 1,
    "wo": 2,
    "w_gate_up": 1,
    "w_down": 1,
    **{f"{name}_packed": 1 for name in ("wqkv", "wo", "w_gate_up", "w_down", "embed", "lm_head")},
}
# The scales' logical axes: the weight's output axes (a packed weight's scales run over its padded rows).
PARAM_AXES.update(
    {f"{name}_scale": PARAM_AXES[name][: len(PARAM_AXES[name]) - n] for name, n in QUANTIZED.items()}
    | {f"{name}_packed_scale": (None,) for name in ("wqkv", "wo", "w_gate_up", "w_down", "embed", "lm_head")}
)


def rope_inv_freq(config: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies [H/2] of the rotary embedding, with the configured scaling (llama3 or linear); `local`:
    those of the sliding-window layers where they have their own base (config.rope_local_theta, unscaled)."""
    h = config.head_dim
    theta = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    s = None if local and config.rope_local_theta else config.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    if s.kind == "linear":
        return (inv_freq / s.factor).astype(np.float32)
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions: jax.Array, config: ModelConfig, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [..., H/2] of the rotary angles at positions [...] (`local`: see rope_inv_freq)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(config, local))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates x [B, T, n, H] by the angles `rope` (cos, sin [B, T, H/2], see rope_angles; HF "rotate half"
    convention)."""
    cos, sin = rope[0][:, :, None, :], rope[1][:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, axis: int = -1, offset: bool = False) -> jax.Array:
    """RMSNorm over `axis` (the feature axis) in float32, scaled (by 1 + scale with `offset`, Gemma's convention),
    cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    shape = [1] * x.ndim
    shape[axis] = -1
    scale = scale.astype(jnp.float32)
    if offset:
        scale = scale + 1.0
    return (y * scale.reshape(shape)).astype(x.dtype)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], dtype: Any, init: Any) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, PARAM_AXES[name]), shape, dtype)


def _weight(module: nn.Module, name: str, shape: tuple[int, ...], dtype: Any, init: Any, quantize: str) -> quant.Weight:
    """A linear weight: the array, or with quantize="int8" an engine.quant.Int8 of the params `name` (int8) and
    `name`_scale (float32, the output axes; for a packed weight, its padded rows)."""
    if quantize == "none":
        return _param(module, name, shape, dtype, init)
    zeros, ones = nn.initializers.zeros, nn.initializers.ones
    n_out = len(shape) - 1 if name.endswith("_packed") else len(shape) - QUANTIZED[name]
    scale_shape = (shape[0] * shape[2],) if name.endswith("_packed") else shape[:n_out]
    return quant.Int8(
        _param(module, name, shape, jnp.int8, zeros), _param(module, f"{name}_scale", scale_shape, jnp.float32, ones)
    )


@dataclasses.dataclass(frozen=True)
class Packed:
    """Linear weights stored packed for a hand-written product instead of [out, in] for XLA's dot.

    Each [out, in] weight is held as panels of `rows` rows interleaved per input feature, [ceil(out / rows), in,
    rows] (the rows past `out` zero), and `product(w_packed, x [in, M], out, residual=None, gated=False)` returns
    [out, M], plus `residual` when given. The MLP's gate and up weights share panels (`pack_gated`: half of each
    panel's rows from each), and their product with gated=True is silu(gate x) * (up x) [F, M]. The engine passes
    engine.kernels' (see there for why and how much faster) and converts its weights with `pack_layer`; the model
    only knows the layout. Used with q/k/v fused and no mesh axis splitting any weight. With `int8`, the packed
    weights are engine.quant.Int8 (values in this layout, one scale per padded row; see quant.pack)."""

    rows: int
    product: Callable[..., jax.Array]  # (w_packed, x, out, *, residual=None, gated=False) -> [out, M]
    int8: bool = False

    def shape(self, out: int, inp: int) -> tuple[int, int, int]:
        return (-(-out // self.rows), inp, self.rows)

    def pack(self, w: quant.Weight) -> quant.Weight:
        """[out, in] -> [ceil(out / rows), in, rows] (jnp: works inside jit)."""
        if isinstance(w, quant.Int8):
            return quant.pack(w, self.rows)
        out, inp = w.shape
        panels = -(-out // self.rows)
        w = jnp.pad(w, ((0, panels * self.rows - out), (0, 0)))
        return w.reshape(panels, self.rows, inp).transpose(0, 2, 1)

    @staticmethod
    def unpack(w: quant.Weight, out: int) -> quant.Weight:
        """The inverse of `pack`: [ceil(out / rows), in, rows] -> [out, in]."""
        if isinstance(w, quant.Int8):
            return quant.unpack(w, out)
        return w.transpose(0, 2, 1).reshape(-1, w.shape[1])[:out]

    def pack_gated(self, w: quant.Weight) -> quant.Weight:
        """Gate and up rows [2F, in] (gate first) -> [ceil(F / half), in, rows]: each panel holds `half` = rows / 2
        gate rows, then the same rows of up (jnp: works inside jit)."""
        if isinstance(w, quant.Int8):
            return quant.pack_gated(w, self.rows)
        f, half = w.shape[0] // 2, self.rows // 2
        panels = -(-f // half)
        parts = [jnp.pad(p, ((0, panels * half - f), (0, 0))).reshape(panels, half, -1) for p in (w[:f], w[f:])]
        return jnp.concatenate(parts, axis=1).transpose(0, 2, 1)

    @staticmethod
    def unpack_gated(w: quant.Weight, f: int) -> quant.Weight:
        """The inverse of `pack_gated`: -> [2F, in]."""
        if isinstance(w, quant.Int8):
            return quant.unpack_gated(w, f)
        half = w.shape[2] // 2
        rows = w.transpose(0, 2, 1)  # [panels, rows, in]
        return jnp.concatenate([rows[:, :half].reshape(-1, w.shape[1])[:f], rows[:, half:].reshape(-1, w.shape[1])[:f]])

    def rows_of(self, w: quant.Weight, index: jax.Array, dtype: Any) -> jax.Array:
        """Rows `index` [M] of a packed weight -> [M, in] (an embedding lookup in a packed tied head)."""
        if isinstance(w, quant.Int8):
            return quant.packed_rows(w, index, dtype)
        return w[index // self.rows, :, index % self.rows]


def packed_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of each weight a layer holds packed (see Packed), by its unpacked runtime name."""
    c = config
    n, k, h = c.num_heads, c.num_kv_heads, c.head_dim
    return {
        "wqkv": ((n + 2 * k) * h, c.dim),
        "wo": (c.dim, n * h),
        "w_gate_up": (2 * c.mlp_dim, c.dim),
        "w_down": (c.dim, c.mlp_dim),
    }


def one_token_products(config: ModelConfig, rows: int) -> list[tuple[int, int, int]]:
    """The packed products of one decode step, as (panels of `rows` rows, K, times a step runs it): a layer's, in
    order, once per layer, then the head's (see Packed; the gated MLP product has rows / 2 gate rows a panel)."""
    out = []
    for name, (n, k) in packed_shapes(config).items():
        per_panel = rows // 2 if name == "w_gate_up" else rows
        out.append((-(-(n // 2 if name == "w_gate_up" else n) // per_panel), k, config.num_layers))
    return [*out, (-(-config.vocab_size // rows), config.dim, 1)]


class Block(nn.Module):
    """One pre-norm decoder block: attention (GQA + RoPE) then a gated MLP (SwiGLU, or GeGLU), both residual; with
    the config's features: q/k norms, sandwich norms around both halves, a sliding window, score soft-capping.

    The residual stream is feature-major, x [D, M] (M = B * T tokens), and linear weights are stored [out, in], so
    every projection is a plain [out, in] x [in, M] product. Measured on XLA:CPU (SmolLM2 decode step): 28.2-28.6 ->
    25.4 ms at one slot, 171 -> 138 ms at 64 slots, against [M, in] x [in, out] products. Attention runs
    token-major on the small per-token arrays. The normalized input of each half is materialized (a barrier): fused
    into the dots that read it, it made XLA:CPU leave its fast matmul for a generic loop (the gate/up dots ran at
    ~90 GFLOP/s at 64 slots instead of ~150).
    """

    config: ModelConfig
    dtype: Any
    attend: Callable | None = None  # decode attention, `paged_decode_attention_xla`'s contract; None: that function
    fuse_qkv: bool = False  # q, k and v as one product (`wqkv`, see fuse_qkv_layer)
    packed: Packed | None = None  # linear weights packed for a hand-written product (needs fuse_qkv)
    prefill_attend: Callable | None = None  # paged prefill attention, `prefill_attention_xla`'s contract; None: it
    layer: int = 0  # index of this block (which layers have a sliding window is per layer)
    quantize: str = "none"  # "int8": linear weights as engine.quant.Int8 (see QUANTIZED)
    kv_dtype: str = "auto"  # "int8": K/V as an int8 pool stores them (see Transformer.kv_dtype)

    @nn.compact
    def __call__(self, x, rope, pool=None, table=None, lengths=None, segment_ids=None, paging=None, positions=None):
        """x [D, M] (feature-major); rope: the (cos, sin) [B, T, H/2] of the tokens' positions (see rope_angles).

        Three uses: no `pool`: a plain prefill, returning the new K/V [B, T, K, H]; `pool` (k_pool, v_pool) with
        `table` [B, W] and `lengths` [B]: one decode step (T = 1) through the page table; `pool` with `paging` (B =
        1): a packed prefill that writes its K/V into the pool and also attends to cached pages (a sliding-window
        layer then needs the tokens' `positions` [B, T]). With a pool, the updated pool is returned."""
        c, dt = self.config, self.dtype
        d, n, k, h, f, g = c.dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.q_per_kv
        b, t = rope[0].shape[:2]
        normal, ones, zeros = nn.initializers.normal(0.02), nn.initializers.ones, nn.initializers.zeros
        # Gemma's norm weights are offsets from 1, so a fresh one starts at 0
        norm_init = zeros if c.norm_offset else ones
        window, softcap = c.layer_window(self.layer), c.attn_logit_softcap
        # only XLA's formulation takes these (placement.choose_attention picks it for such models)
        custom = {"window": window, "softcap": softcap} if window is not None or softcap is not None else None

        def norm(y: jax.Array, scale: jax.Array, axis: int) -> jax.Array:
            return rms_norm(y, scale, c.rms_norm_eps, axis=axis, offset=c.norm_offset)

        attn_norm = _param(self, "attn_norm", (d,), dt, norm_init)
        mlp_norm = _param(self, "mlp_norm", (d,), dt, norm_init)
        if self.packed is not None:
            if not self.fuse_qkv:
                raise ValueError("packed weights need q, k and v fused (fuse_qkv=True)")
            if c.mlp_activation != "silu":
                raise ValueError(f"packed weights run a SwiGLU MLP, and this model's gate is {c.mlp_activation}")
            pk, shapes = self.packed, packed_shapes(c)
            packed = {
                name: _weight(self, f"{name}_packed", pk.shape(*s), dt, normal, self.quantize)
                for name, s in shapes.items()
            }

            def product(name: str, y: jax.Array, residual: jax.Array | None = None) -> jax.Array:
                """weight [out, in] x y [in, M] -> [out, M], plus `residual` [out, M] if given."""
                return pk.product(packed[name], y, shapes[name][0], residual=residual)

            def swiglu(y: jax.Array) -> jax.Array:  # silu(gate y) * (up y) [F, M], the [2F, M] product never stored
                return pk.product(packed["w_gate_up"], y, f, gated=True)

        else:
            qz = self.quantize
            dense = {"wo": _weight(self, "wo", (d, n, h), dt, normal, qz).reshape(d, n * h)}
            if self.fuse_qkv:
                dense["wqkv"] = _weight(self, "wqkv", ((n + 2 * k) * h, d), dt, normal, qz)
            else:
                wq = _weight(self, "wq", (n, h, d), dt, normal, qz)
                wkv = _weight(self, "wkv", (2, k, h, d), dt, normal, qz)  # k and v, one product (see FUSED)
            w_gate_up = _weight(self, "w_gate_up", (2, f, d), dt, normal, qz)
            dense["w_down"] = _weight(self, "w_down", (d, f), dt, normal, qz)

            def product(name: str, y: jax.Array, residual: jax.Array | None = None) -> jax.Array:  # as above
                out = quant.matmul(dense[name], y)
                return out if residual is None else residual + out

            def swiglu(y: jax.Array) -> jax.Array:  # as above (GeGLU for a gelu_tanh model)
                gate_up = quant.einsum("CFD,DM->CFM", w_gate_up, y)  # [2, F, M]: under tensor parallelism F is split
                if c.mlp_activation == "gelu_tanh":
                    return jax.nn.gelu(gate_up[0], approximate=True) * gate_up[1]
                return jax.nn.silu(gate_up[0]) * gate_up[1]

        def token_major(y: jax.Array) -> jax.Array:  # [heads, H, M] -> [B, T, heads, H]
            # the heads were split off before this transpose: sharded over heads, the split needs no collective
            return y.reshape(y.shape[0], h, b * t).transpose(2, 0, 1).reshape(b, t, y.shape[0], h)

        with jax.named_scope("attention"):
            y = jax.lax.optimization_barrier(norm(x, attn_norm, 0))
            if self.fuse_qkv:
                qkv = product("wqkv", y)  # [(N + 2K) * H, M]
                if c.qkv_bias:
                    qkv = qkv + _param(self, "bqkv", ((n + 2 * k) * h,), dt, zeros)[:, None]
                q, kv = qkv[: n * h].reshape(n, h, b * t), qkv[n * h :].reshape(2, k, h, b * t)
            else:
                q = quant.matmul(wq.reshape(n * h, d), y).reshape(n, h, b * t)
                kv = quant.einsum("CKHD,DM->CKHM", wkv, y)  # [2, K, H, M]
                if c.qkv_bias:
                    q = q + _param(self, "bq", (n, h), dt, zeros)[..., None]
                    kv = kv + _param(self, "bkv", (2, k, h), dt, zeros)[..., None]
            q, k_new, v_new = token_major(q), token_major(kv[0]), token_major(kv[1])
            if c.qk_norm:  # per head, before the rotation (Qwen3, Gemma 3)
                q = norm(q, _param(self, "q_norm", (h,), dt, norm_init), -1)
                k_new = norm(k_new, _param(self, "k_norm", (h,), dt, norm_init), -1)
            q, k_new = apply_rope(q, rope), apply_rope(k_new, rope)
            q = q.reshape(b, t, k, g, h) * c.query_scale
            # what every read of the new K/V sees (an int8 pool's rounding), whether it reads them from this pack or
            # later from the pages: a cached prefix or a chunk boundary then changes nothing
            k_seen, v_seen = as_stored(k_new, self.kv_dtype), as_stored(v_new, self.kv_dtype)
            if pool is None:
                out = _causal_attention(q, k_seen, v_seen, segment_ids, window, softcap)
                kv_out = (k_new, v_new)  # [B, T, K, H] each
            elif paging is None:
                if custom is not None and self.attend is not None:
                    raise ValueError("a custom decode attention cannot run sliding-window or soft-capped layers")
                attend = self.attend or paged_decode_attention_xla
                args = (q[:, 0], k_new[:, 0], v_new[:, 0], pool[0], pool[1], table, lengths)
                out, k_pool, v_pool = attend(*args) if custom is None else attend(*args, **custom)
                out = out[:, None]
                kv_out = (k_pool, v_pool)
            else:
                k_pool, v_pool = write_prefill_kv(pool[0], pool[1], k_new[0], v_new[0], paging)
                args = (q[0], k_seen[0], v_seen[0], segment_ids[0], k_pool, v_pool, paging)
                if custom is None:
                    out = (self.prefill_attend or prefill_attention_xla)(*args)[None]
                elif self.prefill_attend is not None:
                    raise ValueError("a custom prefill attention cannot run sliding-window or soft-capped layers")
                else:
                    out = prefill_attention_xla(*args, **custom, positions=positions[0])[None]
                kv_out = (k_pool, v_pool)
            out = out.reshape(b * t, n, h).transpose(1, 2, 0).reshape(n * h, b * t)
            if c.sandwich_norms:
                post = _param(self, "post_attn_norm", (d,), dt, norm_init)
                x = x + norm(product("wo", out), post, 0)
            else:
                x = product("wo", out, residual=x)

        with jax.named_scope("mlp"):
            y = jax.lax.optimization_barrier(norm(x, mlp_norm, 0))
            if c.sandwich_norms:
                post = _param(self, "post_mlp_norm", (d,), dt, norm_init)
                x = x + norm(product("w_down", swiglu(y)), post, 0)
            else:
                x = product("w_down", swiglu(y), residual=x)
        return x, kv_out


def _causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """q [B, T, K, G, H] (pre-scaled), k/v [B, T, K, H] -> [B, T, K, G, H]; query t sees keys <= t of its own
    segment (segment_ids [B, T], or one segment per row when None), and with `window` only those less than `window`
    positions before it; `softcap`: scores become softcap * tanh(score / softcap). The prefill of a model without a
    KV pool (the full forward the tests compare against)."""
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None]  # [1, T, S]
    if window is not None:  # a segment's tokens sit at consecutive positions: index distance is position distance
        mask = mask & (jnp.arange(t)[:, None] - jnp.arange(t)[None, :] < window)[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k).astype(jnp.float32)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)


def layer_name(i: int) -> str:
    """Name of layer i's parameter subtree."""
    return f"layer_{i}"


class Transformer(nn.Module):
    """Token ids -> logits (float32), plus the K/V each layer produced for the engine to cache."""

    config: ModelConfig
    dtype: Any = jnp.float32
    attend: Callable | None = None
    """Decode attention with `paged_decode_attention_xla`'s contract (write the new K/V through the page table,
    attend); None runs that function. The engine passes a hand-written kernel here where it has one (see
    engine.kernels)."""
    fuse_qkv: bool = False
    """q, k and v as one product (`wqkv`, see `fuse_qkv_layer`); the engine sets it where no mesh axis splits heads."""
    packed: Packed | None = None
    """Linear weights packed for a hand-written product (see Packed, `pack_layer`); needs fuse_qkv."""
    prefill_attend: Callable | None = None
    """Prefill attention with `prefill_attention_xla`'s contract for the paged case (the pools already hold the pack's
    K/V); None runs that function. The engine passes a hand-written kernel here where it has one."""
    quantize: str = "none"
    """"int8": the linear weights, the embedding and the head as int8 values with a float32 scale per output
    channel (engine.quant; weight-only: activations stay in `dtype`); "none": all in `dtype`."""
    kv_dtype: str = "auto"
    """"int8": attention sees every K/V vector as an int8 pool stores it (engine.attention.quantize_kv), in the
    prefill of a pack as in every later read, so the full forward without a pool (the quality figures) computes
    what the engine does; the pools themselves come from the caller."""

    @nn.compact
    def __call__(
        self,
        tokens,
        positions,
        pool=None,
        table=None,
        lengths=None,
        logits_index=None,
        segment_ids=None,
        paging=None,
        vocab_major=False,
        rope=None,
    ):
        """tokens/positions [B, T]; pool: per layer (k_pool, v_pool) of the paged KV memory (engine.attention), or
        None; decode: table [B, W] and lengths [B]; segment_ids [B, T] (prefill only): packed prompts attend only
        inside their own segment; paging (prefill with a pool, B = 1): where the new K/V go and the cached pages
        the queries also see (see Block).

        logits_index [B, R]: compute logits only at those positions of each row (the last token of each packed
        prompt) -> [B, R, V]; None -> logits for every position [B, T, V]. vocab_major: logits [V, B, R | T]
        instead, as the head computes them: a plain [V, D] x [D, tokens] product, which XLA:CPU runs 1.2-1.4x faster
        at 16-64 tokens than the [tokens, D] x [D, V] one, and ~10x faster at 4 tokens (measured with the argmax:
        64 tokens 21.7 vs 30.6 ms, 16 tokens 8.6 vs 16.6 ms, 4 tokens 6.3 vs 69 ms), and transposing 64 x 49152
        logits back costs another ~15 ms. rope: the (cos, sin) [B, T, H/2] of `positions` (see rope_angles) when the
        caller has them; else computed here. Returns (logits, per-layer (k, v)): the new K/V in a prefill without a
        pool, else the updated pools.
        """
        c, qz = self.config, self.quantize
        normal, pk, v = nn.initializers.normal(0.02), self.packed, c.vocab_size
        b, t = tokens.shape
        if pk is not None and c.tie_embeddings:  # the head's packed weight, whose rows are the embeddings
            embed = _weight(self, "embed_packed", pk.shape(v, c.dim), self.dtype, normal, qz)
            x = pk.rows_of(embed, tokens.reshape(b * t), self.dtype).T
        else:
            embed = _weight(self, "embed", (v, c.dim), self.dtype, normal, qz)
            x = quant.take_rows(embed, tokens.reshape(b * t), self.dtype).T  # [D, M], feature-major (see Block)
        if c.scale_embeddings:  # the factor rounded to the compute dtype first, as Gemma's reference does
            x = x * jnp.asarray(math.sqrt(c.dim), x.dtype)
        if rope is None:
            rope = rope_angles(positions, c)
        # sliding-window layers with a RoPE base of their own (Gemma 3)
        local_rope = rope_angles(positions, c, local=True) if c.rope_local_theta else rope
        kv = []
        for i in range(c.num_layers):
            block = Block(
                c,
                self.dtype,
                self.attend,
                self.fuse_qkv,
                self.packed,
                self.prefill_attend,
                i,
                qz,
                self.kv_dtype,
                name=layer_name(i),
            )
            layer_rope = local_rope if c.layer_window(i) is not None else rope
            layer_pool = None if pool is None else pool[i]
            x, layer_kv = block(x, layer_rope, layer_pool, table, lengths, segment_ids, paging, positions)
            kv.append(layer_kv)
        x = x.reshape(c.dim, b, t)
        if logits_index is not None:
            x = x[:, jnp.arange(b)[:, None], logits_index]  # [D, B, R]
        final_norm = _param(
            self, "final_norm", (c.dim,), self.dtype, nn.initializers.zeros if c.norm_offset else nn.initializers.ones
        )
        x = rms_norm(x, final_norm, c.rms_norm_eps, axis=0, offset=c.norm_offset)
        x = jax.lax.optimization_barrier(x)  # see Block
        if c.tie_embeddings:
            head = embed
        else:
            name = "lm_head" if pk is None else "lm_head_packed"
            head = _weight(self, name, (v, c.dim) if pk is None else pk.shape(v, c.dim), self.dtype, normal, qz)
        if pk is None:
            logits = quant.einsum("VD,DBT->VBT", head, x)
        else:
            logits = pk.product(head, x.reshape(c.dim, -1), v).reshape(v, *x.shape[1:])
        logits = logits.astype(jnp.float32)
        if c.final_logit_softcap is not None:
            logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        return (logits if vocab_major else logits.transpose(1, 2, 0)), tuple(kv)


def abstract_params(
    config: ModelConfig, dtype: Any, fuse_qkv: bool = False, packed: Packed | None = None, quantize: str = "none"
) -> tuple[Any, Any]:
    """(abstract per-layer param tree of ShapeDtypeStruct, matching tree of logical PartitionSpecs)."""
    model = Transformer(config, dtype, fuse_qkv=fuse_qkv, packed=packed, quantize=quantize)
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)["params"]
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def init_params(config: ModelConfig, dtype: Any, seed: int = 0) -> Any:
    """Random parameters in the per-layer layout the model runs on (tests and benchmarks)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(Transformer(config, dtype).init(jax.random.key(seed), tokens, tokens)["params"])


def stacked_axes(config: ModelConfig) -> dict[str, Any]:
    """Logical axes of the checkpoint layout: layer params stacked under "layers" with a leading "layers" axis."""
    layer = [n for n in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")]
    if config.qkv_bias:
        layer += ["bq", "bk", "bv"]
    if config.qk_norm:
        layer += ["q_norm", "k_norm"]
    if config.sandwich_norms:
        layer += ["post_attn_norm", "post_mlp_norm"]
    tree: dict[str, Any] = {"embed": CHECKPOINT_AXES["embed"], "final_norm": CHECKPOINT_AXES["final_norm"]}
    if not config.tie_embeddings:
        tree["lm_head"] = CHECKPOINT_AXES["lm_head"]
    tree["layers"] = {n: ("layers", *CHECKPOINT_AXES[n]) for n in layer}
    return tree


def to_runtime(name: str, array: Any) -> Any:
    """One checkpoint array (unstacked) in the layout the model runs on."""
    return array.transpose(TO_RUNTIME[name]) if name in TO_RUNTIME else array


def to_checkpoint(name: str, array: Any) -> Any:
    """One runtime array in the checkpoint layout (the inverse of `to_runtime`)."""
    return array.transpose(np.argsort(TO_RUNTIME[name])) if name in TO_RUNTIME else array


def checkpoint_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape of a runtime array of `shape`."""
    return tuple(shape[i] for i in np.argsort(TO_RUNTIME[name])) if name in TO_RUNTIME else shape


def fuse_layer(layer: dict[str, Any]) -> dict[str, Any]:
    """One layer's runtime arrays with the parts of each FUSED weight stacked into it (jnp: works inside jit)."""
    out = dict(layer)
    for fused, parts in FUSED.items():
        if all(p in out for p in parts):
            out[fused] = jnp.stack([out.pop(p) for p in parts])
    return out


def fuse_qkv_layer(layer: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """One layer's runtime arrays with wq [N, H, D] and wkv [2, K, H, D] stacked into the rows of one wqkv
    [(N + 2K) * H, D] (and bq, bkv into bqkv): q, k and v as one product (jnp: works inside jit).

    Measured on XLA:CPU (SmolLM2, real decode step): 24.7-25.0 -> 22.8-23.0 ms at one slot, where each
    matrix-vector product pays a fixed cost beyond its bytes; 64 slots unchanged (~100 ms). Only for meshes where no
    axis splits q or kv heads (the engine decides): under tensor parallelism the q rows and the k/v rows would be
    split by different rules (kv heads often do not divide the tensor axis when q heads do), so there wq and wkv
    stay apart."""
    out = dict(layer)
    if "wq" in out:
        out["wqkv"] = jnp.concatenate([out.pop("wq").reshape(-1, config.dim), out.pop("wkv").reshape(-1, config.dim)])
    if "bq" in out:
        out["bqkv"] = jnp.concatenate([out.pop("bq").reshape(-1), out.pop("bkv").reshape(-1)])
    return out


def _take(params: dict[str, Any], name: str) -> Any:
    """Pops weight `name` from a flat param dict: the array, or an engine.quant.Int8 when its `name`_scale is there."""
    values = params.pop(name)
    scale = params.pop(f"{name}_scale", None)
    return values if scale is None else quant.Int8(values, scale)


def _put(params: dict[str, Any], name: str, w: Any) -> None:
    """Stores weight `name` in a flat param dict (an Int8 as `name` and `name`_scale); the inverse of `_take`."""
    if isinstance(w, quant.Int8):
        params[name], params[f"{name}_scale"] = w.values, w.scale
    else:
        params[name] = w


def quantize_weights(params: dict[str, Any], quantize: str) -> dict[str, Any]:
    """One layer's (or the top level's) runtime arrays with the weights QUANTIZED names in `quantize`'s form: "int8"
    replaces each by int8 values + `<name>_scale` (engine.quant.quantize); "none" leaves them. Unpacked weights
    only. jnp: works inside jit."""
    out = dict(params)
    if quantize == "none":
        return out
    for name, num_in in QUANTIZED.items():
        if name in out and f"{name}_scale" not in out and not name.endswith("_packed"):
            _put(out, name, quant.quantize(out.pop(name), num_in))
    return out


def dequantize_weights(params: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The inverse of `quantize_weights` (the rounding stays): every int8 weight back to a dense array in `dtype`."""
    out = dict(params)
    for name in [n for n in out if f"{n}_scale" in out]:
        out[name] = quant.dequantize(_take(out, name), dtype)
    return out


def pack_layer(layer: dict[str, Any], config: ModelConfig, packed: Packed) -> dict[str, Any]:
    """One layer's runtime arrays (q/k/v fused, see `fuse_qkv_layer`) with the linear weights in `packed`'s layout,
    under the names `<name>_packed` (int8 weights with their scales, see `quantize_weights`; jnp: works inside
    jit)."""
    out = dict(layer)
    for name, (rows, cols) in packed_shapes(config).items():
        pack = packed.pack_gated if name == "w_gate_up" else packed.pack
        _put(out, f"{name}_packed", pack(_take(out, name).reshape(rows, cols)))
    return out


def unpack_layer(layer: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """The inverse of `pack_layer` (q/k/v stay fused); takes arrays, or ShapeDtypeStructs for their shapes."""
    out = dict(layer)
    runtime = {"wo": (config.dim, config.num_heads, config.head_dim), "w_gate_up": (2, config.mlp_dim, config.dim)}
    for name, (rows, cols) in packed_shapes(config).items():
        if f"{name}_packed" in out:
            a = _take(out, f"{name}_packed")
            shape = runtime.get(name, (rows, cols))
            if isinstance(a, jax.ShapeDtypeStruct):
                out[name] = jax.ShapeDtypeStruct(shape, a.dtype)
            elif name == "w_gate_up":
                _put(out, name, Packed.unpack_gated(a, config.mlp_dim).reshape(*shape))
            else:
                _put(out, name, Packed.unpack(a, rows).reshape(*shape))
    return out


def _rows(a: Any, start: int, stop: int | None, shape: tuple[int, ...]) -> Any:
    """a[start:stop] reshaped to `shape`; for a ShapeDtypeStruct, the struct of that result."""
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(shape, a.dtype)
    return a[start:stop].reshape(shape)


def runtime_head(
    top: dict[str, Any], config: ModelConfig, packed: Packed | None, quantize: str = "none"
) -> dict[str, Any]:
    """The arrays outside the layers (embed, lm_head, final_norm), in whichever layout, converted to the one a model
    with `packed` and `quantize` runs: the output head packed (a tied embedding packed whole; the model gathers the
    embedding rows from its panels). jnp: works inside jit."""
    out = unpack_head(top, config)
    out = quantize_weights(dequantize_weights(out, out["final_norm"].dtype), quantize)
    if packed is not None:
        name = "embed" if config.tie_embeddings else "lm_head"
        _put(out, f"{name}_packed", packed.pack(_take(out, name)))
    return out


def unpack_head(top: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """The inverse of `runtime_head`'s packing: embed / lm_head [V, D] again; arrays or ShapeDtypeStructs."""
    out = dict(top)
    for name in ("embed", "lm_head"):
        if f"{name}_packed" in out:
            a = _take(out, f"{name}_packed")
            shape = (config.vocab_size, config.dim)
            if isinstance(a, jax.ShapeDtypeStruct):
                out[name] = jax.ShapeDtypeStruct(shape, a.dtype)
            else:
                _put(out, name, Packed.unpack(a, shape[0]))
    return out


def _split_qkv(layer: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """The inverse of `fuse_qkv_layer`: wqkv -> wq, wkv (and bqkv -> bq, bkv); arrays or ShapeDtypeStructs."""
    out = dict(layer)
    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.dim
    if "wqkv" in out:
        a = out.pop("wqkv")
        out["wq"], out["wkv"] = _rows(a, 0, n * h, (n, h, d)), _rows(a, n * h, None, (2, k, h, d))
    if "bqkv" in out:
        a = out.pop("bqkv")
        out["bq"], out["bkv"] = _rows(a, 0, n * h, (n, h)), _rows(a, n * h, None, (2, k, h))
    return out


def runtime_layer(
    layer: dict[str, Any], config: ModelConfig, fuse_qkv: bool, packed: Packed | None, quantize: str = "none"
) -> dict[str, Any]:
    """One layer's runtime arrays, in whichever of the layouts above (fused q/k/v or not, packed or not, int8 or
    not), converted to the one a model with these `fuse_qkv` / `packed` / `quantize` settings runs (jnp: works
    inside jit). An int8 source is dequantized first and quantized again when asked: per-channel int8 is a fixed
    point of that round trip, so converting an int8 engine's weights loses nothing more."""
    out = dequantize_weights(unpack_layer(layer, config), layer["attn_norm"].dtype)
    if fuse_qkv and "wq" in out:
        out = fuse_qkv_layer(out, config)
    elif not fuse_qkv and "wqkv" in out:
        out = _split_qkv(out, config)
    out = quantize_weights(out, quantize)
    return pack_layer(out, config, packed) if packed is not None else out


def unfuse_layer(layer: dict[str, Any], config: ModelConfig | None = None) -> dict[str, Any]:
    """One layer's runtime arrays with each fused weight split back into its parts (the inverse of `fuse_layer`,
    `fuse_qkv_layer` and `pack_layer`; splitting wqkv or unpacking needs `config`); takes arrays, or
    ShapeDtypeStructs for their shapes."""
    out = dict(layer)
    if any(name.endswith("_packed") for name in out):
        if config is None:
            raise ValueError("unpacking weights needs the model config")
        out = unpack_layer(out, config)
    if any(name.endswith("_scale") for name in out):
        out = dequantize_weights(out, out["attn_norm"].dtype)
    if "wqkv" in out or "bqkv" in out:
        if config is None:
            raise ValueError("splitting wqkv back into wq and wkv needs the model config")
        out = _split_qkv(out, config)
    for fused, parts in FUSED.items():
        if fused in out:
            a = out.pop(fused)
            for i, p in enumerate(parts):
                out[p] = jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a[i]
    return out


def unstack_layers(stacked: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Checkpoint layout (layers stacked) -> the per-layer layout the model runs on. Works inside jit."""
    out = {k: to_runtime(k, v) for k, v in stacked.items() if k != "layers"}
    for i in range(num_layers):
        out[layer_name(i)] = fuse_layer({name: to_runtime(name, arr[i]) for name, arr in stacked["layers"].items()})
    return out


def stack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Per-layer layout -> checkpoint layout (layers stacked on a leading axis)."""
    layers = [unfuse_layer({k: np.asarray(v) for k, v in params[layer_name(i)].items()}) for i in range(num_layers)]
    out = {k: to_checkpoint(k, np.asarray(v)) for k, v in params.items() if not k.startswith("layer_")}
    out["layers"] = {n: np.stack([to_checkpoint(n, layer[n]) for layer in layers]) for n in layers[0]}
    return out
