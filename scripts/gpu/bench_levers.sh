#!/usr/bin/env bash
# GPU call (carry .device and artifacts/h200): the levers, one at a time, and the switch path again.
# 1. serve_demo on the full random:flux-dev package from the first call (artifacts/h200/package.tar):
#    load, switches (cached and from file), images, with the switch-path changes made since.
# 2. Package variants of random:flux-dev-d2s4 (FLUX.1-dev widths, 6 blocks), built concurrently from
#    variant recipes of h200.toml, then stepped side by side: none (no slots), r64 (default),
#    r64-grouped (group_lora_down = true), r64-autotune ([inductor] max_autotune = true).
source scripts/gpu/env.sh
MODEL=random:flux-dev-d2s4
mkdir -p /tmp/pkg /tmp/recipes /tmp/variants "$OUT/serve"
if [ "${SERVE:-1}" = 1 ]; then  # SERVE=0: variants only
  tar xf artifacts/h200/package.tar -C /tmp/pkg || exit 1
  timeout "${SERVE_TIMEOUT:-180}" python3 -m aotpack.bench.serve_demo --package /tmp/pkg --model random:flux-dev \
    --out "$OUT/serve" > "$OUT/serve/serve.log" 2>&1
  echo "serve_demo: exit $?"; tail -8 "$OUT/serve/serve.log"
fi

variant() {  # name, group_lora_down value, extra TOML -> a recipe on h200 (sed over its lines did nothing where one moved)
  printf 'base = "h200"\nname = "%s"\ngroup_lora_down = %s\n%s' "$1" "$2" "${3:-}" > "/tmp/recipes/$1.toml"
}
variant grouped true
variant plain false
variant autotune false $'[inductor]\nmax_autotune = true\n'
build() {  # label, timeout, recipe, extra args...
  local label=$1 limit=$2 recipe=$3; shift 3
  timeout "$limit" python3 -m aotpack build --model $MODEL --target "$recipe" --workers 4 \
    --out "/tmp/variants/$label" "$@" > "/tmp/variants-$label.log" 2>&1
  echo "build $label: exit $? after $SECONDS s" >> /tmp/variants-status.log
}
SECONDS=0
LIMIT=${BUILD_TIMEOUT:-330}
build none $LIMIT /tmp/recipes/plain.toml --max-rank 0 & build r64 $LIMIT /tmp/recipes/plain.toml --max-rank 64 &
build r64-grouped $LIMIT /tmp/recipes/grouped.toml --max-rank 64 &
build r64-autotune "${AUTOTUNE_TIMEOUT:-$LIMIT}" /tmp/recipes/autotune.toml --max-rank 64 &
wait
cat /tmp/variants-status.log
for f in /tmp/variants-*.log; do  # the first error lines too: a failed build's tail is mostly C++ frames
  echo "===== $f"; grep -m5 -n -E "Error|error:" "$f"; tail -25 "$f"
done > "$OUT/variants_build.log"
args=()
for label in none r64 r64-grouped r64-autotune; do args+=(--variant "$label=/tmp/variants/$label"); done
python3 -m aotpack.bench.variants --model $MODEL --out "$OUT" "${args[@]}" 2>&1 | tee "$OUT/variants.log" | cut -c1-300
