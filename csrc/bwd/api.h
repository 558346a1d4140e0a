// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Host-side entry of the backward kernels (CuTe-free, like fwd/api.h).
#pragma once

#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>

#include "../fwd/api.h"
#include "../params.h"

namespace jax_flash::bwd {

template <typename Element, int kHeadDim, bool kIsLocal, bool kHasMods, bool kHasDropout,
          bool kHasSegs>
cudaError_t launch_bwd(const AttnBwdParams& params, cudaStream_t stream);

// Rows of Q per backward tile: the dQ accumulator's rows are seqlen_q
// rounded up to a multiple of it.
constexpr int kBwdBlockM = 64;

// Launches preprocess, main and convert kernels for params.head_dim on the
// compiled head dim fwd::kernel_head_dim() picks.
cudaError_t run_bwd(fwd::Dtype dtype, const AttnBwdParams& params, cudaStream_t stream);

// The kernel variants that can order their dQ additions (deterministic mode
// without slices, bwd/kernel.h): the plain one.
template <bool kIsLocal, bool kHasMods, bool kHasDropout, bool kHasSegs>
constexpr bool kOrderable = !kIsLocal && !kHasMods && !kHasDropout && !kHasSegs;

// Whether the variant run_bwd picks for params is orderable.
bool orders_dq(const AttnParams& params);

}  // namespace jax_flash::bwd
