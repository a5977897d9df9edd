#!/usr/bin/env bash
# Installs llama.cpp, through the llama-cpp-python sdist compiled on this machine, into its own virtual environment
# for the benchmark's llama.cpp baseline (bench/llamacpp_baseline.py, `scripts/benchmark.py --llamacpp=...`).
#
#   bash scripts/install_llamacpp.sh            # -> .venv-llamacpp/ beside .venv (git ignores it)
#
# It is never a project dependency and never goes into .venv: the benchmark runs it as a subprocess, so meshserve's
# process imports no llama_cpp. Compiled with -march=native (GGML_NATIVE) for the CPU it runs on, so a venv built on
# one machine is only fair on that kind of machine; rebuild it elsewhere. Took ~4.5 minutes on a 2-core Xeon VM
# (2026-12-05). An existing venv at the same place is replaced.
#
# Environment: LLAMACPP_VENV (where to put it), LLAMACPP_PYTHON_VERSION (default 0.3.36, the version of
# shared/PERFORMANCE.md's table), PYTHON (the interpreter the venv is made from), CMAKE_BUILD_PARALLEL_LEVEL
# (compile jobs, default 2).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLAMACPP_VENV:-$repo/.venv-llamacpp}"
version="${LLAMACPP_PYTHON_VERSION:-0.3.36}"
python="${PYTHON:-python3}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

# GGML_NATIVE defaults to off when SOURCE_DATE_EPOCH is set (reproducible builds): ask for it explicitly.
# No BLAS (ggml's own CPU kernels, as llama.cpp ships), no curl, no llava/mtmd library (not used, half the build).
unset SOURCE_DATE_EPOCH
cmake_args="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DCMAKE_BUILD_TYPE=Release"
# -march=native turns on AMX where the CPU has it (Sapphire Rapids and later), and ggml's AMX path for quantized
# weights segfaults in ggml_backend_amx_mul_mat on the shipped Q4_1 file here (llama.cpp issues 20824, PR 16315:
# wrong results for Q4_0/Q4_1). Explicit -mno-amx-* win over -march=native whatever their order. F32 and F16
# weights never take that path, so those rows are unaffected; quantized ones use ggml's AVX-512 kernels.
if [ "$(uname -m)" = x86_64 ]; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake_args="$cmake_args -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
fi
export CMAKE_ARGS="$cmake_args"

echo "installing llama-cpp-python==$version into $venv (CMAKE_ARGS: $CMAKE_ARGS, $CMAKE_BUILD_PARALLEL_LEVEL jobs)"
start=$(date +%s)
if [ -e "$venv" ]; then
  [ -f "$venv/pyvenv.cfg" ] || { echo "$venv exists and is not a venv; set LLAMACPP_VENV elsewhere" >&2; exit 1; }
  rm -rf "$venv"
fi
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$version"
"$venv/bin/python" - <<'EOF'
import llama_cpp

info = llama_cpp.llama_print_system_info().decode()
print(f"llama_cpp {llama_cpp.__version__}: {info}")
if "AVX2 = 1" not in info and "AVX512 = 1" not in info and "NEON = 1" not in info:
    raise SystemExit("llama.cpp was built without the CPU's vector extensions; check GGML_NATIVE above")
if "AMX_INT8 = 1" in info:
    raise SystemExit("llama.cpp was built with its AMX path, which crashes on quantized weights; see above")
EOF
echo "done in $(( $(date +%s) - start )) s: $venv"
