// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Runtime (dtype, head dim, mask kind) -> compiled forward kernel. Which head
// dims exist is decided by the build (JAX_FLASH_HEADDIMS defines one
// JAX_FLASH_HDIM_<d> macro per compiled head dim).
#include "../static_switch.h"
#include "api.h"

namespace jax_flash::fwd {
namespace {

constexpr int kCompiledHeadDims[] = {
#ifdef JAX_FLASH_HDIM_32
    32,
#endif
#ifdef JAX_FLASH_HDIM_64
    64,
#endif
#ifdef JAX_FLASH_HDIM_96
    96,
#endif
#ifdef JAX_FLASH_HDIM_128
    128,
#endif
#ifdef JAX_FLASH_HDIM_192
    192,
#endif
#ifdef JAX_FLASH_HDIM_256
    256,
#endif
    -1,  // sentinel: keeps the array non-empty in a build with no kernels
};

template <typename Element, bool kIsLocal>
cudaError_t run_head_dim(int kernel_dim, const AttnParams& params, cudaStream_t stream) {
  switch (kernel_dim) {
#ifdef JAX_FLASH_HDIM_32
    case 32: return launch_fwd<Element, 32, kIsLocal>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_64
    case 64: return launch_fwd<Element, 64, kIsLocal>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_96
    case 96: return launch_fwd<Element, 96, kIsLocal>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_128
    case 128: return launch_fwd<Element, 128, kIsLocal>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_192
    case 192: return launch_fwd<Element, 192, kIsLocal>(params, stream);
#endif
#ifdef JAX_FLASH_HDIM_256
    case 256: return launch_fwd<Element, 256, kIsLocal>(params, stream);
#endif
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int kernel_head_dim(int head_dim) {
  for (int d : kCompiledHeadDims) {
    if (d >= head_dim) return d;
  }
  return -1;
}

cudaError_t run_fwd(Dtype dtype, const AttnParams& params, cudaStream_t stream) {
  const int kernel_dim = kernel_head_dim(params.head_dim);
  // Causal is a window with right = 0: one kernel serves both.
  const bool is_local = params.window_left >= 0 || params.window_right >= 0;
  return BOOL_SWITCH(is_local, kIsLocal, [&] {
    return dtype == Dtype::kFloat16
               ? run_head_dim<cutlass::half_t, kIsLocal>(kernel_dim, params, stream)
               : run_head_dim<cutlass::bfloat16_t, kIsLocal>(kernel_dim, params, stream);
  });
}

}  // namespace jax_flash::fwd
