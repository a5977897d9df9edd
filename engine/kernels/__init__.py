"""Hand-written kernels for what XLA compiles poorly on one backend, registered through the XLA FFI. Both are for CPU
in float32:

- Decode attention over the paged KV pool (`decode_attention.cc`), reading each slot's pages through its page table
  in place. XLA:CPU runs the per-page batched products of that computation as thousands of tiny [G, H] x [H, P]
  GEMMs per step and streams the cache at about a third of the machine's read bandwidth (and its gather of the
  table's pages copies them first); the kernel reads each slot's positions once, in order, on every core. Measured on a
  2-core AVX-512 VM, 30 layers x 64 slots x 256 positions of SmolLM2's cache: 74 -> 33 ms.
- The weight products on weights packed once at load (`linear.cc`). XLA's library GEMM repacks both
  operands on every call; at a decode step's 64 tokens that held the products to ~240 GFLOP/s, where the packed
  kernel runs ~400 (same VM).
- The same products on int8 weights (`linear_int8.cc`, engine.quant's per-row scales): a decode step at a few slots
  streams every weight once, so a quarter of float32's bytes is up to 4x the speed. Measured on the same VM at one
  token: a [49152, 576] head in 0.65 ms (44 GB/s of int8 weights) against 7.0 ms in float32. From a few tokens up
  (`int8_activation_min_tokens`) activations are quantized to 16 bits per token and the products run on integers:
  AVX-512 VNNI where the CPU has it, else AVX2's vpmaddwd on weights widened to 16 bits (`int8_integer_path`).

The sources are compiled on first use, into one library, with the system's C++ compiler (`$CXX`, else
`c++`/`g++`/`clang++`) for the host CPU, into `$MESHSERVE_CACHE/kernels`, keyed by the sources, the flags, the
jaxlib version and the CPU, and loaded with ctypes. Processes that race to build it each write their own file and
rename it into place. Whether the one-token product prefetches in software is decided per model by a probe of that
model's products on this machine (`one_token_prefetch`); its result is kept beside the library.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from engine.api import MAX_KERNEL_SPIN_US
from engine.attention import Int8Pages, PrefillPaging, write_decode_kv
from engine.paths import cache_root

log = logging.getLogger(__name__)

DECODE_ATTENTION = "meshserve_decode_attention"
DECODE_ATTENTION_INT8 = "meshserve_decode_attention_int8"
PREFILL_ATTENTION = "meshserve_prefill_attention"
PREFILL_ATTENTION_INT8 = "meshserve_prefill_attention_int8"
LINEAR = "meshserve_linear"
LINEAR_INT8 = "meshserve_linear_int8"
PANEL_ROWS = 6
"""Weight rows per packed panel (`kRows` in linear.cc)."""
INT8_PANEL_ROWS = 32
"""Weight rows per packed int8 panel (`kRows` in linear_int8.cc)."""
_DIR = Path(__file__).parent
_SOURCES = (_DIR / "decode_attention.cc", _DIR / "prefill_attention.cc", _DIR / "linear.cc", _DIR / "linear_int8.cc")
_HEADERS = (_DIR / "common.h",)
PREFETCH_ENV = "MESHSERVE_KERNEL_PREFETCH"
"""Environment variable forcing whether the one-token weight product (a batch-1 decode step's) prefetches its weights
ahead in software: "on" or "off". Unset, a probe of this machine decides, once per library, thread count and model
shapes (`one_token_prefetch`)."""
PROBE_BYTES = 256 << 20
"""Weights the prefetch probe streams at most (a step's products scaled down to fit): well past the last-level cache
of the CPUs we run on (32-105 MiB)."""
PROBE_MIN_BYTES = 64 << 20
"""A model whose step reads fewer bytes of weights is not probed: they stay in or near the last-level cache, there
is no stream to keep ahead of, and prefetching stays off."""
PROBE_ROUNDS = 9
"""Timed passes of the probe each way, in alternating order; it compares their medians."""
PREFETCH_MARGIN = 1.01
"""How much faster the probe must find prefetching before the kernels do it: prefetches cost instructions and load
slots, so within the probe's noise they are left out. The probe's medians repeat within ~1% (a 2-core Zen 5 VM, six
probes of SmolLM2's products: with / without 1.010-1.019, and decode there 1.011x-1.033x faster with, in
alternating passes); on a Zen 3 VM it measured prefetching 2-12% slower."""
ARCH_ENV = "MESHSERVE_KERNEL_ARCH"
"""Environment variable naming the `-march` the kernels are built for (default native: this CPU). Tests set it to
build the AVX2 code paths (x86-64-v3) on an AVX-512 machine; a value the CPU cannot run faults when called."""


def _flags() -> tuple[str, ...]:
    arch = os.environ.get(ARCH_ENV) or "native"
    return ("-O3", f"-march={arch}", "-std=c++17", "-shared", "-fPIC", "-w")


_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL, Path] | None = None  # the library (kept referenced) and its path


class KernelUnavailable(ValueError):
    """The CPU kernels cannot be built here (no C++ compiler, or it failed); --attention=xla --linear=xla run
    without them."""


def compiler() -> str | None:
    """The C++ compiler the kernels are built with, or None when the machine has none."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def library_path(cxx: str) -> Path:
    key = hashlib.sha256()
    for path in (*_SOURCES, *_HEADERS):
        key.update(path.read_bytes())
    for part in (" ".join(_flags()), cxx, jaxlib.__version__, _cpu_id()):
        key.update(part.encode())
    return Path(cache_root()) / "kernels" / f"meshserve_kernels-{key.hexdigest()[:16]}.so"


def _build(cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *_flags(), f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", tmp]
    log.info("building the CPU kernels: %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailable(
            f"building the CPU kernels with {cxx} failed (use --attention=xla --linear=xla to run without them):\n"
            f"{result.stderr}"
        )
    os.replace(tmp, target)


def load() -> Path:
    """Builds (once per machine) and registers the CPU kernels with XLA; returns the library's path. Raises
    KernelUnavailable if it cannot."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded[1]
        _forced_prefetch()  # a bad value fails before the build, not after
        cxx = compiler()
        if cxx is None:
            raise KernelUnavailable("no C++ compiler found (set $CXX, or use --attention=xla --linear=xla)")
        path = library_path(cxx)
        if not path.exists():
            _build(cxx, path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        lib.MeshserveProbePrefetch.restype = lib.MeshserveProbePrefetchInt8.restype = None
        jax.ffi.register_ffi_target(DECODE_ATTENTION, jax.ffi.pycapsule(lib.MeshserveDecodeAttention), platform="cpu")
        jax.ffi.register_ffi_target(
            DECODE_ATTENTION_INT8, jax.ffi.pycapsule(lib.MeshserveDecodeAttentionInt8), platform="cpu"
        )
        jax.ffi.register_ffi_target(PREFILL_ATTENTION, jax.ffi.pycapsule(lib.MeshservePrefillAttention), platform="cpu")
        jax.ffi.register_ffi_target(
            PREFILL_ATTENTION_INT8, jax.ffi.pycapsule(lib.MeshservePrefillAttentionInt8), platform="cpu"
        )
        jax.ffi.register_ffi_target(LINEAR, jax.ffi.pycapsule(lib.MeshserveLinear), platform="cpu")
        jax.ffi.register_ffi_target(LINEAR_INT8, jax.ffi.pycapsule(lib.MeshserveLinearInt8), platform="cpu")
        _loaded = (lib, path)
        return path


def _forced_prefetch() -> bool | None:
    """$MESHSERVE_KERNEL_PREFETCH as a bool, or None when unset."""
    forced = os.environ.get(PREFETCH_ENV)
    if not forced:
        return None
    if forced not in ("on", "off"):
        raise ValueError(f"{PREFETCH_ENV} must be 'on' or 'off', got {forced!r}")
    return forced == "on"


def one_token_prefetch(products: Sequence[tuple[int, int, int]], *, int8: bool = False) -> dict:
    """Whether the one-token product (`linear`, or with `int8` `linear_int8`, at M = 1: a batch-1 decode step's)
    should prefetch its weights ahead in software for a model whose step runs `products`: (panels, K, count) triples
    in a step's order (a layer's products with the layer count, then the head's once; panels of PANEL_ROWS rows, or
    INT8_PANEL_ROWS with `int8`). From $MESHSERVE_KERNEL_PREFETCH, else a probe: those products streamed on every
    core (scaled down to PROBE_BYTES), with and without, in alternating rounds (MeshserveProbePrefetch in linear.cc,
    MeshserveProbePrefetchInt8 in linear_int8.cc); on only where PREFETCH_MARGIN faster. Which way is faster depends
    on the CPU and on the products' shapes (float32 on a Zen 5 VM: 1.01-1.06x with over SmolLM2's K = 576 panels,
    level over K = 1024 ones; on a Zen 3 VM 2-6% slower), hence per model and format. The result is kept beside the
    library per thread count, format and shapes (`<library>.prefetch-<threads>t-<digest>.json`), so a machine probes
    once per model (~0.1-0.7 s); a lock file keeps processes that load at once from probing together (each would see
    half the bandwidth). A step of under PROBE_MIN_BYTES is not probed (off). Prefetching changes no result, only
    the speed. Returns {"prefetch": bool, "source": ...} (a probe's with its GB/s without and with, and its
    threads). Builds the kernels if needed."""
    products = [tuple(int(v) for v in p) for p in products]
    if any(len(p) != 3 or min(p) < 1 for p in products) or not products:
        raise ValueError(f"products must be (panels, K, count) triples of positive sizes, got {products}")
    forced = _forced_prefetch()
    if forced is not None:
        return {"prefetch": forced, "source": PREFETCH_ENV}
    panel_bytes = INT8_PANEL_ROWS if int8 else PANEL_ROWS * 4
    step = sum(p * k * panel_bytes * n for p, k, n in products)
    if step < PROBE_MIN_BYTES:
        return {"prefetch": False, "source": f"not probed: {step / 2**20:.1f} MiB of weights a step"}
    path = load()
    threads = _threads()
    digest = hashlib.sha256(json.dumps([int8, products, PROBE_BYTES, PROBE_ROUNDS]).encode()).hexdigest()[:12]
    cache = path.with_name(f"{path.stem}.prefetch-{threads}t-{digest}.json")
    with _probe_lock(path.with_name(path.stem + ".prefetch.lock")):
        choice = _cached_choice(cache)
        if choice is None:
            choice = _probe_prefetch(_loaded[0], threads, products, int8)
            if choice["source"] == "probe":
                _store_choice(cache, choice)
    return choice


@contextlib.contextmanager
def _probe_lock(lock_path: Path):
    """Held while one process reads or probes and writes the cached choice; where the lock file cannot be opened (a
    read-only library directory) the probe runs unlocked, as it would with no cache."""
    try:
        lock = open(lock_path, "a")  # noqa: SIM115 (held across the yield)
    except OSError as e:
        log.warning("no lock for the prefetch probe at %s (%s): probing unlocked", lock_path, e)
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _threads() -> int:
    """The cores this process may run on: as many threads as XLA's CPU pool has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cached_choice(cache: Path) -> dict | None:
    """A probe's kept result, decided again from its measurements with today's PREFETCH_MARGIN; None (probe again)
    for anything else."""
    try:
        choice = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(choice, dict) or choice.get("source") != "probe":
        return None
    gb_s = (choice.get("gb_s_without"), choice.get("gb_s_with"))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in gb_s):
        return None
    return {**choice, "prefetch": _pays(*gb_s)}


def _pays(gb_s_without: float, gb_s_with: float) -> bool:
    """The probe's rule: prefetching only where PREFETCH_MARGIN faster."""
    return gb_s_with > PREFETCH_MARGIN * gb_s_without


def _store_choice(cache: Path, choice: dict) -> None:
    """Writes the probe's result beside the library (atomically); a cache that cannot be written (read-only, full)
    costs a probe per process, nothing else."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=cache.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(choice, f)
        os.replace(tmp, cache)
    except OSError as e:
        log.warning("could not keep the prefetch probe's result in %s: %s", cache, e)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _probe_prefetch(lib: ctypes.CDLL, threads: int, products: list[tuple[int, int, int]], int8: bool) -> dict:
    gb_s = (ctypes.c_double * 2)()
    shapes = (ctypes.c_int64 * (3 * len(products)))(*[v for p in products for v in p])
    probe = lib.MeshserveProbePrefetchInt8 if int8 else lib.MeshserveProbePrefetch
    probe(
        ctypes.c_int64(threads),
        ctypes.c_int64(PROBE_BYTES),
        ctypes.c_int64(PROBE_ROUNDS),
        shapes,
        ctypes.c_int64(len(products)),
        gb_s,
    )
    if gb_s[0] <= 0.0:
        log.warning("the prefetch probe could not run (memory or threads): the one-token product prefetches nothing")
        return {"prefetch": False, "source": "default: probe failed"}
    choice = {
        "prefetch": _pays(gb_s[0], gb_s[1]),
        "source": "probe",
        "threads": threads,
        "gb_s_without": gb_s[0],
        "gb_s_with": gb_s[1],
    }
    log.info(
        "CPU kernels: the %s one-token product prefetches %s for this model (probe on %d threads: %.1f GB/s without, "
        "%.1f with)",
        "int8" if int8 else "float32",
        "on" if choice["prefetch"] else "nothing",
        threads,
        gb_s[0],
        gb_s[1],
    )
    return choice


def loaded() -> bool:
    """Whether this process has loaded the kernels (an engine chose one, or something called `load`)."""
    return _loaded is not None


def set_spin_micros(micros: int) -> None:
    """How long the kernels' helper threads wait for the next call spinning before they sleep, for the whole
    process (`EngineConfig.kernel_spin_us`); 0 hands every call's work to XLA's thread pool. Builds the kernels if
    needed."""
    if not 0 <= micros <= MAX_KERNEL_SPIN_US:
        raise ValueError(f"spin micros must be in [0, {MAX_KERNEL_SPIN_US}], got {micros}")
    load()
    _loaded[0].MeshserveSetSpinMicros(ctypes.c_int64(micros))


def int8_activation_min_tokens() -> int:
    """The fewest tokens (x's M) at which this machine's int8 kernel quantizes activations to 16 bits per token and
    multiplies integers (see `int8_integer_path` and linear_int8.cc), or 0 where it was built without such a path
    (every M then runs weight-only in float32). Builds the kernels if needed."""
    load()
    fn = _loaded[0].MeshserveInt8IntegerMinTokens
    fn.restype = ctypes.c_int64
    return int(fn())


def int8_integer_path() -> str:
    """Which integer products this build of the int8 kernel has: "vnni" (AVX-512 VNNI and VBMI), "avx2" (vpmaddwd on
    16-bit activations and weights), or "" (none). Builds the kernels if needed."""
    load()
    fn = _loaded[0].MeshserveInt8IntegerPath
    fn.restype = ctypes.c_char_p
    return fn().decode()


def decode_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    table: jax.Array,
    lengths: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`engine.attention.paged_decode_attention_xla`'s contract: writes k_new / v_new [B, K, H] at each slot's
    length through its page table row (in place: the pool results alias the pool arguments) and attends q [B, K, G,
    H] (pre-scaled) to positions <= length; k_pool [Np, K, H, P], v_pool [Np, K, P, H], table [B, W], lengths [B]
    -> (out [B, K, G, H], k_pool, v_pool). float32 on CPU; call `load()` first.

    Int8Pages pools (an int8 KV cache): XLA writes the new K/V, quantized as `engine.attention.write_decode_kv`
    does everywhere, and the kernel reads the int8 values and their scales in place."""
    if isinstance(k_pool, Int8Pages):
        return decode_attention_int8(q, k_new, v_new, k_pool, v_pool, table, lengths)
    if q.dtype != jnp.float32:
        raise TypeError(f"the CPU decode-attention kernel takes float32, got {q.dtype}")
    call = jax.ffi.ffi_call(
        DECODE_ATTENTION,
        (
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype),
            jax.ShapeDtypeStruct(v_pool.shape, v_pool.dtype),
        ),
        input_output_aliases={5: 1, 6: 2},
    )
    return call(q, k_new, v_new, lengths.astype(jnp.int32), table.astype(jnp.int32), k_pool, v_pool)


def decode_attention_int8(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_pool: Int8Pages,
    v_pool: Int8Pages,
    table: jax.Array,
    lengths: jax.Array,
) -> tuple[jax.Array, Int8Pages, Int8Pages]:
    """`decode_attention` on an int8 KV cache (see there)."""
    if q.dtype != jnp.float32:
        raise TypeError(f"the CPU decode-attention kernel takes float32 queries, got {q.dtype}")
    k_pool, v_pool = write_decode_kv(k_pool, v_pool, k_new, v_new, table, lengths)
    out = jax.ffi.ffi_call(DECODE_ATTENTION_INT8, jax.ShapeDtypeStruct(q.shape, q.dtype))(
        q,
        lengths.astype(jnp.int32),
        table.astype(jnp.int32),
        k_pool.values,
        k_pool.scale,
        v_pool.values,
        v_pool.scale,
    )
    return out, k_pool, v_pool


def prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    k_pool: jax.Array | Int8Pages,
    v_pool: jax.Array | Int8Pages,
    paging: PrefillPaging,
) -> jax.Array:
    """The paged case of `engine.attention.prefill_attention_xla`: q [T, K, G, H] (pre-scaled), k / v [T, K, H] of
    one packed row attend to the earlier keys of their own segment (segment_ids [T], -1: padding) and to the cached
    positions `paging` lets their segment see, read from k_pool [Np, K, H, P] / v_pool [Np, K, P, H] -> [T, K, G, H].
    The pools must already hold the pack's own K/V (`write_prefill_kv`); this only reads them. Int8Pages pools (an
    int8 KV cache): the context pages are dequantized as they are read (k / v are the pack's K/V as stored,
    `engine.attention.as_stored`). float32 on CPU; call `load()` first."""
    int8 = isinstance(k_pool, Int8Pages)
    floats = (q, k, v) if int8 else (q, k, v, k_pool, v_pool)
    if any(a.dtype != jnp.float32 for a in floats):
        raise TypeError(
            f"the CPU prefill-attention kernel takes float32, got {', '.join(str(a.dtype) for a in floats)}"
        )
    pools = (k_pool.values, k_pool.scale, v_pool.values, v_pool.scale) if int8 else (k_pool, v_pool)
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    return jax.ffi.ffi_call(
        PREFILL_ATTENTION_INT8 if int8 else PREFILL_ATTENTION, jax.ShapeDtypeStruct(q.shape, q.dtype)
    )(
        q,
        k,
        v,
        i32(segment_ids),
        *pools,
        i32(paging.ctx_pages),
        i32(paging.ctx_rows),
        i32(paging.ctx_valid),
        i32(paging.ctx_blocks).reshape(()),
        block_pages=np.int64(paging.block_pages),
    )


