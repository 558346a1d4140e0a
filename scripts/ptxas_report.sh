#!/usr/bin/env bash
# Registers / spills of generated kernels, no GPU needed:
#   scripts/ptxas_report.sh csrc/instantiations/fwd_hdim128_bf16_full.cu [...]
set -euo pipefail
cutlass=$(python3 -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")
for f in "$@"; do
  echo "== $f"
  nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 --expt-relaxed-constexpr --use_fast_math \
    -I"$cutlass" -Xptxas -v -c "$f" -o /dev/null 2>&1 | grep -E "registers|spill" | sed 's/ptxas info *: //'
done
