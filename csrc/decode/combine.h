// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Split-KV combine: merges the splits' normalised partial outputs by their
// LSEs into o (q's dtype) and lse. With L_s the natural-log LSE of split s
// over its keys and O_s its normalised output,
//   lse = log(sum_s exp(L_s)),   o = sum_s exp(L_s - lse) O_s,
// computed against max_s L_s so no exponential overflows. A row no split saw
// a key of (every L_s = -inf) gets o = 0 and lse = +inf.
#pragma once

#include <cmath>

#include "params.h"
#include "ptx.h"

namespace jax_flash::decode {

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, mask));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}

constexpr int kCombineRowsPerBlock = 4;  // a warp per row

// Grid: ceil(batch * nheads * seqlen_q / kCombineRowsPerBlock) blocks of 128
// threads. Row index = (b * nheads + h) * seqlen_q + i, lse's layout.
template <typename Element>
__global__ void __launch_bounds__(32 * kCombineRowsPerBlock) decode_combine_kernel(
    const DecodeParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.batch) * p.nheads * p.seqlen_q;
  const int64_t row = int64_t(blockIdx.x) * kCombineRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;  // warp-uniform
  const float* lse_s = p.lse_accum_ptr + row;  // split s at lse_s[s * rows]

  float max = -INFINITY;
  for (int s = lane; s < p.num_splits; s += 32) max = fmaxf(max, lse_s[s * rows]);
  max = warp_max(max);
  float lse = INFINITY;  // no visible key
  if (max != -INFINITY) {
    float sum = 0.f;
    for (int s = lane; s < p.num_splits; s += 32) sum += expf(lse_s[s * rows] - max);
    lse = max + logf(warp_sum(sum));  // sum >= 1: the max's own term
  }

  const int i = static_cast<int>(row % p.seqlen_q);
  const int64_t bh = row / p.seqlen_q;
  const int head = static_cast<int>(bh % p.nheads);
  const int64_t b = bh / p.nheads;
  Element* out = static_cast<Element*>(p.o_ptr) + ((b * p.seqlen_q + i) * p.nheads + head) * p.head_dim;
  for (int col = lane * 4; col < p.head_dim; col += 128) {
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    if (lse != INFINITY) {
      for (int s = 0; s < p.num_splits; ++s) {
        const float w = expf(lse_s[s * rows] - lse);
        // Empty splits (w = 0, often most of them for short sequences in a
        // long cache) are skipped without reading their rows; w depends on
        // the row and split only, so the branch is warp-uniform.
        if (w == 0.f) continue;
        const float4 part =
            *reinterpret_cast<const float4*>(p.o_accum_ptr + (s * rows + row) * p.head_dim + col);
        o.x += w * part.x;
        o.y += w * part.y;
        o.z += w * part.z;
        o.w += w * part.w;
      }
    }
    *reinterpret_cast<uint2*>(out + col) =
        make_uint2(pack2<Element>(o.x, o.y), pack2<Element>(o.z, o.w));
  }
  if (lane == 0) p.lse_ptr[row] = lse;
}

}  // namespace jax_flash::decode
