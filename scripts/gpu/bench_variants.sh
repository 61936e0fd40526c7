#!/usr/bin/env bash
# GPU call 2 of the benchmark: package variants of random FLUX.1-dev-width weights at 2 double + 4
# single blocks (random:flux-dev-d2s4), built concurrently, then measured side by side:
#   none / r64 / r128: LoRA-slot overhead (regional); whole-r64: the whole-program layout.
source scripts/gpu/env.sh
MODEL=random:flux-dev-d2s4
build() {  # label, extra args...
  local label=$1; shift
  timeout "${BUILD_TIMEOUT:-420}" python3 -m aotpack build --model $MODEL --target h200 --workers 4 \
    --out "/tmp/variants/$label" "$@" > "/tmp/variants-$label.log" 2>&1
  echo "build $label: exit $?" >> /tmp/variants-status.log
}
mkdir -p /tmp/variants
build none --max-rank 0 & build r64 --max-rank 64 & build r128 --max-rank 128 & build whole-r64 --layout whole &
wait
cat /tmp/variants-status.log
for f in /tmp/variants-*.log; do echo "===== $f"; tail -25 "$f"; done > "$OUT/variants_build.log"
args=()
for label in none r64 r128 whole-r64; do
  # only built ones: the bench refuses a --variant without a package (a failed build is in the log above)
  [ -f "/tmp/variants/$label/manifest.json" ] && args+=(--variant "$label=/tmp/variants/$label")
done
python3 -m aotpack.bench.variants --model $MODEL --lora-dir /tmp/aotpack-bench-loras --out "$OUT" --graph-variant r64 "${args[@]}" 2>&1 | tee "$OUT/variants.log"
