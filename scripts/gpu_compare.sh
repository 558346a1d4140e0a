#!/usr/bin/env bash
# Before/after comparison on a GPU machine with no package index: builds two
# source trees of jax_flash side by side, tests the new one and benchmarks
# both (before, after, before again: drift shows), so that a restructure can
# be shown to keep speed. Run from the repository root (the AFTER tree):
#
#   mkdir -p .before && git archive <rev> | tar -x -C .before
#   BEFORE=.before JAX_FLASH_HEADDIMS=128 STEPS="build bench" scripts/gpu_compare.sh
#
# Environment:
#   BEFORE               the old source tree (default .before in the repo root)
#   STEPS                any of build test bench (default "build test bench")
#   TREES                the trees the build step builds (default "before after")
#   JAX_FLASH_HEADDIMS   head dims built, ";"-separated (default "64;128;256");
#                        also the head dims benchmarked
#   JAX_FLASH_CUDA_ARCHS (default 90)
#   OUT                  logs, benchmark JSON (default /tmp/jax_flash_out)
#   WHEELS               holds the nvidia-cutlass wheel (default .whl/)
#   PYTEST_WORKERS (8), PYTEST_ARGS, TEST_BEFORE=1 (also test the old tree
#   with its own tests), SEQLENS (1024,...,16384), MODES (fwd,fwd_bwd),
#   CAUSAL (both), REPEATS (10), BENCH_ARGS (extra bench_attention options)
#
# Each tree installs into its own target dir (/tmp/jf_before, /tmp/jf_after)
# and builds in its own build/{wheel_tag} (pyproject.toml), so a second run
# on the same machine rebuilds incrementally; a tree whose compiled sources and
# build settings match the stamp of its last build is not rebuilt. Both trees are
# benchmarked with this tree's benchmarks/bench_attention.py, jax_flash only,
# so that only the library differs (--impls jax_flash: no cuDNN/XLA/torch
# peers). A row takes about 1-1.5 s (compile, 3 warm-up calls, REPEATS
# samples of ~50 ms); the default grid is 20 rows per head dim, so three
# head dims times three processes take about 3-4 minutes. Full logs land in
# $OUT; the summary tables come last.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export OUT=${OUT:-/tmp/jax_flash_out}; mkdir -p "$OUT"
BEFORE=${BEFORE:-$repo/.before}
[ -d "$BEFORE" ] || { echo "BEFORE=$BEFORE: no such directory"; exit 1; }
BEFORE=$(cd "$BEFORE" && pwd)
WHEELS=${WHEELS:-$repo/.whl}
STEPS=${STEPS:-build test bench}
export JAX_FLASH_HEADDIMS=${JAX_FLASH_HEADDIMS:-64;128;256}
export JAX_FLASH_CUDA_ARCHS=${JAX_FLASH_CUDA_ARCHS:-90}
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
has() { [[ " $STEPS " == *" $1 "* ]]; }
target() { echo "/tmp/jf_$1"; }
src() { if [ "$1" = before ]; then echo "$BEFORE"; else echo "$repo"; fi; }
rc=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
echo "before=$BEFORE after=$repo headdims=$JAX_FLASH_HEADDIMS archs=$JAX_FLASH_CUDA_ARCHS steps=$STEPS"

stamp() {  # sources and build settings of one tree
  echo "$(cd "$1" && find csrc CMakeLists.txt pyproject.toml -type f 2>/dev/null | sort |
    xargs cat | md5sum) $JAX_FLASH_CUDA_ARCHS $JAX_FLASH_HEADDIMS ${JAX_FLASH_LINEINFO:-}"
}
built() {  # the tree's install holds its extension and matches its stamp
  local t; t=$(target "$1")
  [ -f "$t.stamp" ] && [ "$(cat "$t.stamp")" == "$(stamp "$(src "$1")")" ] &&
    [ -n "$(find "$t/jax_flash" -name "*.so" 2>/dev/null | head -1)" ]
}

