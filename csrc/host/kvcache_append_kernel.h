// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The append kernel of kvcache_append.h, device code only: included by
// kvcache_append.cu (the launch) and, with host stand-ins for the CUDA
// built-ins, by tests/kvcache_append_emulation.cc, which runs it on the CPU
// against the reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kvcache_append.h"

namespace jax_flash {
namespace append_kernel {

constexpr int kThreads = 128;

// The launch's blocks: one per (new row, K/V head), then one per (q row,
// head) with rotary. A block's loads do not wait on one another, so a short
// append takes a few memory latencies, not a row's worth of them.
inline int64_t num_blocks(const KVCacheAppendParams& a) {
  return int64_t(a.batch) * a.seqlen_new * a.nheads_k +
         (a.rotary_dim > 0 ? int64_t(a.batch) * a.seqlen_q * a.nheads : 0);
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ int clamp(int x, int lo, int hi) { return min(max(x, lo), hi); }

// c_b and lp_b (kvcache_append.h).
__device__ __forceinline__ int2 cache_start(const KVCacheAppendParams& a, int b) {
  const int c = clamp(a.cache_seqlens[b], 0, a.seqlen_cache - a.seqlen_new);
  const int lp = a.cache_leftpad != nullptr ? clamp(a.cache_leftpad[b], 0, c) : 0;
  return make_int2(c, lp);
}

// The row of the flattened cache (batch_cache * rows per entry) that new row
// r = b * seqlen_new + i goes to.
__device__ __forceinline__ int64_t slot_of(const KVCacheAppendParams& a, int r) {
  const int b = r / a.seqlen_new;
  const int pos = cache_start(a, b).x + r % a.seqlen_new;
  if (a.block_table != nullptr) {
    const int page =
        clamp(a.block_table[int64_t(b) * a.max_blocks + pos / a.page_size], 0, a.batch_cache - 1);
    return int64_t(page) * a.page_size + pos % a.page_size;
  }
  const int row = a.cache_batch_idx != nullptr ? clamp(a.cache_batch_idx[b], 0, a.batch_cache - 1)
                                               : b;
  return int64_t(row) * a.seqlen_cache + pos;
}

// Element e of one (nheads_x * head_dim) row, rotated at table row `pos`:
// pairs (2m, 2m + 1) when interleaved (GPT-J), (m, m + rotary_dim / 2)
// otherwise (GPT-NeoX); y1 = x1 c - x2 s, y2 = x1 s + x2 c in float32
// without contraction, as the reference's separate products.
template <typename T>
__device__ __forceinline__ T rotated(const KVCacheAppendParams& a, const T* row, int e, int pos) {
  const int j = e % a.head_dim;
  if (j >= a.rotary_dim) return row[e];
  const int half = a.rotary_dim / 2;
  const bool first = a.interleaved ? (j % 2 == 0) : (j < half);
  const int m = a.interleaved ? j / 2 : (first ? j : j - half);
  const int partner = a.interleaved ? (j ^ 1) : (first ? j + half : j - half);
  const float x1 = to_float(row[first ? e : e - j + partner]);
  const float x2 = to_float(row[first ? e - j + partner : e]);
  const T* cos = static_cast<const T*>(a.rotary_cos);
  const T* sin = static_cast<const T*>(a.rotary_sin);
  const float c = to_float(cos[int64_t(pos) * half + m]);
  const float s = to_float(sin[int64_t(pos) * half + m]);
  const float y = first ? __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s))
                        : __fadd_rn(__fmul_rn(x1, s), __fmul_rn(x2, c));
  return from_float<T>(y);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) kvcache_append_kernel(const KVCacheAppendParams a) {
  const int64_t blocks_new = int64_t(a.batch) * a.seqlen_new * a.nheads_k;
  const int64_t block = blockIdx.x;
  const bool rotary = a.rotary_dim > 0;
  if (block < blocks_new) {
    const int rows_new = a.batch * a.seqlen_new;
    const int r = static_cast<int>(block / a.nheads_k), h = static_cast<int>(block % a.nheads_k);
    const int b = r / a.seqlen_new, i = r % a.seqlen_new;
    const int64_t slot = slot_of(a, r);
    if (a.dedupe) {  // a later row writing the same slot wins
      int later = 0;
      for (int r2 = r + 1 + threadIdx.x; r2 < rows_new && !later; r2 += kThreads) {
        later = slot_of(a, r2) == slot;
      }
      if (__syncthreads_or(later)) return;
    }
    const int2 start = cache_start(a, b);
    const int pos = clamp(start.x - start.y + i, 0, max(a.seqlen_ro - 1, 0));
    const int width = a.nheads_k * a.head_dim;
    const T* k = static_cast<const T*>(a.k) + int64_t(r) * width;
    const T* v = static_cast<const T*>(a.v) + int64_t(r) * width;
    T* k_dst = static_cast<T*>(a.k_cache) + slot * width;
    T* v_dst = static_cast<T*>(a.v_cache) + slot * width;
    for (int e = h * a.head_dim + threadIdx.x; e < (h + 1) * a.head_dim; e += kThreads) {
      k_dst[e] = rotary ? rotated(a, k, e, pos) : k[e];
      v_dst[e] = v[e];
    }
    return;
  }
  // A q row's head (rotary only).
  const int64_t q_block = block - blocks_new;
  const int r = static_cast<int>(q_block / a.nheads), h = static_cast<int>(q_block % a.nheads);
  const int b = r / a.seqlen_q, i = r % a.seqlen_q;
  const int2 start = cache_start(a, b);
  const int pos = clamp(start.x - start.y + (a.q_per_row ? i : 0), 0, a.seqlen_ro - 1);
  const int width = a.nheads * a.head_dim;
  const T* q = static_cast<const T*>(a.q) + int64_t(r) * width;
  T* q_out = static_cast<T*>(a.q_out) + int64_t(r) * width;
  for (int e = h * a.head_dim + threadIdx.x; e < (h + 1) * a.head_dim; e += kThreads) {
    q_out[e] = rotated(a, q, e, pos);
  }
}

}  // namespace append_kernel
}  // namespace jax_flash
