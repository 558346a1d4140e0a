// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Online softmax over K/V tiles (FlashAttention's rescaling). Each thread owns
// kRows accumulator rows; the running max is kept in raw score units and
// folded with softmax_scale * log2(e) so that every exponential is one exp2
// of one FFMA: exp(scale * (s - m)) = exp2(s * scale_log2 - m * scale_log2).
#pragma once

#include <cmath>

#include "cute_utils.h"

namespace jax_flash::fwd {

template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];
  float row_sum[kRows];  // this thread's partial sum; quad-reduced in finalize()

  // A row that has seen only masked scores has max -inf. Using 0 as its
  // offset keeps exp2(-inf - offset) = 0 instead of exp2(-inf + inf) = NaN.
  __device__ __forceinline__ static float scaled_offset(float max, float scale_log2) {
    return max == -INFINITY ? 0.f : max * scale_log2;
  }

  // scores: (rows, cols) view of S for the current K/V tile, raw q.k values
  // (masked entries -inf). acc_o: (rows, cols) view of the O accumulator.
  // On return, scores holds the unnormalised probabilities of this tile.
  template <bool kFirst, typename TS, typename TO>
  __device__ __forceinline__ void update(TS& scores, TO& acc_o, float scale_log2) {
    static_assert(decltype(size<0>(scores))::value == kRows);
    float new_max[kRows];
    bool grew = false;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float m = kFirst ? -INFINITY : row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) m = fmaxf(m, scores(r, c));
      new_max[r] = quad_allreduce(m, MaxOp{});
      if (!kFirst) grew |= new_max[r] != row_max[r];
    }
    // Old contributions were exponentiated against the old max. Far into a
    // row the max rarely grows, and an unchanged max means a factor of exactly
    // 1: a warp whose rows all kept their max skips the O rescale (one
    // multiply per accumulator, as many as the whole P V product's outputs).
    if (!kFirst && __any_sync(0xffffffff, grew)) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        // -inf old max (nothing seen yet): exp2(-inf) = 0 and the sums are 0.
        const float rescale = exp2f(row_max[r] * scale_log2 - scaled_offset(new_max[r], scale_log2));
        row_sum[r] *= rescale;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(acc_o); ++c) acc_o(r, c) *= rescale;
      }
    }
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) row_max[r] = new_max[r];
    exponentiate<kFirst>(scores, scale_log2);
  }

  // The same for a softmax whose scores are bounded: softcap alone, where
  // every score is tanh(.) in [-1, 1] (fwd/launch.h picks this kernel). The
  // offset need not follow the max, as long as it never changes once a row
  // has a term: later scores exceed it by at most 2 (or 1 for offset 0), a
  // factor exp(2 * softcap) that float32 and bf16 P hold for softcap <= 30
  // (the smallest term, exp(-2 * softcap), stays a normal float too). O is
  // never rescaled. kFindOffset (the masked tiles at the ends of the range):
  // a row takes the max of the first tile where it sees a key, after a warp
  // vote on whether any row still waits for one; a row with one visible key
  // gets exactly the running-max numbers. Otherwise (the steady loop) there
  // is no reduction at all: a row that saw no key yet takes offset 0.
  template <bool kFirst, bool kFindOffset, typename TS>
  __device__ __forceinline__ void update_fixed_offset(TS& scores, float scale_log2) {
    static_assert(decltype(size<0>(scores))::value == kRows);
    if constexpr (kFindOffset) {
      bool unset = kFirst;
      if constexpr (!kFirst) {
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) unset |= row_max[r] == -INFINITY;
      }
      if (kFirst || __any_sync(0xffffffff, unset)) {
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
          float m = -INFINITY;
          CUTE_UNROLL
          for (int c = 0; c < size<1>(scores); ++c) m = fmaxf(m, scores(r, c));
          m = quad_allreduce(m, MaxOp{});
          row_max[r] = kFirst || row_max[r] == -INFINITY ? m : row_max[r];
        }
      }
    } else {
      static_assert(!kFirst, "the first tile finds the offsets");
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) row_max[r] = row_max[r] == -INFINITY ? 0.f : row_max[r];
    }
    exponentiate<kFirst>(scores, scale_log2);
  }

  // Normalises acc_o in place (times out_scale, dropout's 1 / (1 - p)) and
  // returns each row's log-sum-exp (natural log; lse_scale converts score
  // units to natural-log units). A row with no visible key has sum 0: its
  // output stays 0 (never 0/0) and its LSE is +inf, as FlashAttention defines.
  template <typename TO>
  __device__ __forceinline__ void finalize(TO& acc_o, float lse_scale, float out_scale,
                                           float (&lse)[kRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_allreduce(row_sum[r], SumOp{});
      const bool empty = sum == 0.f || sum != sum;
      const float inv = empty ? 0.f : out_scale / sum;
      lse[r] = empty ? INFINITY : row_max[r] * lse_scale + logf(sum);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(acc_o); ++c) acc_o(r, c) *= inv;
    }
  }

  // scores -> exp(scale * (s - row_max)) in place, accumulated into the row
  // sums.
  template <bool kFirst, typename TS>
  __device__ __forceinline__ void exponentiate(TS& scores, float scale_log2) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float offset = scaled_offset(row_max[r], scale_log2);
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const float p = exp2f(scores(r, c) * scale_log2 - offset);
        scores(r, c) = p;
        sum += p;
      }
      row_sum[r] = kFirst ? sum : row_sum[r] + sum;
    }
  }
};

}  // namespace jax_flash::fwd
