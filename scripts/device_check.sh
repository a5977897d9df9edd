#!/usr/bin/env bash
# The one prepared command for a machine with an accelerator (see scripts/device_check.py for what it checks).
#
# Usage: scripts/device_check.sh [OUTDIR] [device_check.py flags...]
#   OUTDIR: where device_check.json, device_check.md and device_check.log go (default: $OUT, else ./device_check_out)
#   PYTHON: the interpreter (default python3); only JAX, flax and numpy (+ absl) are needed, nothing is installed.
#   DEVICE_CHECK_LIMIT_S: hard wall-clock limit (default 480); at the limit the run is interrupted and still writes
#   what it measured. On a machine without an accelerator it runs the tiny CPU profile (or pass --mode=tiny).
#
# Exit status: 0 when every step ran and every check passed, else non-zero (the reasons end the summary).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$root/device_check_out}"
if [[ $# -gt 0 && "$1" != -* ]]; then
  out="$1"
  shift
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
limit="${DEVICE_CHECK_LIMIT_S:-480}"
cmd=("${PYTHON:-python3}" scripts/device_check.py --out="$out" "$@")
if command -v timeout >/dev/null; then
  # SIGINT first: Python turns it into KeyboardInterrupt and writes its results; SIGKILL 30 s later if it hangs
  cmd=(timeout --signal=INT --kill-after=30 "$limit" "${cmd[@]}")
fi
"${cmd[@]}" 2>&1 | tee "$out/device_check.log"
exit "${PIPESTATUS[0]}"
