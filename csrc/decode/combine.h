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
#include "tile.h"

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

// A block per row: every warp computes the row's lse (the splits spread over
// its lanes), then warp w sums the outputs of splits w, w + kCombineWarps,
// ..., and the warps' sums are added through shared memory. Splits are many
// when rows are few (batch 1: 32 rows and 33 splits on an H100), so the
// loads of one row must be in flight together, not one after another.
constexpr int kCombineWarps = 4;
constexpr int kCombineMaxHeadDim = 256;  // the largest compiled head dim
static_assert(kMaxSplits <= 32 * kCombineWarps, "a lane holds one split's weight");

// Grid: batch * nheads * seqlen_q blocks of 32 * kCombineWarps threads. Row
// index = (b * nheads + h) * seqlen_q + i, lse's layout.
template <typename Element>
__global__ void __launch_bounds__(32 * kCombineWarps) decode_combine_kernel(
    const DecodeParams p) {
  __shared__ float4 warp_sums[kCombineWarps][kCombineMaxHeadDim / 4];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.batch) * p.nheads * p.seqlen_q;
  const int64_t row = blockIdx.x;
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

  // Lane j of warp w holds the weight of split w + kCombineWarps * j, so that
  // the loop below issues its loads without waiting on one another.
  const int split = warp + kCombineWarps * lane;
  const float weight =
      lse != INFINITY && split < p.num_splits ? expf(lse_s[split * rows] - lse) : 0.f;
  const int warp_splits = (p.num_splits - warp + kCombineWarps - 1) / kCombineWarps;
  const int chunks = p.head_dim / 4;  // float4 columns; head_dim is a multiple of 8
  for (int c0 = 0; c0 < chunks; c0 += 32) {  // every lane runs the loop: the shuffles
    const int c = c0 + lane;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int j = 0; j < warp_splits; ++j) {
      const float w = __shfl_sync(0xffffffffu, weight, j);
      // Empty splits (w = 0, often most of them for short sequences in a
      // long cache, and every split of a row without keys) are skipped
      // without reading their rows.
      if (w != 0.f && c < chunks) {
        const int64_t s = warp + kCombineWarps * j;
        const float4 part =
            reinterpret_cast<const float4*>(p.o_accum_ptr + (s * rows + row) * p.head_dim)[c];
        o.x += w * part.x;
        o.y += w * part.y;
        o.z += w * part.z;
        o.w += w * part.w;
      }
    }
    if (c < chunks) warp_sums[warp][c] = o;
  }
  __syncthreads();

  const int i = static_cast<int>(row % p.seqlen_q);
  const int64_t bh = row / p.seqlen_q;
  const int head = static_cast<int>(bh % p.nheads);
  const int64_t b = bh / p.nheads;
  Element* out = static_cast<Element*>(p.o_ptr) + ((b * p.seqlen_q + i) * p.nheads + head) * p.head_dim;
  for (int c = threadIdx.x; c < chunks; c += 32 * kCombineWarps) {
    float4 o = warp_sums[0][c];
#pragma unroll
    for (int w = 1; w < kCombineWarps; ++w) {
      o.x += warp_sums[w][c].x;
      o.y += warp_sums[w][c].y;
      o.z += warp_sums[w][c].z;
      o.w += warp_sums[w][c].w;
    }
    *reinterpret_cast<uint2*>(out + 4 * c) =
        make_uint2(pack2<Element>(o.x, o.y), pack2<Element>(o.z, o.w));
  }
  if (threadIdx.x == 0) p.lse_ptr[row] = lse;
}

}  // namespace jax_flash::decode
