// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The decode kernels' K/V tiles by sm_90's copy engine: the tensor maps
// (one for K, one for V) the kernel reads boxes through, and their
// encoding on the host. A map sees a cache as a 2-D tensor of
// num_pages * page_size rows of nheads_k * head_dim elements (a
// contiguous cache: batch_cache * seqlen_cache rows), and a box is 64
// columns (128 bytes, stored with the 128-byte swizzle that decode/traits.h
// reads) of box_rows consecutive rows: 64 keys of one head, or a page
// shorter than that. Boxes past the last row are zero-filled; rows past a
// sequence's keys are zeroed in shared memory by the kernel.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "params.h"
#include "tile.h"

namespace jax_flash::decode {

struct DecodeMaps {
  CUtensorMap k;
  CUtensorMap v;
};

// The maps of p's caches, or an error where the driver cannot make them
// (the kernel then is not launched).
template <typename Element>
cudaError_t encode_decode_maps(const DecodeParams& p, DecodeMaps* maps) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  constexpr CUtensorMapDataType kType = std::is_same_v<Element, __half>
                                            ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                            : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const cuuint64_t dims[2] = {cuuint64_t(p.cache_row_stride),
                              cuuint64_t(p.num_pages) * cuuint64_t(p.page_size)};
  const cuuint64_t strides[1] = {cuuint64_t(p.cache_row_stride) * sizeof(Element)};
  const cuuint32_t box[2] = {kBoxColumns, cuuint32_t(p.box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  for (auto [map, ptr] : {std::pair<CUtensorMap*, const void*>{&maps->k, p.k_ptr},
                          {&maps->v, p.v_ptr}}) {
    const CUresult r = encode(map, kType, 2, const_cast<void*>(ptr), dims, strides, box,
                              element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace jax_flash::decode
