#!/usr/bin/env bash
# GPU call 3 of the benchmark: cold start, fresh process to first 1024x1024 image, for aotpack (the
# package from call 1, carried as artifacts/h200/package.tar), the JIT recipe with empty compile
# caches, and the recipe warm-started from its saved compile cache. Nothing else runs meanwhile.
source scripts/gpu/env.sh
mkdir -p /tmp/pkg && tar xf artifacts/h200/package.tar -C /tmp/pkg || exit 1
python3 -m aotpack.bench.cold_start --package /tmp/pkg --model random:flux-dev --out "$OUT" 2>&1 | tail -20
