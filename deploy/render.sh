#!/usr/bin/env bash
# Renders each region's overlay into deploy/rendered/<region>.yaml, the form tests/test_deploy.py validates and
# `kubectl apply -f` takes. Run after editing anything under deploy/base or deploy/overlays; the test fails while
# a rendered file differs from its overlay (where kubectl or kustomize is installed).
set -euo pipefail
cd "$(dirname "$0")"
if command -v kustomize >/dev/null 2>&1; then
  render=(kustomize build)
elif command -v kubectl >/dev/null 2>&1; then
  render=(kubectl kustomize)
else
  echo "error: needs kustomize or kubectl (its built-in kustomize)" >&2
  exit 1
fi
for overlay in overlays/*/; do
  region=$(basename "$overlay")
  {
    echo "# Rendered from deploy/overlays/$region by deploy/render.sh: edit the overlay, not this file."
    "${render[@]}" "$overlay"
  } > "rendered/$region.yaml"
  echo "rendered/$region.yaml"
done
