// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Split-KV combine: merges the splits' normalised partial outputs by their
// LSEs into o (q's dtype) and lse. With L_s the natural-log LSE of split s
// over its keys and O_s its normalised output,
//   lse = log(sum_s exp(L_s)),   o = sum_s exp(L_s - lse) O_s,
// computed against max_s L_s so no exponential overflows. A row no split saw
// a key of (every L_s = -inf) gets o = 0 and lse = +inf.
#pragma once

#include <algorithm>
#include <cmath>

#include "params.h"
#include "ptx.h"
#include "tile.h"

namespace jax_flash::decode {

// One round of loads per row. Thread (quad, g, r) of a block takes float4
// column `quad` of row blockIdx.x * rows_per_block + r over the splits
// g, g + G, g + 2G, ... (G = blockDim.y): it loads their LSEs and partial
// rows together, kCombineBatch splits at a time (one batch when there are at
// most kCombineBatch * G splits, the usual case), and keeps its own max,
// sum and weighted sum, as the online softmax does. With G > 1 the groups
// of a column then merge through shared memory. Only the splits that exist
// are read, so a few splits cost a few loads and instructions per thread.
//
// Every split block writes its rows (an empty split: O = 0, L = -inf), so
// every partial row read here was written.
constexpr int kCombineBatch = 4;
constexpr int kCombineMaxHeadDim = 256;  // the largest compiled head dim
constexpr int kCombineMaxThreads = 512;  // per row: (head_dim / 4) x G
constexpr int kCombineBlockThreads = 128;  // rows per block: as many as fill this

struct CombineShape {
  int groups;          // G: threads per column of a row
  int rows_per_block;  // R
};

// G: one batch of splits per thread where the row's threads allow it.
inline CombineShape combine_shape(int num_splits, int head_dim) {
  const int quads = head_dim / 4;
  const int groups = std::clamp((num_splits + kCombineBatch - 1) / kCombineBatch, 1,
                                std::max(kCombineMaxThreads / quads, 1));
  return CombineShape{groups, std::max(kCombineBlockThreads / (quads * groups), 1)};
}

// Shared memory of one block: per (row, group) its max and sum, and per
// (row, group, column) its weighted sum.
inline int combine_smem_bytes(const CombineShape& shape, int head_dim) {
  if (shape.groups == 1) return 0;
  return shape.rows_per_block * shape.groups * (head_dim / 4 * 16 + 2 * 4);
}

__device__ __forceinline__ float4 fma4(float w, const float4& a, const float4& acc) {
  return make_float4(fmaf(w, a.x, acc.x), fmaf(w, a.y, acc.y), fmaf(w, a.z, acc.z),
                     fmaf(w, a.w, acc.w));
}

__device__ __forceinline__ float4 scale4(float w, const float4& a) {
  return make_float4(w * a.x, w * a.y, w * a.z, w * a.w);
}

// exp(x - max) with the -inf max of a group that has seen nothing (every x
// -inf too) giving 0, not NaN.
__device__ __forceinline__ float weight_of(float x, float max) {
  return max == -INFINITY ? 0.f : expf(x - max);
}

// Grid: ceil(rows / R) blocks of (head_dim / 4, G, R) threads, shared memory
// combine_smem_bytes. Row index = (b * nheads + h) * seqlen_q + i, lse's
// layout.
template <typename Element>
__global__ void __launch_bounds__(kCombineMaxThreads) decode_combine_kernel(
    const DecodeParams p) {
  extern __shared__ __align__(16) char combine_smem[];
  const int quad = threadIdx.x, g = threadIdx.y, r = threadIdx.z;
  const int quads = blockDim.x, groups = blockDim.y;
  const int64_t rows = int64_t(p.batch) * p.nheads * p.seqlen_q;
  const int64_t row = int64_t(blockIdx.x) * blockDim.z + r;
  // The last block's rows past the end load nothing and write nothing, but
  // stay for the barrier.
  const bool live = row < rows;
  const int64_t safe_row = live ? row : 0;
  const float* lse_s = p.lse_accum_ptr + safe_row;  // split s at lse_s[s * rows]
  const float4* o_s =
      reinterpret_cast<const float4*>(p.o_accum_ptr + safe_row * p.head_dim) + quad;
  const int64_t o_split_stride = rows * (p.head_dim / 4);  // in float4

  // Launched as the split kernel's dependent: its partial rows are written
  // once this returns.
  wait_prerequisites();

  // ---- This thread's splits, kCombineBatch loads of each kind in flight ----
  float max = -INFINITY, sum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  const int num_splits = live ? p.num_splits : 0;
  for (int s0 = g; s0 < num_splits; s0 += kCombineBatch * groups) {
    float lse[kCombineBatch];
    float4 part[kCombineBatch];
#pragma unroll
    for (int j = 0; j < kCombineBatch; ++j) {
      const int s = s0 + j * groups;
      const bool valid = s < num_splits;
      lse[j] = valid ? lse_s[int64_t(s) * rows] : -INFINITY;
      part[j] = valid ? o_s[s * o_split_stride] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float batch_max = max;
#pragma unroll
    for (int j = 0; j < kCombineBatch; ++j) batch_max = fmaxf(batch_max, lse[j]);
    const float rescale = weight_of(max, batch_max);
    sum *= rescale;
    acc = scale4(rescale, acc);
#pragma unroll
    for (int j = 0; j < kCombineBatch; ++j) {
      const float w = weight_of(lse[j], batch_max);
      sum += w;
      // A split of weight 0 (empty, or far below the max) adds nothing,
      // not 0 * inf.
      if (w != 0.f) acc = fma4(w, part[j], acc);
    }
    max = batch_max;
  }

  // ---- The column's groups, merged through shared memory ----
  if (groups > 1) {
    float4* s_acc = reinterpret_cast<float4*>(combine_smem);  // (R, G, quads)
    float* s_max = reinterpret_cast<float*>(s_acc + blockDim.z * groups * quads);  // (R, G)
    float* s_sum = s_max + blockDim.z * groups;
    const int group_row = r * groups + g;
    s_acc[group_row * quads + quad] = acc;
    if (quad == 0) {
      s_max[group_row] = max;
      s_sum[group_row] = sum;
    }
    __syncthreads();
    if (g != 0 || !live) return;
    max = -INFINITY;
    for (int k = 0; k < groups; ++k) max = fmaxf(max, s_max[r * groups + k]);
    sum = 0.f;
    acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k = 0; k < groups; ++k) {
      const float w = weight_of(s_max[r * groups + k], max);
      sum += w * s_sum[r * groups + k];
      if (w != 0.f) acc = fma4(w, s_acc[(r * groups + k) * quads + quad], acc);
    }
  }

  if (!live) return;
  // ---- o = sum_s exp(L_s - lse) O_s, lse = max + log(sum) ----
  // sum >= 1 when max is finite: the max's own term. No visible key in any
  // split: o = 0 and lse = +inf.
  const bool empty = max == -INFINITY;
  const float inv = empty ? 0.f : 1.f / sum;
  const int i = static_cast<int>(row % p.seqlen_q);
  const int64_t bh = row / p.seqlen_q;
  const int head = static_cast<int>(bh % p.nheads);
  const int64_t b = bh / p.nheads;
  Element* out = static_cast<Element*>(p.o_ptr) +
                 ((b * p.seqlen_q + i) * p.nheads + head) * p.head_dim + 4 * quad;
  *reinterpret_cast<uint2*>(out) = make_uint2(pack2<Element>(acc.x * inv, acc.y * inv),
                                              pack2<Element>(acc.z * inv, acc.w * inv));
  if (quad == 0) p.lse_ptr[row] = empty ? INFINITY : max + logf(sum);
}

}  // namespace jax_flash::decode
