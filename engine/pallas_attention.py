"""Decode attention over the paged KV pool as Pallas kernels: one for GPUs (Triton lowering), one for TPUs (Mosaic).

Both keep the contract of `engine.attention.paged_attend_xla` (read that module's docstring for the pool layout):
q [B, K, G, H] (pre-scaled) attends to positions [0, lengths[b]] of slot b's pages, found through table [B, W];
scores and softmax in float32, the result in q's dtype. They only attend: the step's new key and value are written
into the pool by XLA (`engine.attention.write_decode_kv`) before the call.

What they add over the XLA formulation is that a slot reads only the pages it uses (ceil((length + 1) / P) of them,
a runtime count) instead of gathering all W pages of its table row, and never materializes the gathered copy. A
position past a slot's length is masked with `where` on the scores *and* on the values, so whatever a freed or
never-written page holds (stale values, NaN, inf) cannot reach the result, even through a page the last block
shares with positions in use.

- GPU (`backend="gpu"`): grid (slots, kv heads[, splits]); each program loops over its pages with a dynamic trip
  count, loads a page id from the table then the page from the pool, and keeps an online softmax in float32 for the
  G query heads of its kv head together. Triton's dots need every dim >= 16 and powers of two, so the query group
  is zero-padded to 16 rows (decode attention is bandwidth bound: the idle rows cost no memory traffic). With
  `num_splits` > 1 each program takes a contiguous share of the pages and the shares are merged in XLA (more
  programs in flight when slots x kv heads is small next to the number of SMs).
- TPU (`backend="tpu"`): scalar prefetch of the table and lengths into SMEM; grid (slots, kv heads, page blocks);
  the index_map picks each page's block through the table, and pages past the length map to the last page in use,
  so the pipeline sees an unchanged block index and issues no copy; their compute is skipped with `pl.when`. The
  online softmax lives in VMEM scratch.

An int8 pool (`engine.attention.Int8Pages`: int8 values in the same layouts, one scale per (page, kv head,
position)) is read as int8, with its scales beside it: each page's values are converted to q's dtype in the kernel,
and the scales are folded into the products as `paged_attend_xla` folds them: scores = (q . k) * k_scale per
position, then the probabilities times v_scale before the value product (the softmax's denominator sums the
probabilities alone). int8 values are always finite, so past a slot's length it is the scales that are masked (a
freed page's scale may be anything), the value scales to 0. On TPU a scale block cannot be one row [1, P] (a
block's second-minor dim must be 8k or whole), so each page brings the scales of 8 kv heads (or all K when
K % 8 != 0) and the kernel picks its head's row.

`unsupported_reason` says in one line why a backend cannot take given shapes (None when it can), so the engine can
choose a kernel automatically and fall back to XLA with a logged reason.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from engine.attention import Int8Pages

NEG_INF = -1e30  # large finite, as in engine.attention: a fully masked block leaves the running max finite
BACKENDS = ("gpu", "tpu")
_GPU_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_TPU_DTYPES = (jnp.float32, jnp.bfloat16)
_GPU_MIN_ROWS = 16  # Triton's smallest dot tile
_TPU_INT8_ROWS = 32  # sublane rows of a TPU int8 tile (32, 128): four int8 rows packed per 32-bit sublane
_TPU_SCALE_ROWS = 8  # smallest second-minor block dim the TPU lowering takes short of the whole dim


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_pages_per_block(backend: str, page_size: int) -> int:
    """Pages one loop iteration (GPU) or grid step (TPU) takes: 64 positions on GPU (enough loads in flight per
    program without spilling registers), 512 on TPU (a grid step costs ~0.35 us, so steps must be few and large)."""
    return max(1, (64 if backend == "gpu" else 512) // page_size)


def unsupported_reason(backend, q, k_pool, v_pool, table, lengths=None) -> str | None:
    """None if `backend`'s kernel takes these operands (arrays or ShapeDtypeStructs; the pools may be Int8Pages of
    either), else a one-line reason."""
    if backend not in BACKENDS:
        return f"backend must be one of {BACKENDS}, got {backend!r}"
    int8 = isinstance(k_pool, Int8Pages)
    if int8 != isinstance(v_pool, Int8Pages):
        return "k_pool and v_pool must both be Int8Pages or both be arrays"
    if q.ndim != 4 or len(k_pool.shape) != 4 or len(v_pool.shape) != 4 or table.ndim != 2:
        return "expected q [B, K, G, H], k_pool [Np, K, H, P], v_pool [Np, K, P, H], table [B, W]"
    b, kh, g, h = q.shape
    np_, _, _, p = k_pool.shape
    if k_pool.shape != (np_, kh, h, p) or v_pool.shape != (np_, kh, p, h):
        return (
            f"pool shapes {k_pool.shape} / {v_pool.shape} do not match q {q.shape} (k [Np, K, H, P], v [Np, K, P, H])"
        )
    if table.shape[0] != b or (lengths is not None and lengths.shape != (b,)):
        return f"table {table.shape} / lengths {None if lengths is None else lengths.shape} do not match B={b}"
    if int8:
        ks, vs = k_pool.scale, v_pool.scale
        if k_pool.values.dtype != jnp.int8 or v_pool.values.dtype != jnp.int8:
            return f"Int8Pages values must be int8, got {k_pool.values.dtype}, {v_pool.values.dtype}"
        if ks.shape != (np_, kh, p) or vs.shape != (np_, kh, p):
            return f"Int8Pages scales must be [Np, K, P] = {(np_, kh, p)}, got {ks.shape}, {vs.shape}"
        if ks.dtype not in _TPU_DTYPES or vs.dtype not in _TPU_DTYPES:
            return f"Int8Pages scales must be float32/bfloat16, got {ks.dtype}, {vs.dtype}"
    elif not (q.dtype == k_pool.dtype == v_pool.dtype):
        return f"q, k_pool and v_pool must share a dtype, got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}"
    if backend == "gpu":
        if q.dtype not in _GPU_DTYPES:
            return f"the GPU kernel takes float32/bfloat16/float16, got {q.dtype}"
        if not (_is_pow2(h) and h >= 16 and _is_pow2(p) and p >= 16):
            return f"the GPU kernel needs head_dim and page_size powers of two >= 16 (Triton dots), got H={h}, P={p}"
        if g > 128:
            return f"the GPU kernel keeps a kv head's query group in registers: G <= 128, got G={g}"
    else:
        if q.dtype not in _TPU_DTYPES:
            return f"the TPU kernel takes float32/bfloat16, got {q.dtype}"
        if h % 8 or p % 8:
            return f"the TPU kernel needs head_dim and page_size multiples of 8, got H={h}, P={p}"
        if int8 and (h % _TPU_INT8_ROWS or p % _TPU_INT8_ROWS):
            return (
                f"the TPU kernel reads int8 pages as whole (32, 128) int8 tiles of rows: head_dim and page_size "
                f"multiples of 32, got H={h}, P={p}"
            )
    return None


def paged_attend_pallas(
    q,
    k_pool,
    v_pool,
    table,
    lengths,
    *,
    backend: str,
    interpret: bool = False,
    pages_per_block: int | None = None,
    num_splits: int = 1,
):
    """Same contract as `engine.attention.paged_attend_xla`: q [B, K, G, H] (pre-scaled), k_pool [Np, K, H, P],
    v_pool [Np, K, P, H] (arrays of q's dtype, or both Int8Pages), table [B, W] int32 page ids (valid ids of the
    pool), lengths [B] int32 (>= 0) -> [B, K, G, H] in q's dtype. `backend` "gpu" or "tpu"; `interpret` runs the
    kernel on the CPU (tests). `pages_per_block` (default `default_pages_per_block`) pages per loop iteration / grid
    step; `num_splits` (GPU only) splits each slot's pages over that many programs. Raises ValueError for operands
    the kernel does not take (see `unsupported_reason`)."""
    reason = unsupported_reason(backend, q, k_pool, v_pool, table, lengths)
    if reason:
        raise ValueError(reason)
    p, w = k_pool.shape[3], table.shape[1]
    ppb = min(pages_per_block or default_pages_per_block(backend, p), w)
    if ppb < 1 or num_splits < 1:
        raise ValueError(f"pages_per_block and num_splits must be >= 1, got {pages_per_block}, {num_splits}")
    table, lengths = table.astype(jnp.int32), lengths.astype(jnp.int32)
    if backend == "gpu":
        return _attend_gpu(q, k_pool, v_pool, table, lengths, ppb=ppb, splits=num_splits, interpret=interpret)
    if num_splits != 1:
        raise ValueError("num_splits is a GPU option; the TPU kernel walks a slot's pages in one program")
    return _attend_tpu(q, k_pool, v_pool, table, lengths, ppb=ppb, interpret=interpret)


def _online_softmax_update(m, den, acc, scores, v, dot_pv, v_scale=None):
    """One block of the online softmax: scores [G, T] (masked), v [T, H] (masked rows zero, or finite int8 values
    with v_scale [.., T] masked to zero) -> new (m, den, acc)."""
    m_new = jnp.maximum(m, scores.max(axis=-1))  # [G]
    alpha = jnp.exp(m - m_new)
    probs = jnp.exp(scores - m_new[:, None])  # [G, T]
    den_new = alpha * den + probs.sum(axis=-1)
    weights = probs if v_scale is None else probs * v_scale
    acc_new = alpha[:, None] * acc + dot_pv(weights.astype(v.dtype), v)
    return m_new, den_new, acc_new


# ----------------------------------------------------------------------------------------------------------- GPU


def _gpu_kernel(table_ref, len_ref, q_ref, k_ref, v_ref, *refs, page_size, num_pages, ppb, pages_per_split, int8):
    # table_ref [Wp] (this slot's row), len_ref [1], q_ref [Gp, H], k_ref [Np, H, P], v_ref [Np, P, H] (this kv head);
    # int8: then the key and value scales [Np, P] of this kv head; then the outputs
    ks_ref, vs_ref, *out_refs = refs if int8 else (None, None, *refs)
    split = pl.program_id(2)
    gp, hd = q_ref.shape
    last_page = k_ref.shape[0] - 1
    precision = jax.lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

    def dot(a, b):
        return jax.lax.dot(a, b, precision=precision, preferred_element_type=jnp.float32)

    length = len_ref[0]
    first = split * pages_per_split
    end = jnp.minimum(jnp.minimum(length // page_size + 1, num_pages), first + pages_per_split)
    q = q_ref[...]
    offsets = jnp.arange(page_size, dtype=jnp.int32)

    def body(blk, carry):
        m, den, acc = carry
        scores, values, v_scales = [], [], []
        for j in range(ppb):  # unrolled: the block's page loads are issued together
            idx = first + blk * ppb + j  # may pass `end` in the block's tail: masked below
            page = jnp.clip(table_ref[jnp.minimum(idx, num_pages - 1)], 0, last_page)
            valid = (idx * page_size + offsets <= length) & (idx < end)  # [P]; all False for a page past `end`
            if int8:  # finite values, any scale past the length (NaN x 0 is NaN): the scales are what is masked
                k_scale = ks_ref[page].astype(jnp.float32)  # [P]
                qk = dot(q, k_ref[page].astype(q.dtype)) * k_scale[None, :]  # [Gp, P]
                scores.append(jnp.where(valid[None, :], qk, NEG_INF))
                values.append(v_ref[page].astype(q.dtype))  # [P, H]
                v_scales.append(jnp.where(valid, vs_ref[page].astype(jnp.float32), 0.0)[None, :])  # [1, P]
            else:
                scores.append(jnp.where(valid[None, :], dot(q, k_ref[page]), NEG_INF))  # [Gp, P]
                values.append(jnp.where(valid[:, None], v_ref[page], 0))  # [P, H]
                v_scales.append(None)
        m_new = m
        for s in scores:
            m_new = jnp.maximum(m_new, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        den_new, acc_new = alpha * den, alpha[:, None] * acc
        for s, v, v_scale in zip(scores, values, v_scales, strict=True):
            probs = jnp.exp(s - m_new[:, None])
            den_new += probs.sum(axis=-1)
            weights = probs if v_scale is None else probs * v_scale
            acc_new += dot(weights.astype(v.dtype), v)
        return m_new, den_new, acc_new

    init = (
        jnp.full((gp,), NEG_INF, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
        jnp.zeros((gp, hd), jnp.float32),
    )
    m, den, acc = jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(end - first, 0), ppb), body, init)
    if len(out_refs) == 1:  # one split: the program holds the whole softmax
        (o_ref,) = out_refs
        o_ref[...] = (acc / den[:, None]).astype(o_ref.dtype)
    else:  # partial results, merged in XLA; an empty split leaves den = 0, m = NEG_INF
        o_ref, den_ref, m_ref = out_refs
        o_ref[...] = acc
        den_ref[...] = den
        m_ref[...] = m


def _attend_gpu(q, k_pool, v_pool, table, lengths, *, ppb, splits, interpret):
    from jax.experimental.pallas import triton as plgpu

    b, kh, g, h = q.shape
    np_, _, _, p = k_pool.shape
    w = table.shape[1]
    int8 = isinstance(k_pool, Int8Pages)
    gp = max(_GPU_MIN_ROWS, _next_pow2(g))
    q_pad = jnp.pad(q, ((0, 0), (0, 0), (0, gp - g), (0, 0)))  # zero rows: finite scores, sliced off below
    wp = _next_pow2(w)  # Triton blocks are powers of two; the padding is never read (the loop stops at W)
    table_pad = jnp.pad(table, ((0, 0), (0, wp - w)))
    splits = min(splits, w)
    pages_per_split = pl.cdiv(w, splits)
    kernel = functools.partial(
        _gpu_kernel, page_size=p, num_pages=w, ppb=ppb, pages_per_split=pages_per_split, int8=int8
    )
    in_specs = [
        pl.BlockSpec((None, wp), lambda bi, hi, si: (bi, 0)),  # table row
        pl.BlockSpec((None, 1), lambda bi, hi, si: (bi, 0)),  # length
        pl.BlockSpec((None, None, gp, h), lambda bi, hi, si: (bi, hi, 0, 0)),  # q
        pl.BlockSpec((np_, None, h, p), lambda bi, hi, si: (0, hi, 0, 0)),  # k pool of this kv head
        pl.BlockSpec((np_, None, p, h), lambda bi, hi, si: (0, hi, 0, 0)),  # v pool of this kv head
    ]
    operands = [table_pad, lengths[:, None], q_pad]
    if int8:
        scale_spec = pl.BlockSpec((np_, None, p), lambda bi, hi, si: (0, hi, 0))  # scales of this kv head
        in_specs += [scale_spec, scale_spec]
        operands += [k_pool.values, v_pool.values, k_pool.scale, v_pool.scale]
    else:
        operands += [k_pool, v_pool]
    if splits == 1:
        out_specs = pl.BlockSpec((None, None, gp, h), lambda bi, hi, si: (bi, hi, 0, 0))
        out_shape = jax.ShapeDtypeStruct((b, kh, gp, h), q.dtype)
    else:
        out_specs = [
            pl.BlockSpec((None, None, None, gp, h), lambda bi, hi, si: (si, bi, hi, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, hi, si: (si, bi, hi, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, hi, si: (si, bi, hi, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((splits, b, kh, gp, h), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, kh, gp), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, kh, gp), jnp.float32),
        ]
    out = pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="paged_attend_gpu",
    )(*operands)
    if splits > 1:
        acc, den, m = out  # [S, B, K, Gp, H], [S, B, K, Gp] x2
        m_all = m.max(axis=0)
        scale = jnp.exp(m - m_all[None])  # 0 for an empty split
        out = (acc * scale[..., None]).sum(axis=0) / (den * scale).sum(axis=0)[..., None]
        out = out.astype(q.dtype)
    return out[:, :, :g, :]


# ----------------------------------------------------------------------------------------------------------- TPU


def _tpu_kernel(table_ref, len_ref, q_ref, *refs, page_size, num_pages, ppb, scale_rows):
    # table_ref [B * W] and len_ref [B] in SMEM; q_ref [G, H]; refs: ppb k blocks [H, P], ppb v blocks [P, H],
    # (int8: ppb key scale blocks [R, P], ppb value scale blocks [R, P], R = scale_rows kv heads holding this one),
    # o_ref [G, H], then scratch m [G, 1], den [G, 1], acc [G, H] (float32, VMEM)
    int8 = scale_rows is not None
    k_refs, v_refs = refs[:ppb], refs[ppb : 2 * ppb]
    ks_refs, vs_refs = (refs[2 * ppb : 3 * ppb], refs[3 * ppb : 4 * ppb]) if int8 else ((), ())
    o_ref, m_ref, den_ref, acc_ref = refs[(4 if int8 else 2) * ppb :]
    b, i = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    pages_used = jnp.minimum(length // page_size + 1, num_pages)

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        den_ref[...] = jnp.zeros(den_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    # float32 pools get float32 products (TPU's default precision rounds float32 operands to bfloat16)
    precision = jax.lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

    def dot(a, b_):
        return jnp.dot(a, b_, precision=precision, preferred_element_type=jnp.float32)

    def scale_row(ref):
        # [R, P] -> this kv head's scales [1, P] float32; picked by a where and a sum over R rows rather than a
        # dynamic sublane slice of a packed bfloat16 block, and a where keeps the other heads' rows (anything) out
        scale = ref[...].astype(jnp.float32)
        if scale_rows == 1:
            return scale
        rows = jax.lax.broadcasted_iota(jnp.int32, scale.shape, 0)
        return jnp.where(rows == pl.program_id(1) % scale_rows, scale, 0.0).sum(axis=0, keepdims=True)

    @pl.when(i * ppb < pages_used)
    def _compute():
        q = q_ref[...]
        g = q.shape[0]
        m, den, acc = m_ref[...][:, 0], den_ref[...][:, 0], acc_ref[...]
        for j in range(ppb):
            idx = i * ppb + j
            in_use = idx < pages_used  # False for the tail of the last block: its index_map repeated a page
            pos = idx * page_size + jax.lax.broadcasted_iota(jnp.int32, (g, page_size), 1)
            if int8:  # finite values, any scale past the length (NaN x 0 is NaN): the scales are what is masked
                valid = (pos <= length) & in_use  # [G, P]
                scores = dot(q, k_refs[j][...].astype(q.dtype)) * scale_row(ks_refs[j])  # [G, P]
                scores = jnp.where(valid, scores, NEG_INF)
                v_scale = jnp.where(valid, scale_row(vs_refs[j]), 0.0)  # [G, P]
                v = v_refs[j][...].astype(q.dtype)  # [P, H]
            else:
                scores = dot(q, k_refs[j][...])  # [G, P]
                scores = jnp.where((pos <= length) & in_use, scores, NEG_INF)
                vpos = idx * page_size + jax.lax.broadcasted_iota(jnp.int32, v_refs[j].shape, 0)
                v = jnp.where((vpos <= length) & in_use, v_refs[j][...], jnp.zeros((), v_refs[j].dtype))  # [P, H]
                v_scale = None
            m, den, acc = _online_softmax_update(m, den, acc, scores, v, dot, v_scale)
        m_ref[...], den_ref[...], acc_ref[...] = m[:, None], den[:, None], acc

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = (acc_ref[...] / den_ref[...]).astype(o_ref.dtype)


def _attend_tpu(q, k_pool, v_pool, table, lengths, *, ppb, interpret):
    from jax.experimental.pallas import tpu as pltpu

    b, kh, g, h = q.shape
    p, w = k_pool.shape[3], table.shape[1]
    int8 = isinstance(k_pool, Int8Pages)
    # a scale block's second-minor dim (kv heads) must be 8k or all K, not 1: the fewest rows holding this kv head
    scale_rows = (_TPU_SCALE_ROWS if kh % _TPU_SCALE_ROWS == 0 else kh) if int8 else None

    def page_of(j, bi, i, table_ref, len_ref):
        # steps past the slot's last block in use repeat that block's pages (and pages past the length within it
        # repeat the last page in use): an unchanged block index, so the pipeline issues no copy
        last = jnp.minimum(len_ref[bi] // p, w - 1)
        i_used = jnp.minimum(i, last // ppb)
        return table_ref[bi * w + jnp.minimum(i_used * ppb + j, last)]

    def page_map(j):
        return lambda bi, hi, i, *prefetch: (page_of(j, bi, i, *prefetch), hi, 0, 0)

    def scale_map(j):
        return lambda bi, hi, i, *prefetch: (page_of(j, bi, i, *prefetch), hi // scale_rows, 0)

    k_values, v_values = (k_pool.values, v_pool.values) if int8 else (k_pool, v_pool)
    in_specs = [
        *[pl.BlockSpec((None, None, h, p), page_map(j)) for j in range(ppb)],
        *[pl.BlockSpec((None, None, p, h), page_map(j)) for j in range(ppb)],
    ]
    operands = [k_values] * ppb + [v_values] * ppb
    if int8:
        in_specs += [pl.BlockSpec((None, scale_rows, p), scale_map(j)) for j in range(ppb)] * 2
        operands += [k_pool.scale] * ppb + [v_pool.scale] * ppb
    q_spec = pl.BlockSpec((None, None, g, h), lambda bi, hi, i, *_: (bi, hi, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, kh, pl.cdiv(w, ppb)),
        in_specs=[q_spec, *in_specs],
        out_specs=q_spec,
        scratch_shapes=[
            pltpu.VMEM((g, 1), jnp.float32),
            pltpu.VMEM((g, 1), jnp.float32),
            pltpu.VMEM((g, h), jnp.float32),
        ],
    )
    kernel = functools.partial(_tpu_kernel, page_size=p, num_pages=w, ppb=ppb, scale_rows=scale_rows)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="paged_attend_tpu",
    )(table.reshape(-1), lengths, q, *operands)
