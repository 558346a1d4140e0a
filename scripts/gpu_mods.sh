#!/usr/bin/env bash
# Device run for the score-modifier work: build (all head dims, sm_90), the
# modifier GPU tests, then whatever STEPS names (test: full suite; bench:
# modifier benchmark). Logs and JSON land in $OUT.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export OUT=${OUT:-/tmp/jax_flash_out}
# Reference matmuls of many shapes: autotuning each would dominate the run.
export XLA_FLAGS=${XLA_FLAGS:---xla_gpu_autotune_level=0}
JAX_FLASH_CUDA_ARCHS=${JAX_FLASH_CUDA_ARCHS:-90} "$repo/scripts/gpu_check.sh" build || exit 1
cd /tmp
for step in ${STEPS:-mods}; do
  case $step in
    mods) XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -q -n ${PYTEST_WORKERS:-16} \
            "$repo/tests/test_score_mods_gpu.py" "$repo/tests/test_score_mods.py" \
            "$repo/tests/test_api.py" 2>&1 | tee "$OUT/pytest_mods.log" | tail -30 ;;
    test) PYTEST_WORKERS=${PYTEST_WORKERS:-16} "$repo/scripts/gpu_check.sh" test ;;
    bench) python3 "$repo/benchmarks/bench_modifiers.py" --out "$OUT" ${BENCH_ARGS:-} 2>&1 |
             tee "$OUT/bench_mods.log" | tail -40 ;;
  esac
done
