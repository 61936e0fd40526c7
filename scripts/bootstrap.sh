#!/usr/bin/env bash
# Create .venv (if needed) and install aotpack with its test extras, offline-safe on a CPU machine.
# torch is pinned to the CPU build (2.13.0) here; the package metadata accepts the tested series, torch>=2.11,<2.14.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# --index-url/extra indexes are whatever pip is configured with; torch==2.13.0 resolves to the local CPU wheel.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
