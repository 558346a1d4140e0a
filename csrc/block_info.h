// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Where one batch element's rows live, and how many there are. Every kernel
// family asks this struct for row offsets instead of computing
// `b * batch_stride` itself, so that varlen (cu_seqlens) and kv-cache
// (seqused_k) layouts change one place.
#pragma once

#include "params.h"

namespace jax_flash {

struct BlockInfo {
  int64_t q_row_start;  // first row of this batch element in the q/o row space
  int64_t k_row_start;  // same for k/v
  int seqlen_q;         // rows of q for this batch element
  int seqlen_k;         // keys visible to this batch element

  __device__ __forceinline__ BlockInfo(const AttnParams& p, int bidb) {
    varlen_q = p.cu_seqlens_q != nullptr;
    varlen_k = p.cu_seqlens_k != nullptr;
    q_row_start = varlen_q ? p.cu_seqlens_q[bidb] : 0;
    k_row_start = varlen_k ? p.cu_seqlens_k[bidb] : 0;
    seqlen_q = varlen_q ? p.cu_seqlens_q[bidb + 1] - p.cu_seqlens_q[bidb] : p.seqlen_q;
    const int seqlen_k_total =
        varlen_k ? p.cu_seqlens_k[bidb + 1] - p.cu_seqlens_k[bidb] : p.seqlen_k;
    seqlen_k = p.seqused_k != nullptr ? p.seqused_k[bidb] : seqlen_k_total;
    // Never trust lengths beyond the declared maxima: the kernel's tiles are
    // sized from seqlen_q/seqlen_k, and inconsistent prefix sums must not turn
    // into out-of-bounds accesses.
    seqlen_q = seqlen_q < 0 ? 0 : (seqlen_q > p.seqlen_q ? p.seqlen_q : seqlen_q);
    seqlen_k = seqlen_k < 0 ? 0 : (seqlen_k > p.seqlen_k ? p.seqlen_k : seqlen_k);
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

 private:
  bool varlen_q, varlen_k;
};

}  // namespace jax_flash
