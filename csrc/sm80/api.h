// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The sm80 kernel family (mma.sync, cp.async, ldmatrix; runs on sm80 and
// later) as the host sees it, without CuTe: the launch templates that the
// generated files in csrc/instantiations/ define, and the tile facts the
// host plan sizes scratch buffers from.
#pragma once

#include <cuda_runtime.h>

#include "../common/params.h"

namespace jax_flash {

namespace fwd {
// Defined for the compiled (dtype, head dim, variant flags) combinations only;
// host/dispatch.cu reaches them through the plan.
template <typename Element, int kHeadDim, bool kIsLocal, bool kHasMods, bool kHasDropout,
          bool kHasSegs>
cudaError_t launch_fwd(const AttnParams& params, cudaStream_t stream);
}  // namespace fwd

namespace bwd {
template <typename Element, int kHeadDim, bool kIsLocal, bool kHasMods, bool kHasDropout,
          bool kHasSegs>
cudaError_t launch_bwd(const AttnBwdParams& params, cudaStream_t stream);

// Query rows per backward tile: the dQ accumulator's rows are a multiple of
// it (bwd_traits.h checks).
constexpr int kBwdBlockM = 64;
// The fewest keys per backward K/V tile of any head dim (bwd_traits.h
// checks): deterministic mode counts K/V tiles with it when it chooses
// between dQ slices and ordered additions.
constexpr int kBwdBlockNMin = 64;
}  // namespace bwd

}  // namespace jax_flash
