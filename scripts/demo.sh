#!/usr/bin/env bash
# The main job, offline on the CPU: build the embedded tiny model's package, then generate PNGs
# with LoRAs hot-swapped in one process. Output: artifacts/demo/*.png
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
.venv/bin/aotpack demo --out artifacts/demo "$@"
