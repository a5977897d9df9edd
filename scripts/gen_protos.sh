#!/usr/bin/env bash
# Regenerates the committed Python code for protos/ (run after editing a .proto; tests fail until you do).
#
# Usage: [PYTHON=python] scripts/gen_protos.sh [OUTPUT_ROOT]   (default: the repository root, i.e. in place)
# PYTHON must have grpcio-tools (the dev extra); `make protos` passes the project's virtualenv.
#
# Protos are compiled with the repository root as the include path, so the generated modules import each other as
# `protos.meshserve.v1...`: the same package path works from a checkout and from an installed wheel.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root}"
cd "$root"
"${PYTHON:-python3}" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" \
  protos/meshserve/v1/meshserve.proto
