"""How the CPU kernels spread a call over threads (engine/kernels/common.h): their own helper threads that spin
between calls (SpinPool), or XLA's pool when spinning is off or another call holds the helpers; each worker's
contiguous share of the items, with the rest stolen from the back. Whoever computes an item, it is computed the same
way, so every path must give the same bits, and every item must be computed once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import kernels
from engine.api import EngineConfig
from engine.model import Packed

pytestmark = pytest.mark.skipif(kernels.compiler() is None, reason="no C++ compiler to build the kernels with")

PACKED = Packed(kernels.PANEL_ROWS, kernels.linear)
DEFAULT_SPIN = EngineConfig().kernel_spin_us


@pytest.fixture
def spin():
    """Sets the process-wide spin time for a test and puts the default back after it."""
    kernels.load()
    yield kernels.set_spin_micros
    kernels.set_spin_micros(DEFAULT_SPIN)


def products(n: int, k: int, m: int, seed: int = 0):
    """A jitted packed product, a residual one and a gated one on random float32 data, and their arguments."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((n, k), np.float32))
    x = jnp.asarray(rng.standard_normal((k, m), np.float32))
    r = jnp.asarray(rng.standard_normal((n, m), np.float32))
    plain = jax.jit(lambda w, x: kernels.linear(w, x, n))
    residual = jax.jit(lambda w, x, r: kernels.linear(w, x, n, residual=r))
    gated = jax.jit(lambda w, x: kernels.linear(w, x, n // 2, gated=True))
    wp, gp = PACKED.pack(w), PACKED.pack_gated(w[: n // 2 * 2])
    return lambda: (np.asarray(plain(wp, x)), np.asarray(residual(wp, x, r)), np.asarray(gated(gp, x))), w, x


# one token (the flat path: every panel of SmolLM2's qkv as its own share or in runs) and 64 tokens (tiles)
@pytest.mark.parametrize(("n", "k", "m"), [(960, 576, 1), (3072, 576, 1), (13, 37, 1), (576, 1536, 64)])
def test_spinning_helpers_and_xla_pool_give_the_same_bits(spin, n, k, m):
    run, w, x = products(n, k, m)
    spin(0)
    want = run()
    np.testing.assert_allclose(want[0], np.asarray(w, np.float64) @ np.asarray(x, np.float64), rtol=1e-4, atol=1e-3)
    spin(200)
    for _ in range(3):  # the helper awake (spinning) and, on the first call, maybe still asleep
        for got, ref in zip(run(), want, strict=True):
            np.testing.assert_array_equal(got, ref)


def test_two_threads_calling_at_once_both_get_every_item(spin):
    """One caller holds the spinning helpers at a time; the other falls back to XLA's pool. Neither may lose or
    repeat an item, nor wait on the other."""
    spin(200)
    runs = [products(960, 576, 1, seed=s)[0] for s in (1, 2)]
    want = [run() for run in runs]
    errors: list[BaseException] = []

    def hammer(i: int) -> None:
        try:
            for _ in range(40):
                for got, ref in zip(runs[i](), want[i], strict=True):
                    np.testing.assert_array_equal(got, ref)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a kernel call hung"
    assert not errors, errors[0]


def test_helpers_join_and_a_forked_child_gets_its_own():
    """The pool's helpers join a call (the self-test's caller waits for them), and a child forked after they exist
    (where the parent's threads are gone) starts helpers of its own instead of waiting for threads that are not
    there. Run without JAX in the process: only the library, through ctypes."""
    path = kernels.load()
    script = textwrap.dedent(
        f"""
        import ctypes, os, sys
        lib = ctypes.CDLL({str(path)!r})
        lib.MeshserveSpinPoolSelfTest.restype = ctypes.c_int64
        test = lambda helpers, items: lib.MeshserveSpinPoolSelfTest(ctypes.c_int64(helpers), ctypes.c_int64(items))
        want = lambda items: items * (items - 1) // 2
        for micros in (200, 0):  # helpers spinning, then asleep between jobs
            lib.MeshserveSetSpinMicros(ctypes.c_int64(micros))
            for items in (0, 1, 1000):
                for helpers in (1, 3):
                    got = test(helpers, items)
                    assert got == want(items), (micros, helpers, items, got)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if test(2, 500) == want(500) and test(1, 10) == want(10) else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_spin_time_is_checked():
    with pytest.raises(ValueError, match=r"kernel_spin_us must be in \[0, 1000000\], got -1"):
        EngineConfig(kernel_spin_us=-1)
    with pytest.raises(ValueError, match=r"spin micros must be in \[0, 1000000\], got 2000000"):
        kernels.set_spin_micros(2_000_000)


def test_the_server_does_not_spin_by_default():
    """serve.py shares its cores with its request threads and the gateway, so its kernels do not spin unless asked;
    the engine's own default (offline jobs, benchmarks) does."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "serve.py"), "--helpfull"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    block = out[out.index("--kernel_spin_us") :].split("\n  --", 1)[0]
    assert "(default: '0')" in block, block
    assert DEFAULT_SPIN > 0
