#!/usr/bin/env bash
# The test suite: builds real AOTInductor packages on the CPU and compares with diffusers + PEFT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
# the slowest tests listed at the end: the suite should stay near 20 minutes on 2 cores (16:00-24:56 in 2026-12-06/07 runs, 874 tests in 19:22 on 2026-12-08)
.venv/bin/python -m pytest -q --durations=15 "$@"
