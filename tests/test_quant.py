"""engine.quant: the int8 weight type and the product helpers that take it, against dequantize-then-dense products
computed in float64 by numpy (float32 and bfloat16 activations)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import quant


def _weight(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    w[0] *= 20.0  # channels of very different ranges: per-channel scales must follow each
    return w


def test_quantize_rounds_to_nearest_within_half_a_step_per_channel():
    w = _weight((6, 40))
    w[3] = 0.0  # an all-zero channel must not divide by zero
    q = quant.quantize(jnp.asarray(w))
    assert q.values.dtype == jnp.int8 and q.scale.shape == (6,)
    scale = np.asarray(q.scale)
    np.testing.assert_allclose(scale[[0, 1, 2, 4, 5]], np.abs(w[[0, 1, 2, 4, 5]]).max(axis=1) / 127, rtol=1e-6)
    err = np.abs(np.asarray(quant.dequantize(q)) - w)
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert np.asarray(quant.dequantize(q))[3].tolist() == [0.0] * 40
    # every channel uses the full range: its largest weight maps to +-127
    assert (np.abs(np.asarray(q.values))[[0, 1, 2, 4, 5]].max(axis=1) == 127).all()


def test_quantize_over_two_contracted_axes():
    w = _weight((5, 3, 4))  # wo's runtime [D, N, H]: N and H are contracted
    q = quant.quantize(jnp.asarray(w), num_in=2)
    assert q.scale.shape == (5,) and q.num_in == 2
    np.testing.assert_allclose(np.asarray(q.scale), np.abs(w).reshape(5, -1).max(axis=1) / 127, rtol=1e-6)
    flat = q.reshape(5, 12)
    assert flat.values.shape == (5, 12) and flat.scale.shape == (5,)
    with pytest.raises(ValueError, match="splits the output axes"):
        q.reshape(10, 6)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_products_equal_the_dequantized_dense_products(dtype, rtol):
    rng = np.random.default_rng(1)
    w2 = quant.quantize(jnp.asarray(_weight((24, 32))))
    w3 = quant.quantize(jnp.asarray(_weight((2, 12, 32), seed=2)))
    y = jnp.asarray(rng.normal(size=(32, 7)), dtype)

    def reference(w, spec):
        return np.einsum(spec, np.asarray(quant.dequantize(w), np.float64), np.asarray(y, np.float64))

    got = quant.matmul(w2, y)
    assert got.dtype == dtype and got.shape == (24, 7)
    np.testing.assert_allclose(np.asarray(got, np.float64), reference(w2, "OI,IM->OM"), rtol=rtol, atol=rtol)
    got = quant.einsum("CFD,DM->CFM", w3, y)
    assert got.dtype == dtype and got.shape == (2, 12, 7)
    np.testing.assert_allclose(np.asarray(got, np.float64), reference(w3, "CFD,DM->CFM"), rtol=rtol, atol=rtol)
    # regrouped output axes give the same product
    np.testing.assert_allclose(
        np.asarray(quant.matmul(w3.reshape(24, 32), y), np.float64).reshape(2, 12, 7),
        np.asarray(got, np.float64),
        rtol=rtol,
        atol=rtol,
    )


def test_take_rows_is_the_dequantized_embedding():
    w = quant.quantize(jnp.asarray(_weight((50, 16))))
    index = jnp.asarray([0, 7, 7, 49])
    got = quant.take_rows(w, index, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(quant.dequantize(w))[[0, 7, 7, 49]], rtol=1e-6)


def test_dense_weights_pass_through_unchanged():
    w = jnp.asarray(_weight((8, 4)))
    y = jnp.ones((4, 3), jnp.float32)
    np.testing.assert_array_equal(np.asarray(quant.matmul(w, y)), np.asarray(w @ y))
    np.testing.assert_array_equal(np.asarray(quant.take_rows(w, jnp.asarray([2]), jnp.float32)), np.asarray(w[2:3]))


def test_int8_is_a_pytree_that_jit_and_weight_bytes_see():
    q = quant.quantize(jnp.asarray(_weight((16, 64))))
    leaves = jax.tree.leaves(q)
    assert [leaf.dtype for leaf in leaves] == [jnp.dtype(jnp.int8), jnp.dtype(jnp.float32)]
    out = jax.jit(quant.matmul)(q, jnp.ones((64, 2), jnp.float32))
    assert out.shape == (16, 2)
    assert quant.weight_bytes(q) == 16 * 64 + 16 * 4


@pytest.mark.parametrize("out", [5, 32, 70])
def test_panels_round_trip_and_hold_each_row_with_its_scale(out):
    w = quant.quantize(jnp.asarray(_weight((out, 12))))
    packed = quant.pack(w, 32)
    assert packed.values.shape == (-(-out // 32), 12, 32) and packed.scale.shape == (-(-out // 32) * 32,)
    back = quant.unpack(packed, out)
    np.testing.assert_array_equal(np.asarray(back.values), np.asarray(w.values))
    np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(w.scale))
    # row r sits in panel r // 32 at lane r % 32, its scale at r; the padding rows are zero
    r = out - 1
    np.testing.assert_array_equal(np.asarray(packed.values[r // 32, :, r % 32]), np.asarray(w.values[r]))
    assert float(packed.scale[r]) == float(w.scale[r]) and not np.asarray(packed.scale[out:]).any()
    index = jnp.asarray([0, r])
    np.testing.assert_allclose(
        np.asarray(quant.packed_rows(packed, index, jnp.float32)), np.asarray(quant.dequantize(w))[[0, r]]
    )


@pytest.mark.parametrize("f", [16, 23])
def test_gated_panels_interleave_gate_and_up_halves(f):
    w = quant.quantize(jnp.asarray(_weight((2 * f, 8))))
    packed = quant.pack_gated(w, 32)
    assert packed.values.shape == (-(-f // 16), 8, 32)
    # panel 0: lanes 0-15 are gate rows 0-15, lanes 16-31 the up rows 0-15 (rows f.. of the input)
    np.testing.assert_array_equal(np.asarray(packed.values[0, :, 16]), np.asarray(w.values[f]))
    assert float(packed.scale[16]) == float(w.scale[f])
    back = quant.unpack_gated(packed, f)
    np.testing.assert_array_equal(np.asarray(back.values), np.asarray(w.values))
    np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(w.scale))
