#!/usr/bin/env bash
# Issue 11 in one GPU call (device tool, carry .device; < 9 min on one H200): build the default
# package (with its no-slot programs), then in ONE process eager bf16 + PEFT, the compiled recipe,
# aotpack with a rank-64 LoRA in slots / no LoRA / merged: step ms, error vs eager, LoRA fidelity,
# merge + unmerge ms, cached switch ms and the kernel breakdown -> $OUT/speed.json, $OUT/speed.md.
#
# Knobs (env): KERNEL_SOURCES (=1: the build and the bench each get their own Inductor cache dir and
# $OUT/kernels-aotpack.tar.gz / kernels-recipe.tar.gz keep their generated Triton sources and chosen
# configs, to compare the fused kernels one by one), MODEL (random:flux-dev), TARGET (h200), SIZES (1024; "512,1024,2048" if time allows),
# TEXT_TOKENS (512), BATCH (1), PACKAGE_TAR (package.tar of an earlier call: no build), MAX_RANK (the target's; the cpu target's 32 is below the r64 LoRA), SKIP_RECIPE (set to skip the recipe), LORA_STD (random LoRA factor std, default 0.02: raise it for a fidelity that stands above FP8 noise), FIDELITY_STDS (e.g. "0.25,0.4": the fidelity sweep at the first size), PRECISE_REFERENCE (=1: the sweep also against the eager model upcast to float32, +48 GB at FLUX.1-dev's size), PACKAGE (an existing package: no build), RECIPE_MODE (the recipe's torch.compile mode, e.g. reduce-overhead: CUDA graphs), REPEATS (timed steps per mode, default 10: fewer to fit 2048² with the recipe into one call), MERGE_SHARES (e.g. "0.3,0.5,0.7": partial merges timed beside the whole one).
# Time: the recipe compiles again for a second size; SIZES="512,1024" with the recipe ran past 580 s on
# 2026-12-01 even without a build: one size per call when the recipe is in. 2048² with the recipe: carry the package
# (PACKAGE_TAR) and try REPEATS=5 (2026-12-03: 1024² took 546 s with the build, 512² 325-433 s without, 2048² at REPEATS=5 347 s without).
# CPU smoke test (this machine, minutes):
#   LOCAL=1 OUT=/tmp/speed MODEL=random:tiny-deep TARGET=cpu MAX_RANK=64 SIZES=64 TEXT_TOKENS=16 bash scripts/gpu/bench_speed.sh
set -o pipefail
if [ -n "${LOCAL:-}" ]; then
  PYTHON=${PYTHON:-.venv/bin/python}
else
  source scripts/gpu/env.sh
  PYTHON=python3
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
fi
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
MODEL=${MODEL:-random:flux-dev}
TARGET=${TARGET:-h200}
PKG=${PACKAGE:-/tmp/pkg-speed}
BUILD_ARGS=""
if [ -n "${PACKAGE_TAR:-}" ]; then
  PACKAGE=$PKG; rm -rf "$PKG"; mkdir -p "$PKG" && tar xf "$PACKAGE_TAR" -C "$PKG" || exit 1
fi
if [ -n "${KERNEL_SOURCES:-}" ]; then
  rm -rf /tmp/inductor-build /tmp/inductor-bench
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-build
fi
if [ -z "${PACKAGE:-}" ]; then
  rm -rf "$PKG"  # our scratch folder; the build refuses to overwrite a package
  started=$(date +%s.%N)
  $PYTHON -m aotpack build --model "$MODEL" --target "$TARGET" ${MAX_RANK:+--max-rank $MAX_RANK} --out "$PKG" 2>&1 | tee "$OUT/build.log" || exit 1
  ended=$(date +%s.%N)
  cp "$PKG/manifest.json" "$OUT/manifest.json"
  $PYTHON - "$PKG" "$started" "$ended" > "$OUT/build.json" <<'PY'
import json, pathlib, sys
pkg = pathlib.Path(sys.argv[1])
manifest = json.loads((pkg / "manifest.json").read_text())
size = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
print(json.dumps({"build_seconds": round(float(sys.argv[3]) - float(sys.argv[2]), 1),
                  "manifest_build_seconds": manifest["build"]["seconds"],
                  "compile_seconds": manifest["build"]["compile_seconds"], "package_mb": round(size / 1e6, 2),
                  "programs": [[p["name"], p.get("rank")] for p in manifest["programs"]],
                  "validation": {k: manifest["validation"].get(k) for k in ("max_rel_error", "max_program_rel_error")}}))
PY
  cat "$OUT/build.json"
  tar cf "$OUT/package.tar" -C "$PKG" .  # for a second call: PACKAGE_TAR=<that file> skips the build
  BUILD_ARGS="--build-json $OUT/build.json"
fi
[ -n "${KERNEL_SOURCES:-}" ] && export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-bench  # the recipe's JIT kernels
$PYTHON -m aotpack.bench.speed --package "$PKG" --model "$MODEL" --out "$OUT" --sizes "${SIZES:-1024}" \
  --text-tokens "${TEXT_TOKENS:-512}" --batch "${BATCH:-1}" ${SKIP_RECIPE:+--skip-recipe} ${LORA_STD:+--lora-std $LORA_STD} \
  ${FIDELITY_STDS:+--fidelity-stds $FIDELITY_STDS} ${PRECISE_REFERENCE:+--precise-reference} ${RECIPE_MODE:+--recipe-compile-mode $RECIPE_MODE} \
  ${REPEATS:+--repeats $REPEATS} ${MERGE_SHARES:+--merge-shares $MERGE_SHARES} $BUILD_ARGS \
  2>&1 | tee "$OUT/speed.log"
if [ -n "${KERNEL_SOURCES:-}" ]; then  # Triton sources (*.py) and autotune picks (*.best_config) only
  for which in build:aotpack bench:recipe; do
    [ -d "/tmp/inductor-${which%%:*}" ] || continue  # no build in this call (PACKAGE_TAR): no aotpack kernels
    (cd /tmp/inductor-${which%%:*} && find . \( -name '*.py' -o -name '*.best_config' \) -print0 |
      tar czf "$OUT/kernels-${which##*:}.tar.gz" --null -T -)
  done
  ls -l "$OUT"/kernels-*.tar.gz
fi
cat "$OUT/speed.md"
