"""The CPU kernels' AVX2 code paths, built and checked on an AVX-512 machine too.

The kernels are compiled for the host CPU (`-march=native`), so the test suite on an AVX-512 machine checks only the
AVX-512 paths. Their vectors are the register's width (16 floats with AVX-512, 8 with AVX2: common.h), and the tiles
differ per width, so this builds the library for x86-64-v3 (AVX2 + FMA, the x86 CPUs of the last decade) in a child
process (`MESHSERVE_KERNEL_ARCH`) and runs the kernels' parity tests against numpy and XLA there. On an AVX2-only
machine the suite's own build is that path already and this is skipped; the AVX-512 path cannot run there.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from engine import kernels

ROOT = Path(__file__).resolve().parent.parent


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_avx2_kernels_match_the_references_on_an_avx512_machine(tmp_path):
    flags = _cpu_flags()
    if platform.machine() != "x86_64" or kernels.compiler() is None:
        pytest.skip("x86-64 with a C++ compiler only")
    if "avx512f" not in flags:
        pytest.skip("this CPU has no AVX-512: the suite's own kernel build is the AVX2 path")
    env = {
        **os.environ,
        kernels.ARCH_ENV: "x86-64-v3",
        "MESHSERVE_CACHE": str(tmp_path / "cache"),  # its own library, not the suite's
        "JAX_PLATFORMS": "cpu",
    }
    tests = [
        "tests/test_kernels.py::test_linear_kernel_matches_numpy",
        "tests/test_kernels.py::test_kernel_matches_xla_decode_attention",
        "tests/test_kernels.py::test_int8_kernel_matches_xla_decode_attention",
        "tests/test_kernels.py::test_softmax_stays_exact_at_large_scores",
        "tests/test_prefill_kernel.py::test_kernel_matches_xla",
        "tests/test_prefill_kernel.py::test_int8_kernel_matches_xla",
        "tests/test_int8.py::test_int8_kernel_products_match_numpy",
        "tests/test_int8.py::test_int8_kernel_spreads_nan_and_inf_from_a_token",
    ]
    probe = (
        "from engine import kernels; path = kernels.load(); "
        "print(path.name, kernels.int8_integer_path(), kernels.int8_activation_min_tokens())"
    )
    built = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout.split()[1:] == ["avx2", "4"], "an x86-64-v3 build has the AVX2 integer path, not VNNI's"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
