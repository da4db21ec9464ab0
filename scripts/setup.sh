#!/usr/bin/env bash
# Create .venv/ at the repository root and install dumo into it (editable).
#   scripts/setup.sh          the package
#   scripts/setup.sh --dev    the package plus test and lint tools
# PyTorch: if the venv has no torch yet, the CPU build named by DUMO_TORCH (default
# torch==2.13.0) is installed first. Set DUMO_TORCH="torch" with a CUDA index, or install your
# own torch into .venv before running this script; the package only asks for torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "${DUMO_TORCH:-torch==2.13.0}"
fi
.venv/bin/pip install --quiet -e ".${extra}"
