#!/usr/bin/env bash
# Compiles the kernels once into a static library that later builds link
# instead of compiling them again (JAX_FLASH_KERNEL_ARCHIVE): wheels for
# several Python versions, or a build on a machine with fewer cores.
#
#   scripts/build_kernel_archive.sh OUTDIR
#
# Reads JAX_FLASH_CUDA_ARCHS (default 90), JAX_FLASH_HEADDIMS,
# JAX_FLASH_VARIANTS, JAX_FLASH_LINEINFO and JAX_FLASH_CUTLASS_DIR like pip
# install does; the build that links the archive must use the same values,
# sources and CUTLASS (its configure step compares them with
# OUTDIR/libjax_flash_kernels.a.inputs.txt). Configure runs in full, so
# PYTHON (default python3) needs the build requirements: jax, nanobind,
# nvidia-cutlass (unless JAX_FLASH_CUTLASS_DIR) and the Python headers.
# OUTDIR/compile_seconds.txt lists each kernel file's compile time;
# KERNEL_BUILD_DIR (default build/kernel_archive) holds the objects.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"; out=$(cd "$1" && pwd)
build=${KERNEL_BUILD_DIR:-$repo/build/kernel_archive}  # reused: only changed files recompile
py=${PYTHON:-python3}
: > "$out/compile_seconds.txt"
cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$py")" \
  -DJAX_FLASH_BUILD_CUDA=ON -DJAX_FLASH_CUDA_ARCHS="${JAX_FLASH_CUDA_ARCHS:-90}" \
  -DJAX_FLASH_HEADDIMS="${JAX_FLASH_HEADDIMS:-32;64;96;128;192;256}" \
  -DJAX_FLASH_VARIANTS="${JAX_FLASH_VARIANTS:-all}" -DJAX_FLASH_LINEINFO="${JAX_FLASH_LINEINFO:-OFF}" \
  -DJAX_FLASH_CUTLASS_DIR="${JAX_FLASH_CUTLASS_DIR:-}" \
  -DCMAKE_CUDA_COMPILER_LAUNCHER="$repo/scripts/timed.sh;$out/compile_seconds.txt" > "$out/configure.log"
grep "kernels in" "$out/configure.log"
start=$(date +%s)
cmake --build "$build" --target jax_flash_kernel_objects -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
echo "kernels compiled in $(( $(date +%s) - start )) s on $(nproc) cores"
cp "$build/libjax_flash_kernel_objects.a" "$out/libjax_flash_kernels.a"
cp "$build/kernel_inputs.txt" "$out/libjax_flash_kernels.a.inputs.txt"
echo "JAX_FLASH_KERNEL_ARCHIVE=$out/libjax_flash_kernels.a ($(du -m "$out/libjax_flash_kernels.a" | cut -f1) MB)"
