// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The parameter struct of the kv-cache decode kernels (flash_attn_with_kvcache).
// Plain data: host/kvcache.cc fills it after validating every shape, the
// kernels read it by value. Sizes and strides are in elements.
#pragma once

#include <cstdint>

namespace jax_flash {

struct DecodeParams {
  // ---- Tensors ---------------------------------------------------------------
  // q, o: (batch, seqlen_q, nheads, head_dim), dense. lse: (batch, nheads,
  // seqlen_q) float32, natural log, +inf for a row with no visible key.
  // k, v: the caches, dense rows of nheads_k * head_dim elements grouped in
  // pages of page_size rows: paged (num_blocks, page_size, nheads_k,
  // head_dim); contiguous (batch_cache, seqlen_cache, nheads_k, head_dim) is
  // the same thing with one page of seqlen_cache rows per sequence. Logical
  // position j of sequence b lives in row j % page_size of page
  // block_table[b, j / page_size] (paged) or cache_batch_idx[b] (contiguous).
  const void* __restrict__ q_ptr = nullptr;
  const void* __restrict__ k_ptr = nullptr;
  const void* __restrict__ v_ptr = nullptr;
  void* __restrict__ o_ptr = nullptr;
  float* __restrict__ lse_ptr = nullptr;

  // Split-KV scratch (num_splits > 1), float32, owned by XLA: each split's
  // attention over its own keys, normalised, (num_splits, batch, nheads,
  // seqlen_q, head_dim), and its natural-log LSE (num_splits, batch, nheads,
  // seqlen_q), -inf where the split saw no visible key. Every split writes
  // every row; the combine kernel merges them into o and lse.
  float* __restrict__ o_accum_ptr = nullptr;
  float* __restrict__ lse_accum_ptr = nullptr;

  // ---- Per-sequence tables, int32 (batch,) unless said; nullptr: off -------
  // Read as given and clamped in the kernel (decode/sequence.h), by the rules
  // of jax_flash/_src/kvcache_ref.py.
  const int* __restrict__ cache_seqlens = nullptr;    // never nullptr
  const int* __restrict__ cache_batch_idx = nullptr;  // contiguous only
  const int* __restrict__ cache_leftpad = nullptr;    // contiguous only
  const int* __restrict__ block_table = nullptr;      // (batch, max_blocks); nullptr: contiguous
  const float* __restrict__ alibi_slopes = nullptr;   // float32 (batch, nheads)

  // ---- Sizes -------------------------------------------------------------------
  int batch = 0;
  int seqlen_q = 0;
  int nheads = 0;
  int nheads_k = 0;
  int group = 1;         // nheads / nheads_k: query heads per K/V head
  int head_dim = 0;      // multiple of 8, <= the kernel's compiled head dim
  int seqlen_cache = 0;  // logical positions per sequence
  int seqlen_new = 0;    // rows appended before the call (already in the cache)
  int num_pages = 0;     // batch_cache or num_blocks: page ids clamp into [0, num_pages)
  int page_size = 0;     // paged: rows per page; contiguous: seqlen_cache
  int max_blocks = 1;    // paged: block_table's row length; contiguous: 1
  int64_t cache_row_stride = 0;  // nheads_k * head_dim

  // ---- Score modifiers (same units as AttnParams, common/params.h) -----------
  // Scores become x = f(q.k) * scale_log2 - alibi_slope * log2(e) * |j - i'|
  // with f(s) = s, or tanh(s * softcap_premul) with softcap (scale_log2 then
  // holds softcap * log2(e)), so that exp(score) = exp2(x).
  float scale_log2 = 1.f;
  float softcap_premul = 0.f;  // softmax_scale / softcap; 0: off
  // Window in key positions around query row i's position i' = L_b -
  // seqlen_q + i; -1: unbounded. Causal is window_right = 0. The host clamps
  // both into [-1, seqlen_cache + seqlen_q], where they stop binding.
  int window_left = -1;
  int window_right = -1;

  // ---- Launch ------------------------------------------------------------------
  int num_splits = 1;   // 1: the kernel writes o and lse itself
  bool narrow = false;  // the tile: decode_tile(head_dim, narrow) (decode/tile.h)
  // K/V tiles by sm_90's copy engine (decode/tma.h; narrow tiles, head_dim
  // a multiple of 64 and compiled), boxes of box_rows cache rows: 64, or
  // the page size of pages shorter than a tile.
  bool copy_engine = false;
  int box_rows = 0;
  int m_blocks = 1;     // row blocks of that tile's block_m per K/V head
  // Launch the combine as the split kernel's programmatic dependent
  // (sm_90 and later; decode/launch.h).
  bool dependent_combine = false;
  // Origins of the grid's y (K/V head) and z (batch) axes: launch_grids
  // (common/launch.h) splits grids past 65535 along them.
  int grid_batch0 = 0;
  int grid_head0 = 0;
};

}  // namespace jax_flash
