"""The Pallas paged decode attention kernels (engine/pallas_attention.py) against `paged_attend_xla`, run in interpret
mode on the CPU: float32 and bfloat16; G = 1, 3, 4; H = 32, 64; P = 16, 64; lengths 0, P - 1, P, a page's last
position, the window's last position and past the window; shuffled, non-contiguous and shared page ids; a sink slot
(table row all 0). Every pool position no slot attends to is poisoned with NaN / inf, and the reference runs on the
same pool with the poison zeroed: a kernel that read a freed page, or the tail of its last page, would differ.

int8 pools (Int8Pages) run those cases on each backend in both dtypes, fewer of them (P = 16 on GPU only: the TPU
kernel wants P % 32 == 0 for int8), and one with K = 16 (the TPU kernel's scale blocks then hold 8 kv heads of 16).
Their values cannot be NaN, so the poison goes into the scales (NaN key scales, +/-inf value scales), and the
reference runs on the same int8 values with those scales zeroed. Scales vary per vector (magnitudes 0.25 to 4), so a
kernel that applied a wrong head's or position's scale would differ.
The Triton (GPU) and Mosaic (TPU) lowerings are also checked to build, without the devices, at a 1B-Llama shape,
for float and int8 pools.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.attention import Int8Pages, paged_attend_xla, quantize_kv
from engine.pallas_attention import paged_attend_pallas, unsupported_reason

# (B, K, G, H, P, W, lengths, sink slots); the pool holds a shuffled subset of ids 1..Np-1 and the tables share some
CASES = {
    "g1_h64_p16": (7, 2, 1, 64, 16, 6, (0, 15, 16, 47, 95, 20, 130), (5,)),
    "g3_h32_p64": (4, 1, 3, 32, 64, 3, (63, 64, 191, 0), (3,)),
    "g4_h64_p64": (3, 2, 4, 64, 64, 2, (1, 127, 500), ()),
}
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# int8 pools: the float cases, and K = 16 (the TPU kernel's scale blocks then hold 8 of the 16 kv heads)
INT8_CASES = {**CASES, "k16_g2_h32_p32": (2, 16, 2, 32, 32, 3, (40, 95), ())}
# (case, backend, dtype): each backend in both dtypes, a few runs in all (interpret mode is slow); P = 16 on GPU only
# (the TPU kernel wants P % 32 == 0 for int8), K = 16 on TPU only (where it changes the scale blocks)
INT8_RUNS = [
    ("g1_h64_p16", "gpu", jnp.float32),
    ("g1_h64_p16", "gpu", jnp.bfloat16),
    ("g3_h32_p64", "gpu", jnp.float32),
    ("g4_h64_p64", "gpu", jnp.bfloat16),
    ("g3_h32_p64", "tpu", jnp.float32),  # K = 1: the TPU kernel's scale blocks are one row
    ("g3_h32_p64", "tpu", jnp.bfloat16),
    ("g4_h64_p64", "tpu", jnp.float32),  # K = 2: scale blocks of both kv heads
    ("k16_g2_h32_p32", "tpu", jnp.bfloat16),
]


def page_table(rng, b, w, sinks, num_pages):
    """A [B, W] table of shuffled page ids 1..Np-1, with shared pages and sink slots (rows all 0)."""
    ids = rng.permutation(np.arange(1, num_pages))
    table = ids[: b * w].reshape(b, w).copy()
    if b > 1:  # shared pages: slot 1 reuses slot 0's first page, the last slot slot 0's last page (other offsets)
        table[1, 0] = table[0, 0]
        table[b - 1, w - 1] = table[0, w - 1]
    for s in sinks:
        table[s] = 0
    return table


def unattended(table, lengths, num_pages, p):
    """[Np, P] True at every (page, offset) no slot attends to: what the tests poison."""
    w = table.shape[1]
    attended = np.zeros((num_pages, p), bool)
    for slot, length in enumerate(lengths):
        for pos in range(min(length, w * p - 1) + 1):
            attended[table[slot, pos // p], pos % p] = True
    return ~attended


def make_case(b, kh, g, h, p, w, lengths, sinks, dtype, seed=0):
    """-> (q, k_pool, v_pool, table, lengths, clean k_pool, clean v_pool): poisoned pools (NaN keys, +/-inf values at
    every position no slot attends to) and the same pools with the poison zeroed."""
    rng = np.random.default_rng(seed)
    num_pages = b * w + 4  # spare pages never named by any table: poisoned whole
    table = page_table(rng, b, w, sinks, num_pages)
    q = rng.standard_normal((b, kh, g, h)).astype(np.float32)
    k_pool = rng.standard_normal((num_pages, kh, h, p)).astype(np.float32)
    v_pool = rng.standard_normal((num_pages, kh, p, h)).astype(np.float32)
    poison = unattended(table, lengths, num_pages, p)  # [Np, P]
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


def make_int8_case(b, kh, g, h, p, w, lengths, sinks, dtype, seed=0):
    """-> (q, k_pool, v_pool, table, lengths, clean k_pool, clean v_pool) with Int8Pages pools, quantized per vector
    (as the engine writes them) from vectors of varied magnitudes: the pools' scales are poisoned (NaN for keys,
    +/-inf for values) at every position no slot attends to, the clean pools have the same values, those scales 0."""
    rng = np.random.default_rng(seed)
    num_pages = b * w + 4
    table = page_table(rng, b, w, sinks, num_pages)
    q = jnp.asarray(rng.standard_normal((b, kh, g, h)), dtype)

    def vectors():  # [Np, K, P, H], each vector its own magnitude (0.25 to 4), so each its own scale
        x = rng.standard_normal((num_pages, kh, p, h)) * np.exp2(rng.uniform(-2, 2, (num_pages, kh, p, 1)))
        return quantize_kv(jnp.asarray(x, jnp.float32))

    k_values, k_scale = vectors()
    v_values, v_scale = vectors()
    k_values = k_values.transpose(0, 1, 3, 2)  # keys are stored [Np, K, H, P]
    poison = jnp.asarray(unattended(table, lengths, num_pages, p))[:, None, :]  # [Np, 1, P]
    signs = jnp.asarray(np.where(rng.random(v_scale.shape) < 0.5, np.inf, -np.inf), v_scale.dtype)
    zero = jnp.zeros((), k_scale.dtype)
    return (
        q,
        Int8Pages(k_values, jnp.where(poison, jnp.asarray(np.nan, k_scale.dtype), k_scale)),
        Int8Pages(v_values, jnp.where(poison, signs, v_scale)),
        jnp.asarray(table, jnp.int32),
        jnp.asarray(lengths, jnp.int32),
        Int8Pages(k_values, jnp.where(poison, zero, k_scale)),
        Int8Pages(v_values, jnp.where(poison, zero, v_scale)),
    )


def check(case, dtype, backend, int8=False, **options):
    b, kh, g, h, p, w, lengths, sinks = (INT8_CASES if int8 else CASES)[case]
    make = make_int8_case if int8 else make_case
    q, k_pool, v_pool, table, lens, clean_k, clean_v = make(b, kh, g, h, p, w, lengths, sinks, dtype)
    # the reference in float32 on the clean pool (the dtype's own rounding is what the tolerance allows for); an int8
    # pool's values are exact in either dtype, so the reference reads the same Int8Pages, only its poison zeroed
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    if int8:
        want = paged_attend_xla(f32(q), clean_k, clean_v, table, lens)
    else:
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


@pytest.mark.parametrize(
    ("case", "backend", "dtype"),
    INT8_RUNS,
    ids=[f"{c}-{b}-{'f32' if d == jnp.float32 else 'bf16'}" for c, b, d in INT8_RUNS],
)
def test_int8_pool_matches_xla_reference_and_ignores_poisoned_scales(case, backend, dtype):
    check(case, dtype, backend, int8=True)


@pytest.mark.parametrize(
    ("case", "backend", "options"),
    [
        ("g1_h64_p16", "gpu", dict(pages_per_block=4, num_splits=2)),  # a block's tail past W; splits of 3 pages
        ("k16_g2_h32_p32", "tpu", dict(pages_per_block=2)),  # W=3: the last grid step half past W
    ],
    ids=["gpu_ppb4_splits2", "tpu_ppb2"],
)
def test_int8_block_and_split_options(case, backend, options):
    check(case, jnp.bfloat16, backend, int8=True, **options)


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


def int8_pools(np_=9, kh=2, h=64, p=16, values=jnp.int8, scale=jnp.bfloat16, scale_p=None):
    """Abstract Int8Pages (k, v): values [Np, K, H, P] / [Np, K, P, H], scales [Np, K, P] (or [Np, K, scale_p])."""
    scale_shape = (np_, kh, scale_p or p)
    return (
        Int8Pages(jax.ShapeDtypeStruct((np_, kh, h, p), values), jax.ShapeDtypeStruct(scale_shape, scale)),
        Int8Pages(jax.ShapeDtypeStruct((np_, kh, p, h), values), jax.ShapeDtypeStruct(scale_shape, scale)),
    )


def test_int8_unsupported_shapes_have_one_line_reasons():
    def args(dtype=jnp.bfloat16, g=4, **pools):
        h = pools.get("h", 64)
        q = jax.ShapeDtypeStruct((2, 2, g, h), dtype)
        return (q, *int8_pools(**pools), jax.ShapeDtypeStruct((2, 4), jnp.int32))

    for dtype in (jnp.float32, jnp.bfloat16):
        assert unsupported_reason("gpu", *args(dtype)) is None
        assert unsupported_reason("tpu", *args(dtype, p=64)) is None
    assert unsupported_reason("gpu", *args(jnp.float16)) is None
    assert unsupported_reason("tpu", *args(h=128, p=32, scale=jnp.float32)) is None
    reasons = [
        ("multiples of 32", unsupported_reason("tpu", *args())),  # P = 16: half an int8 tile's rows
        ("multiples of 32", unsupported_reason("tpu", *args(h=48, p=64))),
        ("powers of two", unsupported_reason("gpu", *args(p=8))),
        ("must be int8", unsupported_reason("gpu", *args(values=jnp.uint8))),
        ("scales must be [Np, K, P]", unsupported_reason("gpu", *args(scale_p=8))),
        ("scales must be float32/bfloat16", unsupported_reason("tpu", *args(p=64, scale=jnp.int8))),
    ]
    for want, reason in reasons:
        assert want in reason and "\n" not in reason, (want, reason)
    q, (k_pool, _), table = args()[0], int8_pools(), args()[3]
    v_float = jax.ShapeDtypeStruct((9, 2, 16, 64), jnp.bfloat16)
    assert "both be Int8Pages" in unsupported_reason("gpu", q, k_pool, v_float, table)


def _lower(backend, platform, dtype, int8=False, p=16):
    """Lowers the kernel for `platform` at a 1B-Llama decode shape (K=8, G=4, H=64, P=16, 2048 positions), with
    float pools of `dtype` or (int8) Int8Pages with bfloat16 scales."""
    b, kh, g, h = 8, 8, 4, 64
    w = 2048 // p
    np_ = b * w + 1
    if int8:
        pools = int8_pools(np_, kh, h, p)
    else:
        pools = (jax.ShapeDtypeStruct((np_, kh, h, p), dtype), jax.ShapeDtypeStruct((np_, kh, p, h), dtype))
    avals = (
        jax.ShapeDtypeStruct((b, kh, g, h), dtype),
        *pools,
        jax.ShapeDtypeStruct((b, w), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    fn = jax.jit(functools.partial(paged_attend_pallas, backend=backend))
    return fn.trace(*avals).lower(lowering_platforms=(platform,)).as_text()


# (q dtype, int8 pools)
LOWERINGS = [(jnp.float32, False), (jnp.bfloat16, False), (jnp.float32, True), (jnp.bfloat16, True)]
LOWERING_IDS = ["f32", "bf16", "int8_f32", "int8_bf16"]


@pytest.mark.parametrize(("dtype", "int8"), LOWERINGS, ids=LOWERING_IDS)
def test_gpu_kernel_lowers_to_triton(dtype, int8):
    """The Pallas -> Triton IR lowering runs without a GPU (it checks block sizes, dot shapes, indexing); Triton's own
    compilation to PTX happens only on a GPU (scripts/device_check.sh)."""
    assert "paged_attend_gpu" in _lower("gpu", "cuda", dtype, int8)


@pytest.mark.parametrize(("dtype", "int8"), LOWERINGS, ids=LOWERING_IDS)
def test_tpu_kernel_lowers_to_mosaic(dtype, int8):
    """The Pallas -> Mosaic lowering for a TPU v5e (an abstract device: no TPU here); Mosaic's layout passes run only
    in the TPU compiler, on a TPU. int8 pools at P=64 (the engine's default page size; the TPU kernel takes int8
    pages with P % 32 == 0), where K=8 makes each page's scale block [8, P]: all the kv heads' scales."""
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        assert "tpu_custom_call" in _lower("tpu", "tpu", dtype, int8, p=64 if int8 else 16)
