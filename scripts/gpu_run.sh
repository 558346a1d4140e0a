#!/usr/bin/env bash
# One run: build (sm_90; JAX_FLASH_HEADDIMS narrows it; skipped when this
# machine already holds this tree's build), then the steps STEPS names,
# in order. Logs and JSON land in $OUT.
#   mods       modifier GPU tests + API tests
#   varlen     varlen / segment-id GPU and CPU tests + API tests
#   gpu        every GPU test file (narrowed builds skip the head dims they lack)
#   files      the test files TEST_FILES names (paths from the repository root)
#   test       the full suite (scripts/gpu_check.sh test)
#   bench      bench_attention.py (BENCH_ARGS)
#   benchmods  bench_modifiers.py (BENCH_MODS_ARGS)
#   benchvarlen  bench_varlen.py (BENCH_VARLEN_ARGS)
#   benchdecode  bench_decode.py (BENCH_DECODE_ARGS): kv-cache decode
#   decodegrid   bench_decode.py's three standing tables, 10 repeats: the
#              contiguous grid (d=64, 128; 8k-128k; batch 1-64) against
#              cuDNN, paged caches, Pallas and the append at 32k (batch 8,
#              32), and d=256 (32k, 128k; batch 1, 8, 32); JSON tagged
#              DECODE_TAG (default grid), _paged, _d256
#   decodefold bench_decode.py at d=64 under each JAX_FLASH_KVCACHE_FOLD mode
#              (unset, 0, 1; one process each): contiguous against cuDNN and
#              pages of 16, 64, 256, batch 8 and 32, 32k and 128k keys; JSON
#              tagged DECODE_TAG (default fold) _auto, _never, _always
#   benchtrain bench_train_step.py (BENCH_TRAIN_ARGS): a GPT training step
#              with jax_flash, cuDNN and XLA attention
#   benchvariants  bench_variants.py (BENCH_VARIANTS_ARGS): every call on every
#              kernel variant that covers it (what a smaller build costs)
#   sanitize   compute-sanitizer memcheck (every case, four processes),
#              racecheck and initcheck (--quick), one after another, over
#              scripts/sanitize_kvcache.py (the decode kernels' adversarial
#              cases; SANITIZE_ONLY: its --only filter)
#   breakdown  per-kernel times of a training step under ncu
#              (BREAKDOWN: "batch,seqlen,nheads,head_dim ..." shapes)
#   ncu        ncu sections (throughput, warp stalls, memory) of the forward and
#              backward main kernels of one training step (BREAKDOWN shapes);
#              build with JAX_FLASH_LINEINFO=ON for source-level views
#   ncudecode  ncu sections (throughput, memory), DRAM bytes and the L2 sectors
#              the SMs request (K/V bytes / 32 when each is fetched once) of one
#              decode call, ours and cuDNN's (DECODE_SHAPES: "batch,context ...")
#   keep       copies the built extension to $OUT, to reuse in a later run
#   pack       packs everything in $OUT so far into $OUT/00_all.tgz (one file
#              to fetch from a remote run; name it last in STEPS)
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export OUT=${OUT:-/tmp/jax_flash_out}
mkdir -p "$OUT"
# The tests' XLA settings come from tests/conftest.py; the benchmarks run
# with XLA's defaults (or the caller's XLA_FLAGS).
# Logs written as they come (pytest's progress survives a cut-off run).
export PYTHONUNBUFFERED=1
# Kernels compiled elsewhere (scripts/build_kernel_archive.sh .kernels/sm90) are
# linked when they match the tree; JAX_FLASH_KERNEL_ARCHIVE= (empty) compiles.
archive=$repo/.kernels/sm90/libjax_flash_kernels.a
if [ -z "${JAX_FLASH_KERNEL_ARCHIVE+set}" ] && [ -f "$archive" ]; then
  export JAX_FLASH_KERNEL_ARCHIVE=$archive
