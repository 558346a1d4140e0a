// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The only place that launches the forward kernel: grid, shared memory, stream.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "../common/launch.h"
#include "../common/params.h"
#include "api.h"
#include "fwd_kernel.h"
#include "fwd_traits.h"

namespace jax_flash::fwd {

// Largest softcap for the fixed-offset softmax (softmax.h): its terms span
// exp(-2 * softcap) .. exp(2 * softcap), for 30 about 1e-26 .. 1e26, normal
// floats with a factor of 1e12 to spare for the row sums and P V.
constexpr float kMaxFixedOffsetSoftcap = 30.f;

// Softcap with nothing that could lift a score above 1 (ALiBi). The caller
// adds: bf16 (fp16 P would flush exp(-2 * softcap)), and neither dropout nor
// segment ids (their kernel keeps the running max).
inline bool fixed_offset_softmax(const AttnParams& p) {
  return p.softcap_premul != 0.f && p.alibi_slopes_ptr == nullptr &&
         p.softmax_lse_scale <= kMaxFixedOffsetSoftcap;
}

template <typename Traits, bool kIsLocal, bool kHasMods, bool kHasDropout, bool kHasSegs,
          bool kFixedOffset>
cudaError_t launch_fwd_kernel(const AttnParams& params, cudaStream_t stream) {
  const int num_m_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  constexpr int kSmem = Traits::kSmemBytes;
  constexpr auto kernel =
      &attn_fwd_kernel<Traits, kIsLocal, kHasMods, kHasDropout, kHasSegs, kFixedOffset>;
  const cudaError_t err = opt_in_shared_memory<kernel>(kSmem);
  if (err != cudaSuccess) return err;
  return launch_grids(params, num_m_blocks, params.nheads, params.batch,
                      [&](const AttnParams& part, dim3 grid) {
                        kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(part);
                      });
}

template <typename Element, int kHeadDim, bool kIsLocal, bool kHasMods, bool kHasDropout,
          bool kHasSegs>
cudaError_t launch_fwd(const AttnParams& params, cudaStream_t stream) {
  using Traits = typename FwdConfig<Element, kHeadDim>::Traits;
  if constexpr (kHasMods && !kHasDropout && !kHasSegs &&
                std::is_same_v<Element, cutlass::bfloat16_t>) {
    if (fixed_offset_softmax(params)) {
      return launch_fwd_kernel<Traits, kIsLocal, kHasMods, kHasDropout, kHasSegs, true>(params, stream);
    }
  }
  return launch_fwd_kernel<Traits, kIsLocal, kHasMods, kHasDropout, kHasSegs, false>(params, stream);
}

}  // namespace jax_flash::fwd
