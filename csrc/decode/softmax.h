// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Scores and the online softmax of one warp's 16-row slab in the decode
// kernel. A thread holds two rows (g and g + 8 of the slab, g = lane / 4)
// and, per 16-key step, four scores of each: the S accumulators of two n8
// MMA tiles, keys 2t, 2t + 1 and 8 + 2t, 9 + 2t (t = lane % 4). Scores are
// kept in log2 units, x = score * log2(e), so every exponential is one exp2.
#pragma once

#include <cmath>

#include "params.h"
#include "ptx.h"
#include "sequence.h"

namespace jax_flash::decode {

// q.k -> x, FlashAttention's order: scale, softcap, ALiBi, then the mask.
struct ScoreMods {
  float scale_log2;      // softmax_scale * log2(e), or softcap * log2(e)
  float softcap_premul;  // softmax_scale / softcap; 0: off
  bool alibi;

  __device__ __forceinline__ explicit ScoreMods(const DecodeParams& p)
      : scale_log2(p.scale_log2),
        softcap_premul(p.softcap_premul),
        alibi(p.alibi_slopes != nullptr) {}

  // The score of key position `key` for a row, -inf when the row may not see it.
  __device__ __forceinline__ float operator()(float s, int key, const RowBounds& row) const {
    float x = softcap_premul != 0.f ? tanh_approx(s * softcap_premul) : s;
    x *= scale_log2;
    // -slope * |key - pos|: the reference's distance, in float32 like it.
    if (alibi) x -= row.slope_log2 * fabsf(float(key - row.pos));
    return key >= row.lo && key < row.hi ? x : -INFINITY;
  }
};

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Running max (log2 units, the quad's) and this thread's partial sum of
// exp2(x - max) for the thread's two rows.
struct OnlineSoftmax {
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  // A row that has seen only masked scores has max -inf. Using 0 as its
  // offset keeps exp2(-inf - offset) = 0 instead of exp2(-inf + inf) = NaN.
  __device__ __forceinline__ static float offset(float max) {
    return max == -INFINITY ? 0.f : max;
  }

  // s: this step's scores, s[n][2r + c] of row r, key 8n + 2t + c. On return
  // s holds the unnormalised probabilities exp2(x - max) and the O
  // accumulator (acc_o[d][2r + c], row r) is rescaled to the new max.
  template <int kDTiles>
  __device__ __forceinline__ void update(float (&s)[2][4], float (&acc_o)[kDTiles][4]) {
    float new_max[2];
    bool grew = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
      new_max[r] = quad_max(fmaxf(m, row_max[r]));
      grew |= new_max[r] != row_max[r];
    }
    // An unchanged max means a factor of exactly 1: a warp whose rows all
    // kept their max skips the rescale (one multiply per accumulator, as
    // many as the P V product's outputs; most steps deep into a context).
    if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        // -inf old max (nothing seen yet): the factor is 0 and so are the sums.
        const float rescale = exp2_approx(row_max[r] - offset(new_max[r]));
        row_sum[r] *= rescale;
#pragma unroll
        for (int d = 0; d < kDTiles; ++d) {
          acc_o[d][2 * r] *= rescale;
          acc_o[d][2 * r + 1] *= rescale;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[r] = new_max[r];
      const float off = offset(new_max[r]);
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float prob = exp2_approx(s[n][2 * r + c] - off);
          s[n][2 * r + c] = prob;
          row_sum[r] += prob;
        }
      }
    }
  }
};

}  // namespace jax_flash::decode
