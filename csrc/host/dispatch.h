// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Runs a plan: (family, variant, compiled head dim, dtype) -> the compiled
// kernel's launch. CuTe-free, so the FFI layer compiles quickly.
#pragma once

#include <cuda_runtime.h>

#include "../common/params.h"
#include "../decode/params.h"
#include "plan.h"

namespace jax_flash {

// Forward: out and lse. cudaErrorInvalidValue if the plan names a kernel this
// build lacks.
cudaError_t run_fwd(const Plan& plan, Dtype dtype, const AttnParams& params,
                    cudaStream_t stream);

// Backward: preprocess, main and convert kernels (dq, dk, dv).
cudaError_t run_bwd(const Plan& plan, Dtype dtype, const AttnBwdParams& params,
                    cudaStream_t stream);

// kv-cache decode: the split kernel (and the combine when params.num_splits
// > 1) of the plan's compiled head dim.
cudaError_t run_decode(const KVCachePlan& plan, Dtype dtype, const DecodeParams& params,
                       cudaStream_t stream);

}  // namespace jax_flash
