"""The Pallas paged decode attention kernels (engine/pallas_attention.py) against `paged_attend_xla`, run in interpret
mode on the CPU: float32 and bfloat16; G = 1, 3, 4; H = 32, 64; P = 16, 64; lengths 0, P - 1, P, a page's last
position, the window's last position and past the window; shuffled, non-contiguous and shared page ids; a sink slot
(table row all 0). Every pool position no slot attends to is poisoned with NaN / inf, and the reference runs on the
same pool with the poison zeroed: a kernel that read a freed page, or the tail of its last page, would differ.
The Triton (GPU) and Mosaic (TPU) lowerings are also checked to build, without the devices, at a 1B-Llama shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.attention import paged_attend_xla
from engine.pallas_attention import paged_attend_pallas, unsupported_reason

# (B, K, G, H, P, W, lengths, sink slots); the pool holds a shuffled subset of ids 1..Np-1 and the tables share some
CASES = {
    "g1_h64_p16": (7, 2, 1, 64, 16, 6, (0, 15, 16, 47, 95, 20, 130), (5,)),
    "g3_h32_p64": (4, 1, 3, 32, 64, 3, (63, 64, 191, 0), (3,)),
    "g4_h64_p64": (3, 2, 4, 64, 64, 2, (1, 127, 500), ()),
}
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def make_case(b, kh, g, h, p, w, lengths, sinks, dtype, seed=0):
    """-> (q, k_pool, v_pool, table, lengths, clean k_pool, clean v_pool): poisoned pools (NaN keys, +/-inf values at
    every position no slot attends to) and the same pools with the poison zeroed."""
    rng = np.random.default_rng(seed)
    num_pages = b * w + 4  # spare pages never named by any table: poisoned whole
    ids = rng.permutation(np.arange(1, num_pages))
    table = ids[: b * w].reshape(b, w).copy()
    if b > 1:  # shared pages: slot 1 reuses slot 0's first page, the last slot slot 0's last page (other offsets)
        table[1, 0] = table[0, 0]
        table[b - 1, w - 1] = table[0, w - 1]
    for s in sinks:
        table[s] = 0
    q = rng.standard_normal((b, kh, g, h)).astype(np.float32)
    k_pool = rng.standard_normal((num_pages, kh, h, p)).astype(np.float32)
    v_pool = rng.standard_normal((num_pages, kh, p, h)).astype(np.float32)
    attended = np.zeros((num_pages, p), bool)
    for slot, length in enumerate(lengths):
        for pos in range(min(length, w * p - 1) + 1):
            attended[table[slot, pos // p], pos % p] = True
    poison = ~attended  # [Np, P]
    clean_k, clean_v = k_pool.copy(), v_pool.copy()
    clean_k.transpose(0, 3, 1, 2)[poison] = 0.0
    clean_v.transpose(0, 2, 1, 3)[poison] = 0.0
    k_pool.transpose(0, 3, 1, 2)[poison] = np.nan
    v_pool.transpose(0, 2, 1, 3)[poison] = np.where(rng.random((int(poison.sum()), kh, h)) < 0.5, np.inf, -np.inf)
    as_dtype = functools.partial(jnp.asarray, dtype=dtype)
    return (
        as_dtype(q),
        as_dtype(k_pool),
        as_dtype(v_pool),
        jnp.asarray(table, jnp.int32),
        jnp.asarray(lengths, jnp.int32),
        as_dtype(clean_k),
        as_dtype(clean_v),
    )


def check(case, dtype, backend, **options):
    b, kh, g, h, p, w, lengths, sinks = CASES[case]
    q, k_pool, v_pool, table, lens, clean_k, clean_v = make_case(b, kh, g, h, p, w, lengths, sinks, dtype)
    # the reference in float32 on the clean pool (the dtype's own rounding is what the tolerance allows for)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    want = paged_attend_xla(f32(q), f32(clean_k), f32(clean_v), table, lens)
    got = paged_attend_pallas(q, k_pool, v_pool, table, lens, backend=backend, interpret=True, **options)
    assert got.shape == q.shape and got.dtype == q.dtype
    got = np.asarray(got.astype(jnp.float32))
    assert np.isfinite(got).all(), "poison reached the output"
    np.testing.assert_allclose(got, np.asarray(want), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_xla_reference_and_ignores_poison(case, dtype, backend):
    check(case, dtype, backend)


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("gpu", dict(pages_per_block=4)),  # W=6: the last block's tail passes the table's end
        ("gpu", dict(pages_per_block=2, num_splits=4)),  # splits of 2 pages, some empty for short slots
        ("tpu", dict(pages_per_block=4)),  # the last grid step half past W
        ("tpu", dict(pages_per_block=1)),  # one page per grid step
    ],
    ids=["gpu_ppb4", "gpu_splits4", "tpu_ppb4", "tpu_ppb1"],
)
def test_block_and_split_options(backend, options):
    check("g1_h64_p16", jnp.float32, backend, **options)


def test_unsupported_shapes_have_one_line_reasons():
    def args(g=4, h=64, p=16, dtype=jnp.bfloat16, b=2, w=4, np_=9, kh=2):
        return (
            jax.ShapeDtypeStruct((b, kh, g, h), dtype),
            jax.ShapeDtypeStruct((np_, kh, h, p), dtype),
            jax.ShapeDtypeStruct((np_, kh, p, h), dtype),
            jax.ShapeDtypeStruct((b, w), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32),
        )

    for backend in ("gpu", "tpu"):
        assert unsupported_reason(backend, *args()) is None
        assert unsupported_reason(backend, *args(g=3, h=128, p=64, dtype=jnp.float32)) is None
    assert "powers of two" in unsupported_reason("gpu", *args(p=8))
    assert "powers of two" in unsupported_reason("gpu", *args(h=48))
    assert "multiples of 8" in unsupported_reason("tpu", *args(p=12))
    assert "float32/bfloat16" in unsupported_reason("tpu", *args(dtype=jnp.float16))
    assert "backend" in unsupported_reason("cuda", *args())
    reason = unsupported_reason("gpu", *args(b=3)[:3], *args()[3:])
    assert "table" in reason and "\n" not in reason
    q, k_pool, v_pool, table, lengths = (jnp.zeros(a.shape, a.dtype) for a in args(p=8))
    with pytest.raises(ValueError, match="powers of two"):
        paged_attend_pallas(q, k_pool, v_pool, table, lengths, backend="gpu", interpret=True)


def _lower(backend, platform, dtype):
    """Lowers the kernel for `platform` at a 1B-Llama decode shape (K=8, G=4, H=64, P=16, 2048 positions)."""
    b, kh, g, h, p, w = 8, 8, 4, 64, 16, 128
    np_ = b * w + 1
    avals = (
        jax.ShapeDtypeStruct((b, kh, g, h), dtype),
        jax.ShapeDtypeStruct((np_, kh, h, p), dtype),
        jax.ShapeDtypeStruct((np_, kh, p, h), dtype),
        jax.ShapeDtypeStruct((b, w), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    fn = jax.jit(functools.partial(paged_attend_pallas, backend=backend))
    return fn.trace(*avals).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gpu_kernel_lowers_to_triton(dtype):
    """The Pallas -> Triton IR lowering runs without a GPU (it checks block sizes, dot shapes, indexing); Triton's own
    compilation to PTX happens only on a GPU (scripts/device_check.sh)."""
    assert "paged_attend_gpu" in _lower("gpu", "cuda", dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_tpu_kernel_lowers_to_mosaic(dtype):
    """The Pallas -> Mosaic lowering for a TPU v5e (an abstract device: no TPU here); Mosaic's layout passes run only
    in the TPU compiler, on a TPU."""
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        assert "tpu_custom_call" in _lower("tpu", "tpu", dtype)
