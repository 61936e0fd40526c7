#!/usr/bin/env bash
# Issues 4+5 on the GPU machine in one command (random FLUX.1-dev weights):
#   1. `aotpack build --target h200` of the full-size transformer (validated against eager);
#   2. aotpack vs eager bf16+PEFT vs the torch.compile+FP8+hotswap recipe, same process and GPU,
#      including the served 1024x1024 images with LoRAs switched (serve_demo).
# Usage (device tool, carry .device): bash scripts/gpu/build_and_serve.sh
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
set -o pipefail
python3 -m aotpack.cli build --model random:flux-dev --target h200 --out /tmp/pkg 2>&1 | tee "$OUT/build.log" || exit 1
cp /tmp/pkg/manifest.json "$OUT/manifest.json"
python3 -m aotpack.bench.compare --package /tmp/pkg --model random:flux-dev --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/build.log"
