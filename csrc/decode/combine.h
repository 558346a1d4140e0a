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

// A block per row. Lane j of every warp loads the LSEs of splits
// kCombineWarps * j ... kCombineWarps * j + kCombineWarps - 1 once, into
// registers, so the row's max, sum and each split's weight come from one
// round of loads. Warp w then sums the outputs of splits w, w + kCombineWarps,
// ... (lane j holds split w + kCombineWarps * j's weight: the register of
// index w), and the warps' sums are added through shared memory. Splits are
// many when rows are few (batch 1: 32 rows and 33 splits on an H100), so the
// loads of one row must be in flight together, not one after another: two
// rounds of loads per row (the LSEs, then the partial outputs).
constexpr int kCombineWarps = 8;
constexpr int kCombineMaxHeadDim = 256;  // the largest compiled head dim
constexpr int kSplitsPerWarp = kMaxSplits / kCombineWarps;
static_assert(kMaxSplits % kCombineWarps == 0 && kSplitsPerWarp <= 32,
              "lane j of warp w holds split w + kCombineWarps * j's LSE and weight");

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

  float split_lse[kCombineWarps];
  float max = -INFINITY;
#pragma unroll
  for (int k = 0; k < kCombineWarps; ++k) {
    const int s = kCombineWarps * lane + k;
    split_lse[k] = s < p.num_splits ? lse_s[s * rows] : -INFINITY;
    max = fmaxf(max, split_lse[k]);
  }
  max = warp_max(max);
  float lse = INFINITY;  // no visible key
  float mine = -INFINITY;  // this lane's split of this warp: kCombineWarps * lane + warp
  if (max != -INFINITY) {
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kCombineWarps; ++k) {
      sum += expf(split_lse[k] - max);  // exp(-inf) = 0 for splits past the last
      if (k == warp) mine = split_lse[k];
    }
    lse = max + logf(warp_sum(sum));  // sum >= 1: the max's own term
  }
  const float weight = expf(mine - lse);  // 0 when mine = -inf; lse = inf only with mine = -inf

  const int chunks = p.head_dim / 4;  // float4 columns; head_dim is a multiple of 8
  for (int c0 = 0; c0 < chunks; c0 += 32) {  // every lane runs the loop: the shuffles
    const int c = c0 + lane;
    // All of this warp's loads are issued before the first is used: a fixed
    // count, predicated, rather than a loop over the row's splits.
    float4 part[kSplitsPerWarp];
    float w[kSplitsPerWarp];
#pragma unroll
    for (int j = 0; j < kSplitsPerWarp; ++j) {
      w[j] = __shfl_sync(0xffffffffu, weight, j);
      // Empty splits (w = 0: splits past the last, often most of them for
      // short sequences in a long cache, and every split of a row without
      // keys) are skipped without reading their rows.
      const int64_t s = warp + kCombineWarps * j;
      part[j] = w[j] != 0.f && c < chunks
                    ? reinterpret_cast<const float4*>(p.o_accum_ptr + (s * rows + row) * p.head_dim)[c]
                    : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int j = 0; j < kSplitsPerWarp; ++j) {
      o.x += w[j] * part[j].x;
      o.y += w[j] * part[j].y;
      o.z += w[j] * part[j].z;
      o.w += w[j] * part[j].w;
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
