#!/usr/bin/env bash
# FP8 attention from a token count (`fp8_attention_min_tokens`, opt-in), one GPU call (device tool; carry .device
# with the nvidia-cudnn-frontend wheel, and two earlier packages as tars:
# PREV_TAR = the bf16-attention default of 2026-12-03k, FP8_TAR = the same recipe with FP8 attention at every
# length, from bench_speed_levers.sh LEVERS=fp8attn KEEP_PACKAGES=1). Builds h200.toml with attention = "cudnn_fp8" and
# fp8_attention_min_tokens = MIN_TOKENS (default 4096), then steps
# the packages side by side (bench.variants: r64 in slots and no LoRA, kernel breakdowns) at 512^2 (below the
# threshold: the bf16 branch), 2048^2 (the FP8 branch, against FP8 everywhere) and 1024^2 (SIZES). ~8 min; on
# 2026-12-03 the build and 512^2 fit, 2048^2 did not (device time): next, carry that call's package-threshold.tar as
# THRESHOLD_TAR (no build) and run SIZES="2048 1024".
#   PREV_TAR=artifacts/package-bf16mod.tar FP8_TAR=artifacts/package-fp8attn.tar bash scripts/gpu/bench_fp8_attention_threshold.sh
source scripts/gpu/env.sh
python3 -c "import cudnn" || { echo "carry the nvidia-cudnn-frontend wheel in .device/wheels" >&2; exit 1; }
OUT=${OUT:?set OUT}
for label in prev fp8; do
  mkdir -p "/tmp/pkg-$label"
  tar=PREV_TAR; [ $label = fp8 ] && tar=FP8_TAR
  tar xf "${!tar:?set $tar}" -C "/tmp/pkg-$label" || exit 1
done
rm -rf /tmp/pkg-threshold
if [ -n "${THRESHOLD_TAR:-}" ]; then
  mkdir -p /tmp/pkg-threshold && tar xf "$THRESHOLD_TAR" -C /tmp/pkg-threshold || exit 1
else
  sed "s/^attention = \"cudnn\"/attention = \"cudnn_fp8\"\nfp8_attention_min_tokens = ${MIN_TOKENS:-4096}/" \
    aotpack/recipes/h200.toml > /tmp/threshold.toml
  grep -q "^fp8_attention_min_tokens" /tmp/threshold.toml || { echo "h200.toml has no attention = \"cudnn\" line" >&2; exit 1; }
  timeout "${BUILD_TIMEOUT:-280}" python3 -m aotpack build --model random:flux-dev --target /tmp/threshold.toml --workers "${WORKERS:-8}" \
    --out /tmp/pkg-threshold > "$OUT/build.log" 2>&1
  echo "build: exit $?"; tail -3 "$OUT/build.log"
  tar cf "$OUT/package-threshold.tar" -C /tmp/pkg-threshold .
fi
cp /tmp/pkg-threshold/manifest.json "$OUT/manifest.json" || exit 1
step() {  # size, labels
  local size=$1; shift
  local args=()
  for label in "$@"; do args+=(--variant "$label=/tmp/pkg-$label"); done
  timeout 200 python3 -m aotpack.bench.variants --model random:flux-dev --out "$OUT/$size" --height "$size" \
    --width "$size" "${args[@]}" 2>&1 | grep "^\[variants\]" | cut -c1-200
}
for size in ${SIZES:-512 2048 1024}; do  # what each size compares: the branch it takes against its alternative
  case $size in
    512) step 512 prev threshold ;;
    1024) step 1024 prev fp8 threshold ;;
    *) step "$size" fp8 threshold ;;
  esac
done
