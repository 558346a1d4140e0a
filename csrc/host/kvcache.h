// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The host entry point of the kv-cache custom call (jax_flash_kvcache_fwd),
// free of XLA types like host/attention.h: validates every operand against
// the plan (host/plan.h), fills DecodeParams and launches the decode kernels
// (csrc/decode/) on `stream`. The decode kernels only read the caches; the
// append and the rotary embedding run before them, in one kernel
// (jax_flash_kvcache_append, host/kvcache_append.h) or in JAX
// (jax_flash/_src/cuda_kvcache.py). Nothing here allocates device memory,
// synchronises or exits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention.h"

namespace jax_flash {

// The attributes of a kv-cache call.
struct KVCacheAttrs {
  float softmax_scale = 1.f;
  int32_t window_left = -1, window_right = -1;  // -1: unbounded; causal: right = 0
  float softcap = 0.f;                          // 0: off
  int32_t seqlen_new = 0;  // rows appended before the call (already in the caches)
  bool paged = false;      // caches (num_blocks, page_size, ...) addressed by block_table
};

// The operands, in the custom call's order. q (batch, seqlen_q, nheads,
// head_dim) float16/bfloat16; k_cache, v_cache in q's dtype, contiguous
// (batch_cache, seqlen_cache, nheads_k, head_dim) or paged (num_blocks,
// page_size, nheads_k, head_dim); cache_seqlens int32 (batch,); then, each
// empty when off: cache_batch_idx, cache_leftpad int32 (batch,) (contiguous
// only), block_table int32 (batch, max_blocks_per_seq) (paged only),
// alibi_slopes float32 (batch, nheads).
struct KVCacheInputs {
  Tensor q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, alibi;
};

// Writes out (q's shape and dtype) and lse float32 (batch, nheads,
// seqlen_q). out_accum and lse_accum are the plan's split scratch
// (KVCachePlan): their shapes give the number of splits, both empty for one.
Status kvcache_fwd(const KVCacheInputs& in, const KVCacheAttrs& attrs, const Tensor& out,
                   const Tensor& lse, const Tensor& out_accum, const Tensor& lse_accum,
                   cudaStream_t stream);

// The operands of an append (jax_flash_kvcache_append): q, the caches and
// the tables as in KVCacheInputs; k, v (batch, seqlen_new, nheads_k,
// head_dim) in q's dtype; rotary_cos, rotary_sin (seqlen_ro, rotary_dim / 2)
// in q's dtype, or both empty (no rotary).
struct KVCacheAppendInputs {
  Tensor q, k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
      rotary_cos, rotary_sin;
};

struct KVCacheAppendAttrs {
  bool paged = false;
  bool rotary_interleaved = true;  // GPT-J pairs (2m, 2m + 1), else GPT-NeoX halves
  bool rotary_q_per_row = false;   // q row i at position c - lp + i, else c - lp
};

// Writes k and v (k rotated) into the caches at cache_seqlens, and q rotated
// into q_out (empty without rotary). k_cache_out and v_cache_out must be the
// caches' own buffers (the custom call aliases them): the write is in place.
Status kvcache_append(const KVCacheAppendInputs& in, const KVCacheAppendAttrs& attrs,
                      const Tensor& q_out, const Tensor& k_cache_out, const Tensor& v_cache_out,
                      cudaStream_t stream);

}  // namespace jax_flash
