"""Hand-written kernels for what XLA compiles poorly on one backend, registered through the XLA FFI.

Only one for now: decode attention over the paged KV cache on CPU (`decode_attention.cc`). XLA:CPU runs the per-page
batched products of that computation as thousands of tiny [G, H] x [H, P] GEMMs per step and streams the cache at
about a third of the machine's read bandwidth; the kernel reads each slot's positions once, in order, on every core.
Measured on a 2-core AVX-512 VM, 30 layers x 64 slots x 256 positions of SmolLM2's cache: 74 -> 33 ms.

The source is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`/`g++`/`clang++`) for the
host CPU, into `$MESHSERVE_CACHE/kernels`, keyed by the source, the flags, the jaxlib version and the CPU, and
loaded with ctypes. Processes that race to build it each write their own file and rename it into place.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from checkpoints.bundled import cache_root

log = logging.getLogger(__name__)

DECODE_ATTENTION = "meshserve_decode_attention"
_SOURCE = Path(__file__).with_name("decode_attention.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL, Path] | None = None  # the library (kept referenced) and its path


class KernelUnavailable(ValueError):
    """The CPU kernels cannot be built here (no C++ compiler, or it failed); --attention=xla runs without them."""


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
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), cxx.encode(), jaxlib.__version__.encode()):
        key.update(part)
    key.update(_cpu_id().encode())
    return Path(cache_root()) / "kernels" / f"decode_attention-{key.hexdigest()[:16]}.so"


def _build(cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    log.info("building the CPU decode-attention kernel: %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailable(
            f"building {_SOURCE.name} with {cxx} failed (use --attention=xla to run without it):\n{result.stderr}"
        )
    os.replace(tmp, target)


def load() -> Path:
    """Builds (once per machine) and registers the CPU kernels with XLA; returns the library's path. Raises
    KernelUnavailable if it cannot."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded[1]
        cxx = compiler()
        if cxx is None:
            raise KernelUnavailable("no C++ compiler found (set $CXX, or use --attention=xla)")
        path = library_path(cxx)
        if not path.exists():
            _build(cxx, path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(DECODE_ATTENTION, jax.ffi.pycapsule(lib.MeshserveDecodeAttention), platform="cpu")
        _loaded = (lib, path)
        return path


def decode_attention(
    q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_pages: tuple, v_pages: tuple, lengths: jax.Array
) -> tuple[jax.Array, tuple, tuple]:
    """`model.decode_attention_xla`'s contract: writes k_new / v_new [B, K, H] at each slot's length into the pages
    (in place: the page results alias the page arguments) and attends q [B, K, G, H] (pre-scaled) to positions
    <= length; k_pages [B, K, H, P], v_pages [B, K, P, H] per page, lengths [B] -> (out [B, K, G, H], k_pages,
    v_pages). float32 on CPU; call `load()` first."""
    if q.dtype != jnp.float32:
        raise TypeError(f"the CPU decode-attention kernel takes float32, got {q.dtype}")
    pages = (*k_pages, *v_pages)
    call = jax.ffi.ffi_call(
        DECODE_ATTENTION,
        (jax.ShapeDtypeStruct(q.shape, q.dtype), *(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in pages)),
        input_output_aliases={4 + i: 1 + i for i in range(len(pages))},
    )
    out, *pages = call(q, k_new, v_new, lengths.astype(jnp.int32), *pages)
    n = len(k_pages)
    return out, tuple(pages[:n]), tuple(pages[n:])
