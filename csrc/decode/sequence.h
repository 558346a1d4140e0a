// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// What a decode thread block knows about its sequence: the clamped lengths,
// the keys its query rows may see, the K/V tiles of its split, and where a
// logical key position lives in the cache (the one key-row address function
// of paged and contiguous caches). The clamping rules are those of
// jax_flash/_src/kvcache_ref.py, applied to the raw tables so that no value,
// however inconsistent, moves a read outside a buffer:
//   c    = cache_seqlens[b] clamped into [0, seqlen_cache - seqlen_new]
//   L    = c + seqlen_new                (keys [0, L) hold data after the append)
//   lp   = cache_leftpad[b] clamped into [0, c]   (keys before it are invisible)
//   row  = cache_batch_idx[b] clamped into [0, batch_cache - 1]   (contiguous)
//   page = block_table[b, j / page_size] clamped into [0, num_blocks - 1] (paged)
// Query row i sits at key position L - seqlen_q + i (bottom-right aligned).
#pragma once

#include <cstdint>

#include "params.h"

namespace jax_flash::decode {

__device__ __forceinline__ int clamp_int(int x, int lo, int hi) { return min(max(x, lo), hi); }

struct SequenceInfo {
  int length;      // L
  int leftpad;     // lp
  // Keys some query row of the block may see: [lp, L), cut by the window of
  // its first query row on the left and of its last on the right (causal
  // chunked prefill: a block of early rows skips the later keys). Nothing
  // outside is ever read.
  int key_begin, key_end;
  // This split's K/V tiles [tile_begin, tile_end) of block_n keys (tile t
  // covers keys [t * block_n, (t + 1) * block_n)): the block's tiles in
  // num_splits runs of equal length, the last ones shorter or empty. The
  // blocks of other rows split their own tiles; the combine merges each
  // row over the splits of its own blocks.
  int tile_begin, tile_end;
  const int* table;     // paged: this sequence's block_table row; contiguous: nullptr
  int64_t first_row;    // contiguous: the cache row of position 0
  int64_t head_offset;  // elements from a cache row's start to this K/V head
  // Every tile lies inside one page: contiguous caches, and pages of a
  // multiple of block_n rows (tiles start at multiples of block_n). Then a
  // tile needs one page lookup instead of one per key.
  bool tile_in_one_page;

  // The block of query rows [row0, row0 + block_rows) (block_rows >= 1) of
  // K/V head hk in sequence b, split `split`.
  __device__ __forceinline__ SequenceInfo(const DecodeParams& p, int b, int hk, int split,
                                          int row0, int block_rows, int block_n) {
    const int c = clamp_int(p.cache_seqlens[b], 0, p.seqlen_cache - p.seqlen_new);
    length = c + p.seqlen_new;
    leftpad = p.cache_leftpad != nullptr ? clamp_int(p.cache_leftpad[b], 0, c) : 0;
    // Rows m are query rows m / group (row_bounds below).
    const int first_pos = length - p.seqlen_q + row0 / p.group;
    const int last_pos = length - p.seqlen_q + (row0 + block_rows - 1) / p.group;
    key_begin = leftpad;
    if (p.window_left >= 0) key_begin = max(key_begin, first_pos - p.window_left);
    key_end = length;
    if (p.window_right >= 0) key_end = min(key_end, last_pos + p.window_right + 1);
    tile_begin = tile_end = 0;
    if (key_begin < key_end) {
      const int first = key_begin / block_n;
      const int last = (key_end + block_n - 1) / block_n;
      const int per_split = (last - first + p.num_splits - 1) / p.num_splits;
      tile_begin = min(first + split * per_split, last);
      tile_end = min(tile_begin + per_split, last);
    }
    if (p.block_table != nullptr) {
      table = p.block_table + int64_t(b) * p.max_blocks;
      first_row = 0;
      tile_in_one_page = p.page_size % block_n == 0;
    } else {
      table = nullptr;
      const int row = p.cache_batch_idx != nullptr
                          ? clamp_int(p.cache_batch_idx[b], 0, p.num_pages - 1)
                          : b;
      first_row = int64_t(row) * p.seqlen_cache;
      tile_in_one_page = true;
    }
    head_offset = int64_t(hk) * p.head_dim;
  }

  // The cache row holding logical position j, 0 <= j < seqlen_cache (so
  // j / page_size < max_blocks: the table read stays in its row).
  __device__ __forceinline__ int64_t cache_row(const DecodeParams& p, int j) const {
    if (table == nullptr) return first_row + j;
    const int page = clamp_int(table[j / p.page_size], 0, p.num_pages - 1);
    return int64_t(page) * p.page_size + j % p.page_size;
  }
};

// The keys one query row sees, [lo, hi), its key position and its ALiBi
// slope in log2 units. A padding row (m >= group * seqlen_q, the rest of the
// last 16-row slab) sees nothing.
struct RowBounds {
  int lo = 0, hi = 0;
  int pos = 0;
  float slope_log2 = 0.f;
};

// Row m of a K/V head's query rows is query row i = m / group of query head
// hk * group + m % group: the group's heads of one query row are adjacent
// in q, so a row slab reads contiguous memory.
__device__ __forceinline__ RowBounds row_bounds(const DecodeParams& p, const SequenceInfo& seq,
                                                int b, int hk, int m) {
  constexpr float kLog2e = 1.4426950408889634f;
  RowBounds rb;
  if (m >= p.group * p.seqlen_q) return rb;
  const int i = m / p.group;
  const int head = hk * p.group + m % p.group;
  rb.pos = seq.length - p.seqlen_q + i;
  rb.lo = seq.leftpad;
  if (p.window_left >= 0) rb.lo = max(rb.lo, rb.pos - p.window_left);
  rb.hi = seq.length;
  if (p.window_right >= 0) rb.hi = min(rb.hi, rb.pos + p.window_right + 1);
  if (p.alibi_slopes != nullptr) {
    rb.slope_log2 = p.alibi_slopes[int64_t(b) * p.nheads + head] * kLog2e;
  }
  return rb;
}

}  // namespace jax_flash::decode
