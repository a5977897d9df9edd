"""Weight-only int8 quantization as a type: an `Int8` weight is a pytree (int8 values + a float32 scale per output
channel) that the model's product helpers (`matmul`, `einsum`, `take_rows`) accept wherever they accept an array.

Layout. Every runtime weight of the model is [out..., in...]: output axes first, the contracted (input) axes last
(engine.model stores linear weights [out, in] for a plain [out, in] x [in, M] product). `Int8.scale` has the output
axes only. Per-output-channel scales commute with the contraction:

    sum_i (q[o, i] * s[o]) * y[i, m] = s[o] * sum_i q[o, i] * y[i, m]

so a product runs on the int8 values converted to the activations' dtype and scales its [out..., M] result; the
activations stay float32 / bfloat16 (weight-only). On TPU and GPU XLA fuses the int8 -> bf16 convert into the dot's
operand read, so a decode step reads one byte per weight instead of two (bfloat16) or four (float32).

Symmetric, round to nearest: s[o] = max_i |w[o, i]| * (1 / 127), q = round(w * (1 / s)), |w - q * s| <= s / 2
(within float32 rounding). The reciprocals are written out because XLA:CPU turns a division into a product with the
reciprocal anyway (LLVM's `arcp`) while numpy divides: spelled as products, `quantize` (jnp) and `quantize_host`
(numpy, what the checkpoint loaders run) give the same values and scales bit for bit (tested on XLA:CPU; any backend
that rounds a float32 reciprocal and product as IEEE does the same).

The scales' logical axes are the weight's output axes (engine.model.PARAM_AXES), so the sharding rules apply to both
parts unchanged: a weight split over its output axis splits its scales the same way; one split over its input axis
keeps its scales whole on every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

QUANTIZATIONS = ("none", "int8")
"""Weight formats an engine can run (EngineConfig.quantize)."""

_INV_127 = np.float32(1) / np.float32(127)


@struct.dataclass
class Int8:
    """An int8 weight: values [out..., in...] int8, scale [out...] float32, w ~= values * scale[..., None...]."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def num_in(self) -> int:
        """How many trailing (contracted) axes the values have beyond the scale's."""
        return self.values.ndim - self.scale.ndim

    def reshape(self, *shape: int) -> Int8:
        """The same weight with its axes regrouped; the output axes must stay a prefix of the new shape whose
        product is the scale's size (e.g. wo [D, N, H] -> [D, N * H], or wq [N, H, D] -> [N * H, D])."""
        out_size = int(np.prod(self.scale.shape))
        n_out, size = 0, 1
        while size < out_size:
            size *= shape[n_out]
            n_out += 1
        if size != out_size:
            raise ValueError(f"reshape {self.values.shape} -> {shape} splits the output axes {self.scale.shape}")
        return Int8(self.values.reshape(shape), self.scale.reshape(shape[:n_out]))


Weight = jax.Array | Int8


def quantize(w: jax.Array, num_in: int = 1) -> Int8:
    """Symmetric per-output-channel int8 over the trailing `num_in` (contracted) axes (jnp: works inside jit). An
    all-zero channel gets scale 1, so dequantizing never divides by zero."""
    w32 = w.astype(jnp.float32)
    axes = tuple(range(w.ndim - num_in, w.ndim))
    amax = jnp.max(jnp.abs(w32), axis=axes)
    scale = jnp.where(amax > 0, amax * _INV_127, 1.0)
    inverse = (1.0 / scale).reshape(scale.shape + (1,) * num_in)
    values = jnp.clip(jnp.round(w32 * inverse), -127, 127).astype(jnp.int8)
    return Int8(values, scale)


def quantize_host(w: np.ndarray, num_in: int = 1) -> Int8:
    """`quantize` in numpy, on the host, with numpy arrays in the result: the same scales and values bit for bit
    (tests/test_checkpoints_int8.py), for loaders that quantize a checkpoint tensor by tensor without a device."""
    w32 = np.asarray(w, np.float32)
    axes = tuple(range(w32.ndim - num_in, w32.ndim))
    amax = np.max(np.abs(w32), axis=axes)
    scale = np.where(amax > 0, amax * _INV_127, np.float32(1)).astype(np.float32)
    inverse = (np.float32(1) / scale).reshape(scale.shape + (1,) * num_in)
    values = np.clip(np.round(w32 * inverse), -127, 127).astype(np.int8)
    return Int8(values, scale)