if has build; then
  todo=()
  for tree in ${TREES:-before after}; do
    if built $tree; then echo "== build $tree: up to date, skipped"; else todo+=("$tree"); fi
  done
  if [ ${#todo[@]} -gt 0 ]; then
    # Offline: build requirements come from the environment plus local wheels.
    python3 -c "import cutlass_library" 2>/dev/null ||
      python3 -m pip install -q --no-index --no-deps "$WHEELS"/nvidia_cutlass-*.whl || exit 1
  fi
  n_todo=${#todo[@]}; [ "$n_todo" -ge 1 ] || n_todo=1
  jobs_each=$(( $(nproc) / n_todo )); [ "$jobs_each" -ge 1 ] || jobs_each=1
  declare -A pid
  for tree in "${todo[@]}"; do
    t=$(target $tree)
    rm -rf "$t" "$t.stamp"
    # Both trees at once, half the cores each; the subshell times its own build.
    ( t0=$(date +%s)
      CMAKE_BUILD_PARALLEL_LEVEL=$jobs_each python3 -m pip install --no-build-isolation --no-deps -v \
        --target "$t" "$(src $tree)" > "$OUT/build_$tree.log" 2>&1; status=$?
      echo $(( $(date +%s) - t0 )) > "$OUT/build_$tree.seconds"
      [ $status -eq 0 ] && stamp "$(src $tree)" > "$t.stamp"
      exit $status ) &
    pid[$tree]=$!
  done
  failed=0
  for tree in before after; do
    [ -n "${pid[$tree]:-}" ] || continue
    if wait "${pid[$tree]}"; then
      echo "== build $tree took $(cat "$OUT/build_$tree.seconds") s ($jobs_each jobs; log $OUT/build_$tree.log)"
    else
      echo "== build $tree FAILED after $(cat "$OUT/build_$tree.seconds") s ($OUT/build_$tree.log):"
      grep -E "error" "$OUT/build_$tree.log" | head -20; tail -15 "$OUT/build_$tree.log"
      failed=1
    fi
  done
  [ $failed -eq 0 ] || exit 1
  for tree in before after; do
    so=$(find "$(target $tree)/jax_flash" -name "*.so" 2>/dev/null | head -1)
    [ -n "$so" ] && echo "   $tree extension: $(du -m "$so" | cut -f1) MB"
  done
fi

# Python changes need no rebuild (the stamp covers the compiled sources
# only): the after install takes this tree's current package.
[ -d "$(target after)/jax_flash" ] && cp -r "$repo"/jax_flash/. "$(target after)/jax_flash/"

# Tests and benchmarks import the installs, not the source trees.
cd /tmp
if has test; then
  trees=after; [ "${TEST_BEFORE:-0}" = 1 ] && trees="after before"
  for tree in $trees; do
    echo "== test $tree"
    # Reference matmuls of many shapes: autotuning each would dominate the tests.
    XLA_FLAGS=${XLA_FLAGS:---xla_gpu_autotune_level=0} PYTHONPATH=$(target $tree) python3 -m pytest -q -n "${PYTEST_WORKERS:-8}" "$(src $tree)/tests" \
      ${PYTEST_ARGS:-} > "$OUT/pytest_$tree.log" 2>&1 || rc=1
    grep -E "^(FAILED|ERROR) " "$OUT/pytest_$tree.log" | head -15
    tail -1 "$OUT/pytest_$tree.log"
  done
fi

if has bench; then
  bench_out=$OUT/bench; mkdir -p "$bench_out"
  headdims=${JAX_FLASH_HEADDIMS//;/,}
  files=()
  for run in before after before2; do
    tree=${run%2}
    t=$(target $tree)
    [ -n "$(find "$t/jax_flash" -name "*.so" 2>/dev/null | head -1)" ] || { echo "bench: $t has no extension (build step?)"; exit 1; }
    rm -f "$bench_out"/*_"$run".json
    t0=$(date +%s)
    PYTHONPATH=$t python3 -c "import jax_flash, os; assert jax_flash.__file__.startswith('$t/'), jax_flash.__file__" ||
      { echo "bench: jax_flash does not come from $t"; exit 1; }
    PYTHONPATH=$t python3 "$repo/benchmarks/bench_attention.py" --impls jax_flash \
      --headdims "$headdims" --seqlens "${SEQLENS:-1024,2048,4096,8192,16384}" \
      --modes "${MODES:-fwd,fwd_bwd}" --causal "${CAUSAL:-both}" --repeats "${REPEATS:-10}" \
      --out "$bench_out" --tag "$run" ${BENCH_ARGS:-} > "$OUT/bench_$run.log" 2>&1 || rc=1
    f=$(compgen -G "$bench_out/*_$run.json" | head -1)
    echo "== bench $run: $(( $(date +%s) - t0 )) s, $(grep -c ERROR "$OUT/bench_$run.log") errors -> ${f:-no JSON}"
    grep ERROR "$OUT/bench_$run.log" | head -5
    [ -n "$f" ] && files+=("$f")
  done
  if [ ${#files[@]} -eq 3 ]; then
    # before, after, before2 -> compare_results takes BEFORE AFTER [BEFORE2]
    python3 "$repo/benchmarks/compare_results.py" "${files[0]}" "${files[1]}" "${files[2]}" |
      tee "$OUT/compare.txt"
  else
    echo "bench: only ${#files[@]} of 3 result files; see $OUT/bench_*.log"; rc=1
  fi
fi
exit $rc
