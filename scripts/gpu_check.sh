#!/usr/bin/env bash
# Build + GPU tests + benchmark in one go, on a GPU machine with no package
# index (the recipe README.md documents). Run from the repository root:
#
#   scripts/gpu_check.sh [build] [test] [bench] [quick]
#
# Environment: JAX_FLASH_CUDA_ARCHS / JAX_FLASH_HEADDIMS / JAX_FLASH_VARIANTS narrow the build;
# JAX_FLASH_KERNEL_ARCHIVE links kernels compiled before (scripts/build_kernel_archive.sh;
# when it does not match the tree, the kernels are compiled);
# WHEELS (default .whl/) holds the nvidia-cutlass wheel; OUT (default
# /tmp/jax_flash_out) receives logs and benchmark JSON; PYTEST_ARGS and
# BENCH_ARGS pass extra arguments through.
set -uo pipefail
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(build test bench)
repo=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/jax_flash_out}; mkdir -p "$OUT"
WHEELS=${WHEELS:-$repo/.whl}
PY=${PYTHON:-python3}
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
has() { [[ " ${steps[*]} " == *" $1 "* ]]; }
rc=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

# This exact tree may already be built and installed (stamp file): skip it then.
stamp="$(cd "$repo" && find csrc jax_flash CMakeLists.txt pyproject.toml -type f -not -name '*.pyc' | sort | xargs cat | md5sum) ${JAX_FLASH_CUDA_ARCHS:-} ${JAX_FLASH_HEADDIMS:-} ${JAX_FLASH_VARIANTS:-} ${JAX_FLASH_LINEINFO:-} ${JAX_FLASH_KERNEL_ARCHIVE:-}"
if has build && [ -f /tmp/jax_flash_build.stamp ] && [ "$(cat /tmp/jax_flash_build.stamp)" == "$stamp" ] &&
   (cd /tmp && $PY -c "import jax_flash._C") 2>/dev/null; then
  echo "== build: already installed for this tree, skipped"
elif has build; then
  # Offline: build requirements come from the environment plus local wheels.
  $PY -c "import cutlass_library" 2>/dev/null ||
    $PY -m pip install -q --no-index --no-deps "$WHEELS"/nvidia_cutlass-*.whl || exit 1
  echo "== build: archs=${JAX_FLASH_CUDA_ARCHS:-default} headdims=${JAX_FLASH_HEADDIMS:-default} variants=${JAX_FLASH_VARIANTS:-all} kernel archive=${JAX_FLASH_KERNEL_ARCHIVE:-none}"
  start=$(date +%s)
  build_and_install() {
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) $PY -m pip install --no-build-isolation --no-deps -v "$repo" \
      > "$OUT/build.log" 2>&1
  }
  if ! build_and_install; then
    # A kernel archive built from other sources or settings: compile them here.
    if [ -n "${JAX_FLASH_KERNEL_ARCHIVE:-}" ] && grep -qE "JAX_FLASH_KERNEL_ARCHIVE( was built|: expected)" "$OUT/build.log"; then
      grep -A6 "JAX_FLASH_KERNEL_ARCHIVE\( was built\|: expected\)" "$OUT/build.log" | head -12
      echo "== build: the kernel archive does not match this tree; compiling the kernels"
      unset JAX_FLASH_KERNEL_ARCHIVE
      build_and_install || { tail -60 "$OUT/build.log"; exit 1; }
    else
      tail -60 "$OUT/build.log"; exit 1
    fi
  fi
  echo "== build took $(( $(date +%s) - start )) s on $(nproc) cores"
  echo "$stamp" > /tmp/jax_flash_build.stamp
  so=$(cd /tmp && $PY -c "import jax_flash._C as c; print(c.__file__)")
  echo "== extension: $(du -m "$so" | cut -f1) MB, $(grep -o '[0-9]* kernels in [0-9]* files' "$OUT/build.log" | head -1)"
  cuobjdump --dump-resource-usage "$so" 2>/dev/null | grep -E "Function|REG" | paste - - |
    sed -E -e 's/.*attn_(fwd|bwd)_kernel.*TraitsIN7cutlass([0-9a-z_]+)ELi([0-9]+)E.*ELb([01])ELb([01])ELb([01])ELb([01])E.*REG:([0-9]+) STACK:[0-9]+ SHARED:[0-9]+ LOCAL:([0-9]+).*/\1 \2 hdim=\3 local=\4 mods=\5 dropout=\6 segs=\7 REG=\8 LOCAL=\9/' \
      -e 's/.*decode_kernel.*DecodeTraitsI[0-9]+([_a-z0-9]+)Li([0-9]+)ELb([01])ELb([01])E.*REG:([0-9]+) STACK:[0-9]+ SHARED:[0-9]+ LOCAL:([0-9]+).*/decode \1 hdim=\2 narrow=\3 engine=\4 REG=\5 LOCAL=\6/' |
    sort -u | tee "$OUT/resources.txt"
fi

# Tests and benchmark import the installed package, not the source tree.
cd /tmp
if has quick; then
  $PY -m pytest -q -x "$repo/tests" -k "hdim or 128 or vmap or bit or rows or window or grad or compiled" \
    ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -25 || rc=1
fi
if has test; then
  $PY -m pytest -q "$repo/tests" -n ${PYTEST_WORKERS:-12} ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
if has bench; then
  $PY "$repo/benchmarks/bench_attention.py" --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -60
fi
exit $rc
