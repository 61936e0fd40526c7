#!/usr/bin/env bash
# One GPU call (device tool, carry .device; about 7 min of the 9): build the h200 package of random
# FLUX.1-dev weights, then `aotpack bench serve-load` through the HTTP server on loopback: REQUESTS
# (default 40) requests at 1024x1024, 28 steps, 512 text tokens, over 8 rank-64 LoRAs on every block
# linear (687 MB each, random), Zipf popularity, LoRA affinity vs FIFO (both with adapter prefetch).
# Writes $OUT/serve_load.{json,md}, per-request JSON per policy and the build log; prints the table last.
#
# The web stack comes as python 3.12 wheels in .device/wheels (fastapi, starlette, pydantic,
# pydantic_core, annotated_types, annotated_doc, typing_inspection, typing_extensions, anyio, sniffio,
# idna, h11, uvicorn, httpx, httpcore, certifi, prometheus_client, opentelemetry_api, click), installed
# by scripts/gpu/env.sh with the others.
#
# CPU smoke test (tiny model, ~1 min with the build; BUILD=0 reuses the package):
#   OUT=/tmp/serve-load TARGET=cpu MODEL=tiny SIZE=128x128 STEPS=4 RANK=16 TEXT=32 bash scripts/gpu/bench_serve_load.sh
set -o pipefail
TARGET=${TARGET:-h200}
MODEL=${MODEL:-random:flux-dev}
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
if [ "$TARGET" = cpu ]; then
  PY=${PY:-.venv/bin/python}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a shared CPU: OpenMP spin-waits make tiny ops erratic
else
  source scripts/gpu/env.sh
  PY=python3
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
fi
$PY -c "import fastapi, uvicorn, httpx, prometheus_client" \
  || { echo "the web stack is missing: put its py3.12 wheels in .device/wheels (see the top of this script)"; exit 1; }
PKG=${PKG:-/tmp/serve-load-pkg-$TARGET}
started=$(date +%s)
if [ "${BUILD:-1}" = 1 ] || [ ! -f "$PKG/manifest.json" ]; then  # BUILD=0 reuses a package built before
  $PY -m aotpack build --model "$MODEL" --target "$TARGET" --out "$PKG" 2>&1 | tee "$OUT/build.log" || exit 1
fi
echo "build: $(( $(date +%s) - started )) s"
$PY -m aotpack bench serve-load --package "$PKG" --model "$MODEL" --out "$OUT" \
  --requests "${REQUESTS:-40}" --adapters "${ADAPTERS:-8}" --rank "${RANK:-64}" --size "${SIZE:-1024x1024}" \
  --steps "${STEPS:-28}" --max-sequence-length "${TEXT:-512}" --max-wait "${MAX_WAIT:-600}" \
  --cache-gib "${CACHE_GIB:-4}" --time-limit "${TIME_LIMIT:-170}" --policies "${POLICIES:-affinity,fifo}" \
  --label "${LABEL:-$TARGET, random $MODEL weights}" 2>&1 | tee "$OUT/serve_load.log" || exit 1
echo "total: $(( $(date +%s) - started )) s"
