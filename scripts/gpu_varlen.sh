#!/usr/bin/env bash
# Device run for varlen + segment ids: build (all head dims, sm_90; a build
# cut off by the call's time limit resumes on the next call of a warm
# machine), then whatever STEPS names:
#   varlen  the varlen / segment-id GPU and CPU tests and the API tests
#   test    the full suite
#   bench   the packed-documents benchmark (bench_varlen.py)
#   mods    the modifier benchmark (bench_modifiers.py, BENCH_MODS_ARGS)
# Logs and JSON land in $OUT.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export OUT=${OUT:-/tmp/jax_flash_out}
mkdir -p "$OUT"
# Reference matmuls of many shapes: autotuning each would dominate the run.
export XLA_FLAGS=${XLA_FLAGS:---xla_gpu_autotune_level=0}
JAX_FLASH_CUDA_ARCHS=${JAX_FLASH_CUDA_ARCHS:-90} "$repo/scripts/gpu_check.sh" build || exit 1
cd /tmp
rc=0
for step in ${STEPS:-}; do
  case $step in
    varlen) XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -q -n ${PYTEST_WORKERS:-16} \
              "$repo/tests/test_varlen_gpu.py" "$repo/tests/test_varlen.py" \
              "$repo/tests/test_api.py" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_varlen.log" | tail -40
            [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    test) PYTEST_WORKERS=${PYTEST_WORKERS:-16} "$repo/scripts/gpu_check.sh" test || rc=1 ;;
    bench) python3 "$repo/benchmarks/bench_varlen.py" --out "$OUT" ${BENCH_ARGS:-} 2>&1 |
             tee "$OUT/bench_varlen.log" | tail -20 ;;
    mods) python3 "$repo/benchmarks/bench_modifiers.py" --out "$OUT" ${BENCH_MODS_ARGS:-} 2>&1 |
            tee "$OUT/bench_mods.log" | tail -40 ;;
  esac
done
exit $rc
