#!/usr/bin/env bash
# The default h200 build timed as a user's first build runs it (empty Inductor and Triton caches), once per line of
# VARIANTS, "LABEL [VAR=VALUE ...]", one build after another (never at once: they would share the 16 cores).
# Results under $OUT: builds.txt (exit status and seconds of each), LABEL.log (the build's progress, with each
# program's compile: wall and CPU seconds and torch's compile phases) and LABEL-build.json (the manifest's build
# record); with KEEP_PACKAGE="LABEL ..." those builds' packages as $OUT/package-LABEL.tar (carry it as PACKAGE_TAR later).
# Carry .device (the wheels). ~230-250 s a build on the H200 (2026-12-05), so two builds fill one call. E.g.
#   VARIANTS=$'default\nlean AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL=O0 TORCHINDUCTOR_COMPILE_THREADS=2' \
#     KEEP_PACKAGE=default bash scripts/gpu/bench_build.sh
# TARGET (default h200) names the recipe built, e.g. TARGET=h100, or a recipe file's path (base = "h200" and the fields
# it changes, e.g. `[inductor]` "aot_inductor.precompile_headers" = false).
# PROFILE=1: each program's compile profiled by Python's cProfile into $OUT/LABEL-profiles/PROGRAM.profile.txt
# (AOTPACK_PROFILE_COMPILE): which function holds the 50-80 s a concurrent compile spends outside torch's timers.
source scripts/gpu/env.sh
VARIANTS=${VARIANTS:-default}
TARGET=${TARGET:-h200}
mkdir -p "$OUT"
while read -r label settings; do
  [ -n "$label" ] || continue
  caches=/tmp/build-caches/$label package=/tmp/build-$label
  rm -rf "$caches" "$package"
  started=$(date +%s)
  # AOTPACK_TREE=DIR among a line's settings builds with the aotpack found in DIR (e.g. an older commit's, made by
  # `git archive COMMIT aotpack | tar -x -C artifacts/old-COMMIT` and carried): an A/B of two versions in one call
  tree=$PWD
  for word in $settings; do case $word in AOTPACK_TREE=*) tree=$PWD/${word#AOTPACK_TREE=} ;; esac; done
  profiles=""
  [ "${PROFILE:-0}" = 1 ] && profiles="AOTPACK_PROFILE_COMPILE=$OUT/$label-profiles"
  # shellcheck disable=SC2086  # settings and profiles: VAR=VALUE words for env
  (cd "$tree" && env PYTHONPATH="$tree:/tmp/site" TORCHINDUCTOR_CACHE_DIR="$caches/inductor" \
    TRITON_CACHE_DIR="$caches/triton" $profiles $settings \
    python3 -m aotpack build --model random:flux-dev --target "$TARGET" --out "$package") > "$OUT/$label.log" 2>&1
  status=$?
  echo "build $label (${settings:-as the CLI runs it}): exit $status after $(( $(date +%s) - started )) s" \
    | tee -a "$OUT/builds.txt"
  [ $status -eq 0 ] || continue
  python3 -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))['build'], indent=1))" \
    "$package/manifest.json" > "$OUT/$label-build.json"
  [[ " ${KEEP_PACKAGE:-} " == *" $label "* ]] && tar cf "$OUT/package-$label.tar" -C "$package" .
done <<< "$VARIANTS"
