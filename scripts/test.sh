#!/usr/bin/env bash
# The test suite: builds real AOTInductor packages on the CPU and compares with diffusers + PEFT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m pytest -q "$@"
