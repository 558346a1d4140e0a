// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The only place that launches the forward kernel: grid, shared memory, stream.
#pragma once

#include <cuda_runtime.h>

#include "../params.h"
#include "kernel.h"
#include "kernel_traits.h"

namespace jax_flash::fwd {

template <typename Element, int kHeadDim, bool kIsLocal, bool kHasMods, bool kHasDropout,
          bool kHasSegs>
cudaError_t launch_fwd(const AttnParams& params, cudaStream_t stream) {
  using Traits = typename FwdConfig<Element, kHeadDim>::Traits;
  const int num_m_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const dim3 grid(num_m_blocks, params.nheads, params.batch);
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = &attn_fwd_kernel<Traits, kIsLocal, kHasMods, kHasDropout, kHasSegs>;
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

}  // namespace jax_flash::fwd
