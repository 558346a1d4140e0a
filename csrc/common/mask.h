// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Which keys a query may see, FlashAttention-2's way: windows are measured
// from the bottom-right aligned diagonal j = i + seqlen_k - seqlen_q, so the
// last query always lines up with the last key. causal is window_right = 0.
//
// The struct answers two questions: which K/V tiles a Q tile needs at all
// (and, for the backward pass, which Q tiles a K/V tile needs; tiles outside
// are skipped, not computed), and which entries of a needed tile are -inf.
#pragma once

#include "cute_utils.h"

namespace jax_flash {

template <int kBlockM_, int kBlockN_, bool kIsLocal>
struct Mask {
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_;
  int seqlen_q, seqlen_k;
  int left, right;  // window half-widths; "unbounded" is replaced by a width
                    // that reaches past every key, so no branch is needed

  __device__ __forceinline__ Mask(int seqlen_q_, int seqlen_k_, int window_left,
                                  int window_right)
      : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_) {
    left = (!kIsLocal || window_left < 0) ? seqlen_q + seqlen_k : window_left;
    right = (!kIsLocal || window_right < 0) ? seqlen_q + seqlen_k : window_right;
  }

  __device__ __forceinline__ int diag(int row) const { return row + seqlen_k - seqlen_q; }

  // K/V tiles [n_min, n_max) hold every key visible to rows of Q tile m_block.
  __device__ __forceinline__ int n_block_max(int m_block) const {
    const int n_all = (seqlen_k + kBlockN - 1) / kBlockN;
    if (!kIsLocal) return n_all;
    const int last_row = min((m_block + 1) * kBlockM, seqlen_q) - 1;
    const int last_col = diag(last_row) + right;  // may be negative: no tile
    if (last_col < 0) return 0;
    return min(n_all, last_col / kBlockN + 1);
  }
  __device__ __forceinline__ int n_block_min(int m_block) const {
    if (!kIsLocal) return 0;
    const int first_col = diag(m_block * kBlockM) - left;
    return max(0, first_col / kBlockN);
  }

  // Q tiles [m_min, m_max) hold every query that sees a key of K/V tile n_block.
  __device__ __forceinline__ int m_block_min(int n_block) const {
    if (!kIsLocal) return 0;
    // Key j is visible to rows i >= j - (seqlen_k - seqlen_q) - right.
    const int first_row = n_block * kBlockN - (seqlen_k - seqlen_q) - right;
    return first_row <= 0 ? 0 : first_row / kBlockM;
  }
  __device__ __forceinline__ int m_block_max(int n_block) const {
    const int m_all = (seqlen_q + kBlockM - 1) / kBlockM;
    if (!kIsLocal) return m_all;
    // ... and to rows i <= j - (seqlen_k - seqlen_q) + left.
    const int last_row = min((n_block + 1) * kBlockN, seqlen_k) - 1 - (seqlen_k - seqlen_q) + left;
    if (last_row < 0) return 0;
    return min(m_all, last_row / kBlockM + 1);
  }

  // Whether any entry of tile (m_block, n_block) is masked.
  __device__ __forceinline__ bool tile_needs_mask(int m_block, int n_block) const {
    const int col_lo = n_block * kBlockN, col_hi = col_lo + kBlockN - 1;
    if (col_hi >= seqlen_k) return true;
    if (!kIsLocal) return false;
    const int row_lo = m_block * kBlockM, row_hi = row_lo + kBlockM - 1;
    // Any entry right of the first row's right edge, or left of the last
    // row's left edge.
    return col_hi > diag(row_lo) + right || col_lo < diag(row_hi) - left;
  }

  // scores: (rows, cols) view of the S accumulator; coords: identity tensor
  // partitioned the same way, giving tile-local (row, col).
  template <typename TS, typename TC>
  __device__ __forceinline__ void apply(TS& scores, TC const& coords, int m_block,
                                        int n_block) const {
    const int row0 = m_block * kBlockM, col0 = n_block * kBlockN;
    CUTE_UNROLL
    for (int r = 0; r < size<0>(scores); ++r) {
      const int row = row0 + get<0>(coords(r, 0));
      const int col_hi = min(seqlen_k - 1, diag(row) + right);
      const int col_lo = diag(row) - left;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const int col = col0 + get<1>(coords(r, c));
        if (col > col_hi || col < col_lo) scores(r, c) = -INFINITY;
      }
    }
  }
};

}  // namespace jax_flash
