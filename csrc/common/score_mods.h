// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Score modifiers between S = Q K^T and the softmax, shared by the forward
// and backward kernels:
//
//   softcap  s -> softcap * tanh(s * scale / softcap)
//   ALiBi    s -> s - slope * |i + seqlen_k - seqlen_q - j|
//   dropout  P -> P * keep / (1 - p), keep drawn from a counter-based RNG
//            (dropout.h)
//
// Units. The kernels keep scores in "softmax units" x and exponentiate with
// one FFMA, exp(x * lse_scale) = exp2(x * softmax_scale_log2). Without softcap
// x is the raw q.k and lse_scale the softmax scale. With softcap x is
// tanh(q.k * scale / softcap) and lse_scale is softcap, so capping costs one
// multiply and one tanh per score. ALiBi slopes are divided by lse_scale once
// per tile.
#pragma once

#include <cstdint>

#include "cute_utils.h"
#include "dropout.h"
#include "params.h"

namespace jax_flash {

// Softcap and ALiBi on a (rows, cols) view of the scores.
struct ScoreMods {
  float softcap_premul;  // scale / softcap; 0: off
  float alibi_slope;     // slope / lse_scale; 0: off
  int diag_shift;        // seqlen_k - seqlen_q

  __device__ __forceinline__ ScoreMods(const AttnParams& p, int bidb, int bidh, int seqlen_q,
                                       int seqlen_k) {
    softcap_premul = p.softcap_premul;
    alibi_slope = p.alibi_slopes_ptr != nullptr
                      ? p.alibi_slopes_ptr[int64_t(bidb) * p.nheads + bidh] / p.softmax_lse_scale
                      : 0.f;
    diag_shift = seqlen_k - seqlen_q;
  }

  __device__ __forceinline__ static float tanh_approx(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }

  template <typename TS>
  __device__ __forceinline__ void softcap(TS& scores) const {
    CUTE_UNROLL
    for (int i = 0; i < cute::size(scores); ++i) scores(i) = tanh_approx(scores(i) * softcap_premul);
  }

  // row_shift: per-row diagonal shifts (segment ids: the row's segment
  // decides its key position), indexed like the rows of scores; nullptr:
  // diag_shift for every row.
  template <typename TS, typename TC>
  __device__ __forceinline__ void alibi(TS& scores, TC const& coords, int row0, int col0,
                                        const int* row_shift = nullptr) const {
    using namespace cute;
    CUTE_UNROLL
    for (int r = 0; r < size<0>(scores); ++r) {
      // Signed distance of this thread's first column of the row from the
      // row's diagonal; the other columns sit at compile-time offsets.
      const int shift = row_shift != nullptr ? row_shift[r] : diag_shift;
      const float base =
          float(col0 + get<1>(coords(r, 0)) - (row0 + get<0>(coords(r, 0)) + shift));
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const float dist = fabsf(base + float(get<1>(coords(r, c)) - get<1>(coords(r, 0))));
        scores(r, c) -= alibi_slope * dist;
      }
    }
  }

  // Forward: both modifiers, in FlashAttention's order (cap, then bias).
  template <typename TS, typename TC>
  __device__ __forceinline__ void apply(TS& scores, TC const& coords, int row0, int col0,
                                        const int* row_shift = nullptr) const {
    if (softcap_premul != 0.f) softcap(scores);
    if (alibi_slope != 0.f) alibi(scores, coords, row0, col0, row_shift);
  }
};

}  // namespace jax_flash
