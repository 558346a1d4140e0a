// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Host-side entry of the forward kernels, independent of CuTe so the FFI
// handler compiles quickly. Definitions live in the generated instantiation
// files (csrc/instantiations/), one per (dtype, head dim, mask kind).
#pragma once

#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>

#include "../params.h"

namespace jax_flash::fwd {

enum class Dtype { kFloat16, kBFloat16 };

// Declared for every combination; only the compiled ones are defined and only
// those are dispatched to (see compiled_head_dims()).
template <typename Element, int kHeadDim, bool kIsLocal, bool kHasMods, bool kHasDropout,
          bool kHasSegs>
cudaError_t launch_fwd(const AttnParams& params, cudaStream_t stream);

// Smallest compiled head dim >= head_dim, or -1.
int kernel_head_dim(int head_dim);

// Launches the kernel for params.head_dim on the compiled head dim returned by
// kernel_head_dim(). Returns cudaErrorInvalidValue if none is compiled.
cudaError_t run_fwd(Dtype dtype, const AttnParams& params, cudaStream_t stream);

}  // namespace jax_flash::fwd
