// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Where one batch element's rows live, and how many there are. Every kernel
// family asks this struct for row offsets instead of computing
// `b * batch_stride` itself, so that a new row layout (varlen cu_seqlens
// today) changes one place.
#pragma once

#include "params.h"

namespace jax_flash {

// Rows [start, start + len) of a packed buffer with `total` rows that
// sequence b owns: cu_seqlens[b] clamped into the buffer, the length clamped
// to the declared maximum and to the buffer's end. Inconsistent prefix sums
// (decreasing, past the end, lengths above the maximum) therefore shorten or
// empty sequences, never reach outside the buffer.
struct SeqRows {
  int start, len;
  __device__ __forceinline__ SeqRows(const int* cu_seqlens, int b, int max_len, int total) {
    const int lo = cu_seqlens[b], hi = cu_seqlens[b + 1];
    start = lo < 0 ? 0 : (lo > total ? total : lo);
    len = hi - lo;
    len = len < 0 ? 0 : len;
    len = len > max_len ? max_len : len;
    len = len > total - start ? total - start : len;
  }
  // Row `row` of the buffer belongs to this sequence.
  __device__ __forceinline__ bool covers(int row) const { return row >= start && row < start + len; }
};

// The sequence whose clamped rows contain `row`, or -1. Binary search over
// monotone prefix sums; for decreasing ones the answer is some sequence that
// covers the row, or -1 even where one does (results are then unspecified,
// flash_attn_varlen_func's docstring).
__device__ __forceinline__ int sequence_of_row(const int* cu_seqlens, int batch, int max_len,
                                               int total, int row) {
  int lo = 0, hi = batch - 1;  // the last b with cu_seqlens[b] <= row
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu_seqlens[mid] <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  if (batch <= 0) return -1;
  return SeqRows(cu_seqlens, lo, max_len, total).covers(row) ? lo : -1;
}

struct BlockInfo {
  int64_t q_row_start;  // first row of this batch element in the q/o row space
  int64_t k_row_start;  // same for k/v
  int seqlen_q;         // rows of q for this batch element
  int seqlen_k;         // keys visible to this batch element

  __device__ __forceinline__ BlockInfo(const AttnParams& p, int bidb) {
    varlen_q = p.cu_seqlens_q != nullptr;
    varlen_k = p.cu_seqlens_k != nullptr;
    if (varlen_q) {
      const SeqRows rows(p.cu_seqlens_q, bidb, p.seqlen_q, p.total_q);
      q_row_start = rows.start;
      seqlen_q = rows.len;
    } else {
      q_row_start = 0;
      seqlen_q = p.seqlen_q;
    }
    if (varlen_k) {
      const SeqRows rows(p.cu_seqlens_k, bidb, p.seqlen_k, p.total_k);
      k_row_start = rows.start;
      seqlen_k = rows.len;
    } else {
      k_row_start = 0;
      seqlen_k = p.seqlen_k;
    }
  }

  // Element offset of (batch bidb, row 0): varlen rows are addressed through
  // the prefix sums, fixed-length rows through the batch stride.
  __device__ __forceinline__ int64_t q_offset(int64_t batch_stride, int64_t row_stride,
                                              int bidb) const {
    return varlen_q ? q_row_start * row_stride : bidb * batch_stride;
  }
  __device__ __forceinline__ int64_t k_offset(int64_t batch_stride, int64_t row_stride,
                                              int bidb) const {
    return varlen_k ? k_row_start * row_stride : bidb * batch_stride;
  }

  // Offset of (batch bidb, head h, row 0) in the per-row float32 statistics
  // (LSE, D): (batch, nheads, seqlen_q), or (nheads, total_q) for varlen.
  __device__ __forceinline__ int64_t stats_offset(const AttnParams& p, int bidb, int h) const {
    return varlen_q ? int64_t(h) * p.total_q + q_row_start
                    : (int64_t(bidb) * p.nheads + h) * p.seqlen_q;
  }

  // First accumulator row of this sequence in the varlen dQ accumulator:
  // q_row_start + bidb * kBlockM rounded down to a tile, so that every
  // sequence's whole tiles are disjoint and inside seqlen_q_rounded rows
  // (params.h). 0 for fixed-length layouts (rows are per batch element).
  template <int kBlockM>
  __device__ __forceinline__ int64_t dq_accum_row(int bidb) const {
    return varlen_q ? (q_row_start + int64_t(bidb) * kBlockM) / kBlockM * kBlockM : 0;
  }

 private:
  bool varlen_q, varlen_k;
};

}  // namespace jax_flash
