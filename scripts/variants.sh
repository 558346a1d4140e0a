#!/usr/bin/env bash
# Kernel experiments: build each source tree under .exp/<name> into its own
# target dir and time its jax_flash forward on the same shapes, one process
# per variant. Usage: scripts/variants.sh name... (BENCH_ARGS adds options).
# .exp/<name>.env, if present, holds VAR=value lines for that build (e.g.
# JAX_FLASH_VARIANTS="local;mods;dropout" to time a smaller variant set on
# the same tree).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/jax_flash_out}; mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
python3 -c "import cutlass_library" 2>/dev/null ||
  python3 -m pip install -q --no-index --no-deps "$repo"/.whl/nvidia_cutlass-*.whl
for v in "$@"; do
  ( if [ -f "$repo/.exp/$v.env" ]; then set -a; . "$repo/.exp/$v.env"; set +a; fi
    JAX_FLASH_HEADDIMS="${JAX_FLASH_HEADDIMS:-64;128}" JAX_FLASH_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/exp_$v "$repo/.exp/$v" \
    > "$OUT/build_$v.log" 2>&1 && echo "built $v" ) || { echo "build $v failed"; tail -20 "$OUT/build_$v.log"; }
done
cd /tmp
for v in "$@"; do
  PYTHONPATH=/tmp/exp_$v python3 "$repo/benchmarks/bench_attention.py" --impls jax_flash --out "$OUT" --tag "$v" \
    ${BENCH_ARGS:-} 2>&1 | grep -E "^fwd" | sed "s/^/[$v] /"
done