fi
JAX_FLASH_CUDA_ARCHS=${JAX_FLASH_CUDA_ARCHS:-90} "$repo/scripts/gpu_check.sh" build || exit 1
cd /tmp
rc=0
# A profiler or sanitizer on PATH, else the newest install under $2's glob.
find_tool() { command -v "$1" || ls $2 2>/dev/null | sort -V | tail -1; }
# PYTEST_TIMEOUT (seconds): interrupt the run then, so that pytest still
# prints its counts of the tests that finished.
pytest_files() {
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -s INT -k 30 ${PYTEST_TIMEOUT:-0} \
    python3 -m pytest -q -n ${PYTEST_WORKERS:-16} "$@" \
    ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_$step.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
}
# One bench_decode.py table (its arguments), logged, its GB/s table shown.
decode_table() {
  python3 "$repo/benchmarks/bench_decode.py" --out "$OUT" --repeats 10 "$@" 2>&1 |
    tee -a "$OUT/bench_decode.log" | grep -A40 "^GB/s"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
}
for step in ${STEPS:-}; do
  echo "== $step"
  case $step in
    mods) pytest_files "$repo/tests/test_score_mods_gpu.py" "$repo/tests/test_score_mods.py" \
            "$repo/tests/test_api.py" ;;
    varlen) pytest_files "$repo/tests/test_varlen_gpu.py" "$repo/tests/test_varlen.py" \
              "$repo/tests/test_api.py" ;;
    gpu) pytest_files "$repo"/tests/test_*_gpu.py ;;
    files)
      read -ra names <<< "${TEST_FILES:-}"
      if [ ${#names[@]} -eq 0 ]; then echo "files: TEST_FILES is empty"; rc=1; continue; fi
      pytest_files "${names[@]/#/$repo/}" ;;
    test) PYTEST_WORKERS=${PYTEST_WORKERS:-16} "$repo/scripts/gpu_check.sh" test || rc=1 ;;
    bench) python3 "$repo/benchmarks/bench_attention.py" --out "$OUT" ${BENCH_ARGS:-} 2>&1 |
             tee "$OUT/bench.log" | tail -60
           [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    benchmods) python3 "$repo/benchmarks/bench_modifiers.py" --out "$OUT" ${BENCH_MODS_ARGS:-} 2>&1 |
                 tee "$OUT/bench_mods.log" | tail -40
               [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    benchvarlen) python3 "$repo/benchmarks/bench_varlen.py" --out "$OUT" ${BENCH_VARLEN_ARGS:-} 2>&1 |
                   tee "$OUT/bench_varlen.log" | tail -20
                 [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    benchdecode) python3 "$repo/benchmarks/bench_decode.py" --out "$OUT" ${BENCH_DECODE_ARGS:-} 2>&1 |
                   tee "$OUT/bench_decode.log" | tail -60
                 [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    decodegrid)
      tag=${DECODE_TAG:-grid}
      for table in "--kinds decode --impls jax_flash,cudnn --headdims 64,128 --tag $tag" \
          "--kinds decode,paged,append --impls jax_flash,pallas_paged --headdims 64,128 --contexts 32768 --batches 8,32 --tag ${tag}_paged" \
          "--kinds decode --impls jax_flash,cudnn --headdims 256 --contexts 32768,131072 --batches 1,8,32 --tag ${tag}_d256"; do
        decode_table $table
      done ;;
    decodefold)
      for mode in auto:"" never:0 always:1; do
        JAX_FLASH_KVCACHE_FOLD=${mode#*:} decode_table --kinds decode,paged --impls jax_flash,cudnn \
          --headdims 64 --contexts 32768,131072 --batches 8,32 --tag "${DECODE_TAG:-fold}_${mode%%:*}"
      done ;;
    benchtrain) python3 "$repo/benchmarks/bench_train_step.py" --out "$OUT" ${BENCH_TRAIN_ARGS:-} 2>&1 |
                  tee "$OUT/bench_train.log" | tail -20
                [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    benchvariants) python3 "$repo/benchmarks/bench_variants.py" --out "$OUT" ${BENCH_VARIANTS_ARGS:-} 2>&1 |
                     tee "$OUT/bench_variants.log" | tail -40
                   [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    sanitize)
      cs=$(find_tool compute-sanitizer "/usr/local/cuda*/bin/compute-sanitizer")
      if [ ! -x "$cs" ]; then echo "sanitize: compute-sanitizer not found"; rc=1; continue; fi
      for tool in memcheck racecheck initcheck; do
        # racecheck only on our decode kernels (slow, and XLA's kernels are
        # not ours to check). initcheck must see every kernel: memory that
        # an unchecked kernel writes (XLA's rotary q) stays "uninitialized"
        # to it; XLA's own copies are left out instead.
        case $tool in
          memcheck) opts="" ;;
          racecheck) opts="--kernel-name kns=decode_" ;;
          initcheck) opts="--check-api-memory-access no" ;;
        esac
        # memcheck runs every case, in four processes (one process over
        # all of them can crash in XLA's compile); the others --quick.
        parts=1/1; quick=--quick
        [ "$tool" = memcheck ] && parts="1/4 2/4 3/4 4/4" && quick=""
        for part in $parts; do
          log="$OUT/sanitize_${tool}_${part%/*}.log"
          "$cs" --tool "$tool" $opts --error-exitcode 3 python3 "$repo/scripts/sanitize_kvcache.py" \
            $quick --part "$part" ${SANITIZE_ONLY:+--only "$SANITIZE_ONLY"} > "$log" 2>&1 || rc=1
          echo "-- $tool $part: $(grep "cases ok" "$log" | tail -1); $(grep "ERROR SUMMARY\|RACECHECK SUMMARY" "$log" | tail -1)"
        done
      done ;;
    breakdown)
      ncu=$(find_tool ncu "/opt/nvidia/nsight-compute/*/ncu")
      if [ ! -x "$ncu" ]; then echo "breakdown: ncu not found"; rc=1; continue; fi
      for shape in ${BREAKDOWN:-8,2048,16,128 1,16384,16,128}; do
        log="$OUT/breakdown_${shape//,/_}.csv"
        "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
          python3 "$repo/scripts/kernel_breakdown.py" run ${shape//,/ } > "$log" 2>&1 || rc=1
        echo "-- batch,seqlen,nheads,head_dim = $shape"
        python3 "$repo/scripts/kernel_breakdown.py" table "$log" || { tail -5 "$log"; rc=1; }
      done ;;
    ncu)
      ncu=$(find_tool ncu "/opt/nvidia/nsight-compute/*/ncu")
      if [ ! -x "$ncu" ]; then echo "ncu: ncu not found"; rc=1; continue; fi
      for shape in ${BREAKDOWN:-8,2048,16,128}; do
        log="$OUT/ncu_${shape//,/_}.txt"
        # Skip the compile run's launches; then one forward and one backward.
        "$ncu" --clock-control none -k "regex:attn_(fwd|bwd)_kernel" --launch-skip 2 --launch-count 2 \
          --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
          --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
          python3 "$repo/scripts/kernel_breakdown.py" run ${shape//,/ } > "$log" 2>&1 || rc=1
        echo "-- ncu $shape -> $log"
      done ;;
    ncudecode)
      ncu=$(find_tool ncu "/opt/nvidia/nsight-compute/*/ncu")
      if [ ! -x "$ncu" ]; then echo "ncudecode: ncu not found"; rc=1; continue; fi
      for shape in ${DECODE_SHAPES:-32,32768 8,32768 1,131072}; do
        for impl in jax_flash cudnn; do
          log="$OUT/ncu_decode_${impl}_${shape//,/_}.txt"
          "$ncu" --profile-from-start off --clock-control none --section SpeedOfLight \
            --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
            --metrics dram__bytes_read.sum,lts__t_sector_hit_rate.pct,lts__t_sectors_srcunit_tex_op_read.sum \
            python3 "$repo/scripts/decode_profile.py" --impl $impl --batch ${shape%,*} \
            --context ${shape#*,} > "$log" 2>&1 || rc=1
          echo "-- $impl $shape: $(grep -o 'kv_bytes=[0-9]*' "$log")"
          grep -E "^  [a-z_]+.*\(|dram__bytes_read.sum|Duration|DRAM Throughput|lts__t_sector" "$log" | head -14
        done
      done ;;
    keep) cp "$(python3 -c 'import jax_flash._C as c; print(c.__file__)')" "$OUT/" ;;
    pack) tar -czf /tmp/jax_flash_out.tgz -C "$OUT" . && mv /tmp/jax_flash_out.tgz "$OUT/00_all.tgz" ;;
  esac
done
exit $rc
