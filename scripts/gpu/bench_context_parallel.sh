#!/usr/bin/env bash
# Context parallel on the `nvidia-h200-x2` machine, one device call (< 9 min; device tool, carry .device):
#   `aotpack build --model random:flux-dev --target h200 --parallel ulysses` (skipped when PKG names a
#   carried package directory), then `python -m aotpack.bench.context_parallel`: 1 vs 2 GPUs at SIZES
#   (default 1024; "1024 2048" if the build is carried), 28 steps, rank-64 LoRA: transformer ms/step,
#   image s, all-to-all ms/step, output error vs 1 GPU, cached LoRA switch, load and first-image times.
#   Writes $OUT/context_parallel.{json,md} (+ build.log, manifest.json).
# GPUS: the rank counts besides 1 (default "2"); on the 4- and 8-GPU kinds (issue 16, one call per kind):
#   GPUS="2 4" SIZES="1024 2048" bash scripts/gpu/bench_context_parallel.sh      # nvidia-h200-x4
#   GPUS="2 4 8" SIZES="1024 2048" bash scripts/gpu/bench_context_parallel.sh    # nvidia-h200-x8
# (if 2048² does not fit the 10-minute call with the build, carry package.tar and run SIZES=2048 alone).
# CPU smoke test (gloo ranks, tiny model; no GPU needed):
#   OUT=/tmp/cp-smoke SMOKE=1 bash scripts/gpu/bench_context_parallel.sh
set -o pipefail
if [ -n "${SMOKE:-}" ]; then
  PY=${PY:-.venv/bin/python}
  mkdir -p "$OUT"
  PKG=${PKG:-/tmp/cp-smoke-pkg}
  [ -f "$PKG/manifest.json" ] || $PY -m aotpack build --model tiny --target cpu --parallel ulysses --out "$PKG" \
    2>&1 | tail -3 || exit 1
  exec $PY -m aotpack.bench.context_parallel --package "$PKG" --model tiny --out "$OUT" --gpus ${GPUS:-2} \
    --sizes 64 128 --steps 2 --text-tokens 32 --repeats 2 --lora r16-attn --overlap-chunks 2
fi
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
nvidia-smi topo -m | head -4
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
if [ -z "${PKG:-}" ]; then
  PKG=/tmp/pkg-ulysses
  python3 -m aotpack build --model random:flux-dev --target h200 --parallel ulysses --out "$PKG" 2>&1 \
    | tee "$OUT/build.log" || exit 1
fi
cp "$PKG/manifest.json" "$OUT/manifest.json"
# The package (programs only; weights are bound at load) comes back for a second call: untar it into a
# carried folder and pass PKG=that/folder SIZES="1024 2048".
[ "${KEEP_PACKAGE:-1}" = 1 ] && tar cf "$OUT/package.tar" -C "$PKG" .
# OVERLAP: Ulysses.overlap_chunks values timed beside 1; GRAPHS=1: also steps replayed from CUDA graphs
# (collectives captured), in launches of their own after the main rows; BENCH_TIMEOUT bounds a hang there.
timeout ${BENCH_TIMEOUT:-540} python3 -m aotpack.bench.context_parallel --package "$PKG" --model random:flux-dev \
  --out "$OUT" --gpus ${GPUS:-2} --sizes ${SIZES:-1024} --steps 28 --overlap-chunks ${OVERLAP:-2 4} \
  ${GRAPHS:+--cuda-graphs} 2>&1 | tee "$OUT/context_parallel.log"
