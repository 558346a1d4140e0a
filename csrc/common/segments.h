// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Segment-id (document) masking for the fixed-length layout. Python turns
// (q_segment_ids, kv_segment_ids) and the window into per-row key intervals
// and per-key row intervals (params.h: seg_q, seg_k), so the kernels never
// see a mask matrix:
//   * a Q tile only visits the K/V tiles its rows' intervals reach, a K/V tile
//     only the Q tiles whose rows can see one of its keys (SegmentRange);
//   * K/V tiles inside every row's interval need no mask at all: the forward
//     kernel runs them in its unmasked steady-state loop;
//   * inside a visited tile an entry is visible iff its key lies in the row's
//     interval and, when some id spans several runs of keys, has the row's id.
// A thread whose rows all see every key of a tile masks nothing, which is
// the case for every tile inside a document.
#pragma once

#include <climits>

#include <cute/tensor.hpp>

#include "params.h"

namespace jax_flash {

// The extremes of the segment intervals of a tile's rows (or keys), over the
// thread block: every thread gets them.
struct SegmentRange {
  int lo = INT_MAX, hi = INT_MIN;          // union of the intervals: [lo, hi]
  int max_lo = INT_MIN, min_hi = INT_MAX;  // intersection: [max_lo, min_hi]

  __device__ __forceinline__ void add(int4 s) {
    max_lo = max(max_lo, s.x);
    min_hi = min(min_hi, s.y);
    if (s.x <= s.y) {  // empty intervals widen nothing
      lo = min(lo, s.x);
      hi = max(hi, s.y);
    }
  }

  // Uses four ints of static shared memory and two barriers.
  __device__ __forceinline__ void reduce_over_block() {
    __shared__ int r[4];
    if (threadIdx.x == 0) {
      r[0] = INT_MAX;
      r[1] = INT_MIN;
      r[2] = INT_MIN;
      r[3] = INT_MAX;
    }
    __syncthreads();
    lo = __reduce_min_sync(0xffffffffu, lo);
    hi = __reduce_max_sync(0xffffffffu, hi);
    max_lo = __reduce_max_sync(0xffffffffu, max_lo);
    min_hi = __reduce_min_sync(0xffffffffu, min_hi);
    if (threadIdx.x % 32 == 0) {
      atomicMin(&r[0], lo);
      atomicMax(&r[1], hi);
      atomicMax(&r[2], max_lo);
      atomicMin(&r[3], min_hi);
    }
    __syncthreads();
    lo = r[0];
    hi = r[1];
    max_lo = r[2];
    min_hi = r[3];
  }
};

// Forward: the key intervals of rows [row0, row0 + rows) of batch element b
// (which K/V tiles a Q tile needs, and which of them need no mask).
template <int kNThreads>
__device__ __forceinline__ SegmentRange segment_key_range(const AttnParams& p, int b, int row0,
                                                          int rows) {
  SegmentRange range;
  for (int i = threadIdx.x; i < rows; i += kNThreads) {
    range.add(p.seg_q[int64_t(b) * p.seqlen_q + row0 + i]);
  }
  range.reduce_over_block();
  return range;
}

// Backward: the row intervals of keys [col0, col0 + cols) (which Q tiles a
// K/V tile needs).
template <int kNThreads>
__device__ __forceinline__ SegmentRange segment_row_range(const AttnParams& p, int b, int col0,
                                                          int cols) {
  SegmentRange range;
  for (int j = threadIdx.x; j < cols; j += kNThreads) {
    range.add(p.seg_k[int64_t(b) * p.seqlen_k + col0 + j]);
  }
  range.reduce_over_block();
  return range;
}

// One thread's rows of a Q tile. Registers hold only what every tile needs
// (the intersection of the rows' intervals, ALiBi's shifts); the tiles at a
// segment's edge re-read the rows' entries (L1 hits), which keeps the
// forward kernel's register pressure where it was.
template <int kRows>
struct SegmentRows {
  int shift[kRows];    // read by ALiBi only; dead code otherwise
  int max_lo, min_hi;  // over this thread's rows inside the sequence
  int rows_left;       // rows of the tile inside the sequence
  bool exact;          // ids form single runs of keys: the intervals decide alone
  const int4* rows;    // seg_q of the tile's first row
  const int4* keys;    // seg_k of this batch element

  // coords: (rows, cols) tile-local coordinates of the thread's entries.
  template <typename TC>
  __device__ __forceinline__ void load(const AttnParams& p, int b, int row0, int rows_left_,
                                       TC const& coords) {
    rows = p.seg_q + int64_t(b) * p.seqlen_q + row0;
    keys = p.seg_k + int64_t(b) * p.seqlen_k;
    rows_left = rows_left_;
    exact = p.seqlen_k > 0 && keys[0].w != 0;
    max_lo = INT_MIN;
    min_hi = INT_MAX;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int row = cute::get<0>(coords(r, 0));
      shift[r] = 0;
      if (row < rows_left) {  // rows past the sequence are never stored: no mask
        const int4 s = rows[row];
        max_lo = max(max_lo, s.x);
        min_hi = min(min_hi, s.y);
        shift[r] = s.w;
      }
    }
  }

  // Masks the entries of K/V tile [col0, col0 + kBlockN) this thread's rows
  // may not see to -inf. Keys past seqlen_k are the Mask's job.
  template <int kBlockN, typename TS, typename TC>
  __device__ __forceinline__ void apply(TS& scores, TC const& coords, int col0,
                                        int seqlen_k) const {
    if (exact && col0 >= max_lo && col0 + kBlockN - 1 <= min_hi) return;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int row = cute::get<0>(coords(r, 0));
      if (row >= rows_left) continue;
      const int4 s = rows[row];
      CUTE_UNROLL
      for (int c = 0; c < cute::size<1>(scores); ++c) {
        const int col = col0 + cute::get<1>(coords(r, c));
        bool visible = col >= s.x && col <= s.y;
        if (!exact && visible && col < seqlen_k) visible = keys[col].z == s.z;
        if (!visible) scores(r, c) = -INFINITY;
      }
    }
  }
};

}  // namespace jax_flash