def dequantize(w: Weight, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The weight as a dense array in `dtype` (an array is returned cast)."""
    if not isinstance(w, Int8):
        return w.astype(dtype)
    scale = w.scale.reshape(w.scale.shape + (1,) * w.num_in)
    return (w.values.astype(jnp.float32) * scale).astype(dtype)


def _scaled(out: jax.Array, w: Int8, dtype: jnp.dtype) -> jax.Array:
    """A product's result [out..., rest...] (float32) times the weight's scale over its leading output axes."""
    return (out * w.scale.reshape(w.scale.shape + (1,) * (out.ndim - w.scale.ndim))).astype(dtype)


def matmul(w: Weight, y: jax.Array) -> jax.Array:
    """w [out, in] x y [in, M] -> [out, M] in y's dtype."""
    if not isinstance(w, Int8):
        return w @ y
    out = jnp.dot(w.values.astype(y.dtype), y, preferred_element_type=jnp.float32)
    return _scaled(out, w, y.dtype)


def einsum(spec: str, w: Weight, y: jax.Array) -> jax.Array:
    """jnp.einsum(spec, w, y) where the result's leading axes are w's output axes, in order (every weight product of
    engine.model has that form, e.g. "CFD,DM->CFM"), in y's dtype."""
    if not isinstance(w, Int8):
        return jnp.einsum(spec, w, y)
    out = jnp.einsum(spec, w.values.astype(y.dtype), y, preferred_element_type=jnp.float32)
    return _scaled(out, w, y.dtype)


def take_rows(w: Weight, index: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows `index` [M] of a [V, D] weight (an embedding lookup) -> [M, D] in `dtype`."""
    if not isinstance(w, Int8):
        return jnp.take(w, index, axis=0)
    rows = jnp.take(w.values, index, axis=0).astype(jnp.float32)
    return (rows * jnp.take(w.scale, index, axis=0)[:, None]).astype(dtype)


def weight_bytes(abstract_params) -> int:
    """Bytes of a parameter tree as stored (int8 values count one byte each, their scales four)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(abstract_params))


def pack(w: Int8, rows: int) -> Int8:
    """An int8 [out, in] weight in panels of `rows` rows for the CPU kernel (engine.kernels.linear_int8): values
    [ceil(out / rows), in, rows] (each panel's rows interleaved per input feature, the rows past `out` zero),
    scale [ceil(out / rows) * rows] (zero past `out`). jnp: works inside jit."""
    out, inp = w.values.shape
    panels = -(-out // rows)
    values = jnp.pad(w.values, ((0, panels * rows - out), (0, 0))).reshape(panels, rows, inp).transpose(0, 2, 1)
    return Int8(values, jnp.pad(w.scale, (0, panels * rows - out)))


def pack_gated(w: Int8, rows: int) -> Int8:
    """Gate and up rows [2F, in] (gate first) in panels of `rows` rows: each panel holds rows / 2 gate rows, then the
    same rows of up, so the kernel's gated product writes silu(gate x) * (up x) [F, M]. jnp: works inside jit."""
    f, half = w.values.shape[0] // 2, rows // 2
    panels = -(-f // half)

    def split(a: jax.Array) -> jax.Array:  # [2F, ...] -> [panels, rows, ...]: half gate rows, then half up rows
        parts = [jnp.pad(p, ((0, panels * half - f),) + ((0, 0),) * (a.ndim - 1)) for p in (a[:f], a[f:])]
        return jnp.concatenate([p.reshape(panels, half, *a.shape[1:]) for p in parts], axis=1)

    return Int8(split(w.values).transpose(0, 2, 1), split(w.scale).reshape(-1))


def unpack(w: Int8, out: int) -> Int8:
    """The inverse of `pack`: -> [out, in]."""
    values = w.values.transpose(0, 2, 1).reshape(-1, w.values.shape[1])[:out]
    return Int8(values, w.scale[:out])


def unpack_gated(w: Int8, f: int) -> Int8:
    """The inverse of `pack_gated`: -> [2F, in] (gate first)."""
    half = w.values.shape[2] // 2
    rows = w.values.transpose(0, 2, 1)  # [panels, rows, in]
    scale = w.scale.reshape(rows.shape[0], -1)
    values = jnp.concatenate(
        [rows[:, :half].reshape(-1, rows.shape[2])[:f], rows[:, half:].reshape(-1, rows.shape[2])[:f]]
    )
    return Int8(values, jnp.concatenate([scale[:, :half].reshape(-1)[:f], scale[:, half:].reshape(-1)[:f]]))


def packed_rows(w: Int8, index: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows `index` [M] of a packed [V, D] weight -> [M, D] in `dtype` (an embedding lookup in a packed tied head)."""
    rows = w.values.shape[2]
    values = w.values[index // rows, :, index % rows].astype(jnp.float32)
    return (values * w.scale[index][:, None]).astype(dtype)
