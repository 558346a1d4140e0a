// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The append of flash_attn_with_kvcache in one kernel: the new key and value
// rows written into the caches (in place), the key rows rotated first, and q
// rotated into q_out, with the clamping rules of jax_flash/_src/kvcache.py
// (the reference, _src/kvcache_ref.py steps 1-3, is the semantics):
//
//   c_b  = cache_seqlens[b] clamped into [0, seqlen_cache - seqlen_new],
//   lp_b = cache_leftpad[b] clamped into [0, c_b] (0 without leftpad),
//   new row i of sequence b goes to logical position c_b + i: contiguous row
//   cache_batch_idx[b] (clamped; b without it), paged page
//   block_table[b, (c_b + i) / page_size] (clamped), row (c_b + i) % page_size;
//   rotary positions c_b - lp_b + i (keys; queries too when q_per_row, else
//   c_b - lp_b), clamped into [0, seqlen_ro - 1], computed in float32 and
//   rounded to the dtype once.
//
// Several new rows may name one slot (duplicate cache_batch_idx, shared
// pages): with `dedupe` the last in (batch, row) order is the one written,
// as in the reference; the check costs O(batch * seqlen_new) per row.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_flash {

struct KVCacheAppendParams {
  // q (batch, seqlen_q, nheads, head_dim) -> q_out, rotated; both null
  // without rotary.
  const void* q = nullptr;
  void* q_out = nullptr;
  // k, v (batch, seqlen_new, nheads_k, head_dim).
  const void* k = nullptr;
  const void* v = nullptr;
  // The caches, written in place: contiguous (batch_cache, seqlen_cache,
  // nheads_k, head_dim) or paged (num_pages, page_size, nheads_k, head_dim).
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  // (seqlen_ro, rotary_dim / 2) in the dtype; null without rotary.
  const void* rotary_cos = nullptr;
  const void* rotary_sin = nullptr;
  const int* cache_seqlens = nullptr;    // (batch,)
  const int* cache_batch_idx = nullptr;  // (batch,) or null
  const int* cache_leftpad = nullptr;    // (batch,) or null
  const int* block_table = nullptr;      // (batch, max_blocks) when paged, else null
  int batch = 0, seqlen_q = 0, seqlen_new = 0, nheads = 0, nheads_k = 0, head_dim = 0;
  int rotary_dim = 0, seqlen_ro = 0;
  int seqlen_cache = 0;  // logical rows per sequence (paged: max_blocks * page_size)
  int batch_cache = 0;   // contiguous: cache rows; paged: num_pages
  int page_size = 0, max_blocks = 0;
  bool bf16 = false, interleaved = true, q_per_row = false, dedupe = false;
};

// One block per (new row, K/V head) and per (q row, head) with rotary; the
// blocks must number < 2^31.
cudaError_t launch_kvcache_append(const KVCacheAppendParams& a, cudaStream_t stream);

}  // namespace jax_flash
