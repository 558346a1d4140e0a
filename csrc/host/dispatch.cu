// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The plan's run-time choices become template arguments here, once for every
// family, pass and dtype.
#include "dispatch.h"

#include <cutlass/numeric_types.h>

#include <type_traits>

#include "../decode/api.h"
#include "../sm80/api.h"

namespace jax_flash {
namespace {

// Calls launch(std::integral_constant<int, d>) for the compiled head dim d.
template <typename Launch>
cudaError_t with_head_dim(int kernel_head_dim, Launch&& launch) {
  switch (kernel_head_dim) {
#ifdef JAX_FLASH_HDIM_32
    case 32: return launch(std::integral_constant<int, 32>{});
#endif
#ifdef JAX_FLASH_HDIM_64
    case 64: return launch(std::integral_constant<int, 64>{});
#endif
#ifdef JAX_FLASH_HDIM_96
    case 96: return launch(std::integral_constant<int, 96>{});
#endif
#ifdef JAX_FLASH_HDIM_128
    case 128: return launch(std::integral_constant<int, 128>{});
#endif
#ifdef JAX_FLASH_HDIM_192
    case 192: return launch(std::integral_constant<int, 192>{});
#endif
#ifdef JAX_FLASH_HDIM_256
    case 256: return launch(std::integral_constant<int, 256>{});
#endif
    default: return cudaErrorInvalidValue;
  }
}

// Calls launch.template operator()<Element, kHeadDim, kIsLocal, kHasMods,
// kHasDropout, kHasSegs>() for the plan's kernel.
template <typename Launch>
cudaError_t with_kernel(const Plan& plan, Dtype dtype, Launch&& launch) {
  return with_variant(
      plan.variant,
      [&](auto local, auto mods, auto dropout, auto segs) {
        return with_head_dim(plan.kernel_head_dim, [&](auto hdim) {
          constexpr int d = decltype(hdim)::value;
          constexpr bool l = decltype(local)::value, m = decltype(mods)::value,
                         r = decltype(dropout)::value, s = decltype(segs)::value;
          return dtype == Dtype::kFloat16
                     ? launch.template operator()<cutlass::half_t, d, l, m, r, s>()
                     : launch.template operator()<cutlass::bfloat16_t, d, l, m, r, s>();
        });
      },
      cudaErrorInvalidValue);
}

struct Sm80Fwd {
  const AttnParams& params;
  cudaStream_t stream;
  template <typename E, int d, bool l, bool m, bool r, bool s>
  cudaError_t operator()() const {
    return fwd::launch_fwd<E, d, l, m, r, s>(params, stream);
  }
};

struct Sm80Bwd {
  const AttnBwdParams& params;
  cudaStream_t stream;
  template <typename E, int d, bool l, bool m, bool r, bool s>
  cudaError_t operator()() const {
    return bwd::launch_bwd<E, d, l, m, r, s>(params, stream);
  }
};

}  // namespace

cudaError_t run_fwd(const Plan& plan, Dtype dtype, const AttnParams& params,
                    cudaStream_t stream) {
  switch (plan.family) {
    case Family::kSm80: return with_kernel(plan, dtype, Sm80Fwd{params, stream});
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_bwd(const Plan& plan, Dtype dtype, const AttnBwdParams& params,
                    cudaStream_t stream) {
  switch (plan.family) {
    case Family::kSm80: return with_kernel(plan, dtype, Sm80Bwd{params, stream});
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_decode(const KVCachePlan& plan, Dtype dtype, const DecodeParams& params,
                       cudaStream_t stream) {
  return with_head_dim(plan.kernel_head_dim, [&](auto hdim) {
    constexpr int d = decltype(hdim)::value;
    return dtype == Dtype::kFloat16 ? decode::launch_decode<__half, d>(params, stream)
                                    : decode::launch_decode<__nv_bfloat16, d>(params, stream);
  });
}

}  // namespace jax_flash
