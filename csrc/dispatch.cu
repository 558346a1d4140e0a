// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Runtime (dtype, head dim, kernel variant) -> compiled kernel, for the forward and
// the backward pass. Which head dims exist is decided by the build
// (JAX_FLASH_HEADDIMS defines one JAX_FLASH_HDIM_<d> macro per compiled head
// dim); both passes are compiled for the same set.
#include "bwd/api.h"
#include "fwd/api.h"
#include <type_traits>


namespace jax_flash {
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

// Calls launch.template operator()<kHeadDim>() for the compiled head dim.
template <typename Launch>
cudaError_t with_head_dim(int kernel_dim, Launch&& launch) {
  switch (kernel_dim) {
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

// Causal is a window with right = 0: one kernel serves both.
bool is_local(const AttnParams& p) { return p.window_left >= 0 || p.window_right >= 0; }
// Softcap and ALiBi run in the local kernel with the modifiers on (an
// unbounded window costs it only the seqlen_k edge check); dropout in the one
// with dropout on top.
bool has_mods(const AttnParams& p) {
  return p.softcap_premul != 0.f || p.alibi_slopes_ptr != nullptr;
}
bool has_dropout(const AttnParams& p) { return p.rng_ptr != nullptr; }
bool has_segments(const AttnParams& p) { return p.seg_q != nullptr; }

// Calls launch(kIsLocal, kHasMods, kHasDropout, kHasSegs) as integral
// constants, for the variant compiled for params (csrc/generate_kernels.py).
// Dropout, and segment ids with softcap or ALiBi, run in the kernel that has
// everything switched at run time.
template <typename Launch>
auto with_variant(const AttnParams& p, Launch&& launch) {
  using T = std::true_type;
  using F = std::false_type;
  if (has_dropout(p) || (has_segments(p) && has_mods(p))) return launch(T{}, T{}, T{}, T{});
  if (has_segments(p)) return launch(F{}, F{}, F{}, T{});
  if (has_mods(p)) return launch(T{}, T{}, F{}, F{});
  return is_local(p) ? launch(T{}, F{}, F{}, F{}) : launch(F{}, F{}, F{}, F{});
}

}  // namespace

namespace fwd {

int kernel_head_dim(int head_dim) {
  for (int d : kCompiledHeadDims) {
    if (d >= head_dim) return d;
  }
  return -1;
}

cudaError_t run_fwd(Dtype dtype, const AttnParams& params, cudaStream_t stream) {
  return with_variant(params, [&](auto local, auto mods, auto dropout, auto segs) {
    constexpr bool kIsLocal = decltype(local)::value, kHasMods = decltype(mods)::value,
                   kHasDropout = decltype(dropout)::value, kHasSegs = decltype(segs)::value;
    return with_head_dim(kernel_head_dim(params.head_dim), [&](auto hdim) {
      constexpr int kHeadDim = decltype(hdim)::value;
      return dtype == Dtype::kFloat16
                 ? launch_fwd<cutlass::half_t, kHeadDim, kIsLocal, kHasMods, kHasDropout, kHasSegs>(params, stream)
                 : launch_fwd<cutlass::bfloat16_t, kHeadDim, kIsLocal, kHasMods, kHasDropout, kHasSegs>(params, stream);
    });
  });
}

}  // namespace fwd

namespace bwd {

bool orders_dq(const AttnParams& params) {
  return with_variant(params, [](auto local, auto mods, auto dropout, auto segs) {
    return kOrderable<decltype(local)::value, decltype(mods)::value, decltype(dropout)::value,
                      decltype(segs)::value>;
  });
}

cudaError_t run_bwd(fwd::Dtype dtype, const AttnBwdParams& params, cudaStream_t stream) {
  return with_variant(params, [&](auto local, auto mods, auto dropout, auto segs) {
    constexpr bool kIsLocal = decltype(local)::value, kHasMods = decltype(mods)::value,
                   kHasDropout = decltype(dropout)::value, kHasSegs = decltype(segs)::value;
    return with_head_dim(fwd::kernel_head_dim(params.head_dim), [&](auto hdim) {
      constexpr int kHeadDim = decltype(hdim)::value;
      return dtype == fwd::Dtype::kFloat16
                 ? launch_bwd<cutlass::half_t, kHeadDim, kIsLocal, kHasMods, kHasDropout, kHasSegs>(params, stream)
                 : launch_bwd<cutlass::bfloat16_t, kHeadDim, kIsLocal, kHasMods, kHasDropout, kHasSegs>(params, stream);
    });
  });
}

}  // namespace bwd
}  // namespace jax_flash