def linear(
    wp: jax.Array,
    x: jax.Array,
    n: int,
    *,
    residual: jax.Array | None = None,
    gated: bool = False,
    prefetch: bool = False,
) -> jax.Array:
    """y [N, M] = W x for a weight W [N, K] packed in panels of PANEL_ROWS rows (wp [ceil(N / 6), K, 6], see
    `engine.model.Packed`) and x [K, M]; plus `residual` [N, M] when given (its buffer is reused for y where XLA
    can give it up). gated: wp holds a gate and an up weight [N, K] each, packed by `Packed.pack_gated` ([ceil(N /
    3), K, 6]), and y = silu(gate x) * (up x). prefetch: at M = 1, prefetch the weights ahead in software
    (`one_token_prefetch` says whether that pays for a model on this machine; the result is the same). float32 on
    CPU; call `load()` first."""
    if wp.dtype != jnp.float32 or x.dtype != jnp.float32:
        raise TypeError(f"the CPU linear kernel takes float32, got {wp.dtype} and {x.dtype}")
    rows = PANEL_ROWS // 2 if gated else PANEL_ROWS
    if wp.ndim != 3 or wp.shape[2] != PANEL_ROWS or wp.shape[0] != -(-n // rows) or x.shape[0] != wp.shape[1]:
        raise ValueError(f"cannot multiply a packed weight {wp.shape} (N={n}, gated={gated}) by x {x.shape}")
    out = jax.ShapeDtypeStruct((n, x.shape[1]), x.dtype)
    if residual is None:
        return jax.ffi.ffi_call(LINEAR, out)(wp, x, gated=gated, prefetch=prefetch)
    if residual.shape != out.shape or residual.dtype != x.dtype:
        raise ValueError(f"the residual must be {out.shape} {x.dtype}, got {residual.shape} {residual.dtype}")
    return jax.ffi.ffi_call(LINEAR, out, input_output_aliases={2: 0})(wp, x, residual, gated=gated, prefetch=prefetch)


def linear_int8(
    wq: jax.Array,
    scale: jax.Array,
    x: jax.Array,
    n: int,
    *,
    residual: jax.Array | None = None,
    gated: bool = False,
    prefetch: bool = False,
) -> jax.Array:
    """y [N, M] = (Q * scale) x for an int8 weight Q [N, K] packed in panels of INT8_PANEL_ROWS rows (wq [ceil(N /
    32), K, 32], scale [ceil(N / 32) * 32], see `engine.quant.pack`) and x [K, M] float32; plus `residual` [N, M]
    when given (its buffer is reused for y where XLA can give it up). gated: wq holds a gate and an up weight [N, K]
    each, packed by `engine.quant.pack_gated` ([ceil(N / 16), K, 32]), and y = silu(gate x) * (up x). prefetch: at
    M = 1, prefetch the weights ahead in software (`one_token_prefetch(..., int8=True)` says whether that pays for a
    model on this machine; the result is the same). Call `load()` first."""
    if wq.dtype != jnp.int8 or scale.dtype != jnp.float32 or x.dtype != jnp.float32:
        raise TypeError(
            f"the CPU int8 linear kernel takes int8 weights, float32 scales and activations, got "
            f"{wq.dtype}, {scale.dtype} and {x.dtype}"
        )
    rows = INT8_PANEL_ROWS // 2 if gated else INT8_PANEL_ROWS
    if (
        wq.ndim != 3
        or wq.shape[2] != INT8_PANEL_ROWS
        or wq.shape[0] != -(-n // rows)
        or x.shape[0] != wq.shape[1]
        or scale.shape != (wq.shape[0] * INT8_PANEL_ROWS,)
    ):
        raise ValueError(
            f"cannot multiply a packed int8 weight {wq.shape} / scale {scale.shape} (N={n}, "
            f"gated={gated}) by x {x.shape}"
        )
    out = jax.ShapeDtypeStruct((n, x.shape[1]), x.dtype)
    if residual is None:
        return jax.ffi.ffi_call(LINEAR_INT8, out)(wq, scale, x, gated=gated, prefetch=prefetch)
    if residual.shape != out.shape or residual.dtype != x.dtype:
        raise ValueError(f"the residual must be {out.shape} {x.dtype}, got {residual.shape} {residual.dtype}")
    return jax.ffi.ffi_call(LINEAR_INT8, out, input_output_aliases={3: 0})(
        wq, scale, x, residual, gated=gated, prefetch=prefetch
    )


def packed_int8_product(
    w, x: jax.Array, n: int, *, residual: jax.Array | None = None, gated: bool = False, prefetch: bool = False
):
    """`linear_int8` on an engine.quant.Int8 packed weight: the product `engine.model.Packed` calls."""
    return linear_int8(w.values, w.scale, x, n, residual=residual, gated=gated, prefetch=prefetch)
