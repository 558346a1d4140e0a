// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The only place that launches the decode kernels: the split kernel of the
// plan's tile (narrow or wide; copies by cp.async or the copy engine) with
// its grid and shared memory, then
// (num_splits > 1) the combine kernel, on one stream. On sm_90 and later
// the combine is the split kernel's programmatic dependent (ptx.h): its
// launch and setup overlap the split grid's last blocks instead of
// following the grid's exit.
#pragma once

#include <cuda_runtime.h>

#include "../common/launch.h"
#include "api.h"
#include "combine.h"
#include "kernel.h"
#include "tma.h"
#include "traits.h"

namespace jax_flash::decode {

template <typename Traits>
cudaError_t launch_split_kernel(const DecodeParams& params, const DecodeMaps& maps,
                                cudaStream_t stream) {
  constexpr int kSmem = Traits::kSmemBytes;
  constexpr auto kernel = &decode_kernel<Traits>;
  cudaError_t err = opt_in_shared_memory<kernel>(kSmem);
  if (err != cudaSuccess) return err;
  // Grid x takes at most 2^31 - 1 blocks (reachable only with many explicit
  // splits of ~2^24 query rows per K/V head).
  const int64_t blocks_x = int64_t(params.num_splits) * params.m_blocks;
  if (blocks_x > int64_t{0x7fffffff}) return cudaErrorInvalidConfiguration;
  const unsigned grid_x = static_cast<unsigned>(blocks_x);
  return launch_grids(params, grid_x, params.nheads_k, params.batch,
                      [&](const DecodeParams& part, dim3 grid) {
                        kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(part, maps);
                      });
}

// Whether the device runs the copy engine's kernel from sm_90 code (a build
// for earlier targets only holds its trap). Asked once per kernel.
template <auto kernel>
bool built_for_copy_engine() {
  static const bool built = [] {
    cudaFuncAttributes attributes = {};
    return cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
           attributes.binaryVersion >= 90;
  }();
  return built;
}

// The narrow tile's kernel with the copy engine when the plan asked for it,
// the build holds it and its maps can describe the caches (16-byte aligned,
// rows addressable by int32), else with cp.async.
template <typename Element, int kHeadDim>
cudaError_t launch_narrow(const DecodeParams& params, cudaStream_t stream) {
  DecodeMaps maps = {};
  if constexpr (kHeadDim % kBoxColumns == 0) {
    using Engine = DecodeTraits<Element, kHeadDim, true, true>;
    const int64_t rows = int64_t(params.num_pages) * params.page_size;
    const bool fits = params.copy_engine && built_for_copy_engine<&decode_kernel<Engine>>() &&
                      params.head_dim == kHeadDim && rows > 0 &&
                      rows <= int64_t{0x7fffffff} &&
                      reinterpret_cast<uintptr_t>(params.k_ptr) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(params.v_ptr) % 16 == 0;
    if (fits && encode_decode_maps<Element>(params, &maps) == cudaSuccess) {
      return launch_split_kernel<Engine>(params, maps, stream);
    }
  }
  return launch_split_kernel<DecodeTraits<Element, kHeadDim, true>>(params, maps, stream);
}

template <typename Element, int kHeadDim>
cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream) {
  cudaError_t err =
      params.narrow
          ? launch_narrow<Element, kHeadDim>(params, stream)
          : launch_split_kernel<DecodeTraits<Element, kHeadDim, false>>(params, DecodeMaps{},
                                                                         stream);
  if (err != cudaSuccess || params.num_splits == 1) return err;
  static_assert(kHeadDim <= kCombineMaxHeadDim, "the combine kernel's shared sums");
  const int64_t rows = int64_t(params.batch) * params.nheads * params.seqlen_q;
  if (rows > int64_t{0x7fffffff}) return cudaErrorInvalidConfiguration;  // grid x
  const CombineShape shape = combine_shape(params.num_splits, params.head_dim);
  const int64_t blocks = (rows + shape.rows_per_block - 1) / shape.rows_per_block;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(params.head_dim / 4, shape.groups, shape.rows_per_block);
  config.dynamicSmemBytes = combine_smem_bytes(shape, params.head_dim);
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = params.dependent_combine ? 1 : 0;
  return cudaLaunchKernelEx(&config, decode_combine_kernel<Element>, params);
}

}  // namespace jax_flash::decode
