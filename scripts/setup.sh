#!/usr/bin/env bash
# Create .venv/ at the repository root and install dumo into it (editable).
#   scripts/setup.sh          the package with what the shipped configs read: scikit-learn (digits),
#                             Pillow (image folders), SciPy (the domain FD) -- the [images] extra
#   scripts/setup.sh --dev    the package plus test and lint tools
# PyTorch is installed first, only if the venv lacks it, as DUMO_TORCH names it:
#   package: torch==2.13.0, the small CPU build.
#   --dev:   torch==2.14.1 torchvision==0.29.1; the FID/IS tests need torchvision (through
#            torch-fidelity), and PyPI's torchvision does not import beside torch 2.13.0.
# Set DUMO_TORCH (e.g. "torch torchvision" with a CUDA index), or install your own torch into
# .venv before running this script; the package only asks for torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="[images]"
need="import torch"
default_torch="torch==2.13.0"
if [[ "${1:-}" == "--dev" ]]; then
  extra="[dev]"
  need="import torch, torchvision"
  default_torch="torch==2.14.1 torchvision==0.29.1"
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
if ! .venv/bin/python -c "$need" 2>/dev/null; then
  # shellcheck disable=SC2086  # the spec is a list of requirements
  .venv/bin/pip install --quiet ${DUMO_TORCH:-$default_torch}
fi
.venv/bin/pip install --quiet -e ".${extra}"
