#!/usr/bin/env bash
# An environment setting read once per process (cuBLAS/cuBLASLt workspaces, allocator options), A/B on one package:
# the variants bench (r64 in slots and no LoRA; CUDA graphs from an idle device and ten steps in a row) in
# alternating processes, side A then side B, ROUNDS times at each of SIZES, one summary line per process.
#   ENV_A / ENV_B: arguments for `env` (assignments, `-u NAME` to unset), e.g. ENV_B="CUBLAS_WORKSPACE_CONFIG=:0:0";
#   LABEL_A / LABEL_B name the sides (default a, b). Carry .device and the package tar:
#   PACKAGE_TAR=artifacts/package-rowamax.tar ENV_B="CUBLAS_WORKSPACE_CONFIG=:0:0" bash scripts/gpu/bench_env_ab.sh
source scripts/gpu/env.sh
mkdir -p /tmp/pkg "$OUT"
tar xf "${PACKAGE_TAR:?a default h200 package as a tar}" -C /tmp/pkg || exit 1
for round in $(seq "${ROUNDS:-2}"); do
  for size in ${SIZES:-1024 512}; do
    for side in A B; do
      settings_name="ENV_$side" label_name="LABEL_$side"
      settings=${!settings_name:-} label=${!label_name:-$(echo "$side" | tr AB ab)}
      out="$OUT/$size-$label-round$round"
      # shellcheck disable=SC2086 # word splitting of the settings is the point
      env $settings timeout "${VARIANTS_TIMEOUT:-150}" python3 -m aotpack.bench.variants --model random:flux-dev \
        --out "$out" --height "$size" --width "$size" --variant default=/tmp/pkg --graph-variant default > "$out.log" 2>&1
      python3 - "$out/variants.json" "$size" "$label" "$round" "$settings" <<'PY'
import json, sys
path, size, label, round_, settings = sys.argv[1:]
v = json.load(open(path))["variants"]["default"]
ms = lambda key: v[key]["median_ms"] if isinstance(v.get(key), dict) and "median_ms" in v[key] else None
print(json.dumps({"size": int(size), "side": label, "settings": settings, "round": int(round_),
                  "slots_plain": ms("step"), "no_lora_plain": ms("step_no_lora"), "slots_graph": ms("step_cuda_graph"),
                  "slots_graph_back_to_back": ms("step_cuda_graph_back_to_back")}))
PY
    done
  done
done | tee "$OUT/summary.jsonl"
