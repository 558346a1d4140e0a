// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The only place that launches the forward kernel: grid, shared memory, stream.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "../params.h"
#include "kernel.h"
#include "kernel_traits.h"

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
  const dim3 grid(num_m_blocks, params.nheads, params.batch);
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = &attn_fwd_kernel<Traits, kIsLocal, kHasMods, kHasDropout, kHasSegs, kFixedOffset>;
  if constexpr (kSmem >= 48 * 1024) {
    // Beyond 48 KB a kernel must opt in to dynamic shared memory, once per
    // device: setting a function attribute on every launch would put a driver
    // call (that can wait for the device) on the hot path.
    constexpr int kMaxDevices = 64;
    static bool opted_in[kMaxDevices] = {};  // racing writers both store true
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    if (device >= kMaxDevices || !opted_in[device]) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
      if (err != cudaSuccess) return err;
      if (device < kMaxDevices) opted_in[device] = true;
    }
  }
  kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(params);
  return cudaGetLastError();
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
