#!/usr/bin/env bash
# FP8 attention from a token count (`fp8_attention_min_tokens`) against bf16 cuDNN attention at every length: the
# measurement that made it the h100/h200 default on 2026-12-04 (benchmarks/results/2026-12-04a-h200-fp8-threshold/).
# One GPU call per invocation (device tool; carry .device with the nvidia-cudnn-frontend wheel).
#
# Packages (each either carried as a tar or built in this call, concurrently, 8 compile workers each):
#   prev      = h200 with `--attention cudnn` (bf16 cuDNN attention, the default before 2026-12-04):
#               PREV_TAR, else built -> $OUT/package-prev.tar
#   threshold = h200.toml with fp8_attention_min_tokens = MIN_TOKENS (default: the recipe's, 4096):
#               THRESHOLD_TAR, else built -> $OUT/package-threshold.tar
#   fp8       = FP8 attention at every length: FP8_TAR only (optional; e.g. from bench_speed_levers.sh
#               LEVERS=fp8attn KEEP_PACKAGES=1)
# Then bench.variants (r64 in slots and no LoRA, plain chain, kernel breakdowns) at each of SIZES
# (default "512 2048 1024"): 512^2 runs the bf16 branch, 1024^2 (4608 + 512 tokens) and 2048^2 the FP8 one; at 512^2
# and 1024^2 both packages' steps are also timed from CUDA graphs (the runtime's default).
# Budget: two builds ~200-280 s together; each size ~60-150 s. With nothing carried, run SIZES=512 first, then
# carry the two tars back as PREV_TAR / THRESHOLD_TAR with SIZES="2048 1024".
#   SIZES=512 bash scripts/gpu/bench_fp8_attention_threshold.sh
#   PREV_TAR=artifacts/package-prev.tar THRESHOLD_TAR=artifacts/package-threshold.tar SIZES="2048 1024" bash scripts/gpu/bench_fp8_attention_threshold.sh
# Runs: 2026-12-03 (below the threshold only): benchmarks/results/2026-12-03m-h200-fp8-attention/d-threshold/;
# 2026-12-04, all three sizes, both commands above (when h200.toml still had bf16 attention; these lines now make
# the same two packages): benchmarks/results/2026-12-04a-h200-fp8-threshold/.
source scripts/gpu/env.sh
python3 -c "import cudnn" || { echo "carry the nvidia-cudnn-frontend wheel in .device/wheels" >&2; exit 1; }
OUT=${OUT:?set OUT}
mkdir -p "$OUT" /tmp/recipes

unpack_or_queue() {  # label, tar variable name: unpack a carried package, or write its recipe for a build
  local label=$1 tar=${!2:-}
  rm -rf "/tmp/pkg-$label"
  if [ -n "$tar" ]; then
    mkdir -p "/tmp/pkg-$label" && tar xf "$tar" -C "/tmp/pkg-$label" || exit 1
    return 1
  fi
  return 0
}
builds=()
declare -A extra_args=([prev]="--attention cudnn" [threshold]="")
if unpack_or_queue prev PREV_TAR; then
  cp aotpack/recipes/h200.toml /tmp/recipes/prev.toml
  builds+=(prev)
fi
if unpack_or_queue threshold THRESHOLD_TAR; then
  # a recipe on h200 (not sed over its lines, which did nothing where a line had changed); the build refuses a
  # field it does not know
  printf 'base = "h200"\nname = "threshold"\nattention = "cudnn_fp8"\nfp8_attention_min_tokens = %s\n' \
    "${MIN_TOKENS:-4096}" > /tmp/recipes/threshold.toml
  builds+=(threshold)
fi
rm -rf /tmp/pkg-fp8
[ -n "${FP8_TAR:-}" ] && { unpack_or_queue fp8 FP8_TAR; }
for label in "${builds[@]}"; do
  timeout "${BUILD_TIMEOUT:-330}" python3 -m aotpack build --model random:flux-dev --target "/tmp/recipes/$label.toml" \
    ${extra_args[$label]} --workers "${WORKERS:-8}" --out "/tmp/pkg-$label" > "$OUT/build-$label.log" 2>&1 &
done
wait
for label in "${builds[@]}"; do
  echo "build $label:"; tail -3 "$OUT/build-$label.log"
  [ -f "/tmp/pkg-$label/manifest.json" ] && tar cf "$OUT/package-$label.tar" -C "/tmp/pkg-$label" .
done
cp /tmp/pkg-threshold/manifest.json "$OUT/manifest-threshold.json" 2>/dev/null

step() {  # size, graphed labels ("" for none), labels
  local size=$1 graphed=$2; shift 2
  local args=()
  for label in "$@"; do [ -d "/tmp/pkg-$label" ] && args+=(--variant "$label=/tmp/pkg-$label"); done
  for label in $graphed; do [ -d "/tmp/pkg-$label" ] && args+=(--graph-variant "$label"); done
  timeout "${STEP_TIMEOUT:-300}" python3 -m aotpack.bench.variants --model random:flux-dev --out "$OUT/$size" \
    --height "$size" --width "$size" "${args[@]}" 2>&1 | grep "^\[variants\]" | cut -c1-200
}
for size in ${SIZES:-512 2048 1024}; do
  case $size in
    512|1024) step "$size" "prev threshold" prev threshold fp8 ;;
    *) step "$size" "" prev threshold fp8 ;;
  esac
done
