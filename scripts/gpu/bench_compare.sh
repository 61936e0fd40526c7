#!/usr/bin/env bash
# GPU call 1 of the benchmark (device tool, carry .device; random FLUX.1-dev weights):
#   `aotpack build --target h200` of the full-size transformer (validated against eager), then
#   aotpack vs eager bf16+PEFT vs the torch.compile+FP8+hotswap recipe in one process
#   (`python -m aotpack.bench.compare`). The package comes back as $OUT/package.tar for call 2.
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
set -o pipefail
python3 -m aotpack build --model random:flux-dev --target h200 --out /tmp/pkg 2>&1 | tee "$OUT/build.log" || exit 1
cp /tmp/pkg/manifest.json "$OUT/manifest.json"
tar cf "$OUT/package.tar" -C /tmp/pkg .
python3 -m aotpack.bench.compare --package /tmp/pkg --model random:flux-dev --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/compare.log"
