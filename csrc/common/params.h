// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The one parameter struct every attention kernel reads. Plain data, shared by
// host (the FFI handlers fill it) and device (kernels read it by value).
// Sizes are in elements, strides in elements, pointers are device pointers.
//
// Every kernel family reads the same struct: a feature a kernel variant does
// not implement holds its "off" value (nullptr, 0, -1), which the host plan
// guarantees by choosing a variant that covers every feature in use.
#pragma once

#include <cstdint>

#include <vector_types.h>

namespace jax_flash {

struct AttnParams {
  // ---- Tensors -------------------------------------------------------------
  // q: (batch, seqlen_q, nheads, head_dim)      [fixed-length layout]
  //    (total_q, nheads, head_dim)              [varlen layout, cu_seqlens_q]
  // k, v: same with seqlen_k / nheads_k.
  // o: q's layout. lse: (batch, nheads, seqlen_q) float32, natural log;
  //    varlen: (nheads, total_q).
  const void* __restrict__ q_ptr = nullptr;
  const void* __restrict__ k_ptr = nullptr;
  const void* __restrict__ v_ptr = nullptr;
  void* __restrict__ o_ptr = nullptr;
  float* __restrict__ lse_ptr = nullptr;

  // Element strides. batch_stride is unused in varlen mode (rows are indexed
  // through cu_seqlens instead).
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;

  // ---- Sizes ---------------------------------------------------------------
  int batch = 0;
  int seqlen_q = 0;        // max over the batch in varlen mode
  int seqlen_k = 0;        // max over the batch in varlen mode
  int nheads = 0;
  int nheads_k = 0;
  int head_dim = 0;        // actual head dim (multiple of 8, <= kernel's)
  int h_per_hk = 1;        // nheads / nheads_k: query heads sharing a K/V head
  // Varlen: rows of the packed q and k/v buffers. Every sequence is clamped
  // into them (block_info.h), whatever cu_seqlens say.
  int total_q = 0;
  int total_k = 0;

  // ---- Score modifiers -----------------------------------------------------
  float softmax_scale = 1.f;       // multiplies q.k
  float softmax_scale_log2 = 1.f;  // softmax_lse_scale * log2(e): exp(x*s) = exp2(x*s*log2e)
  // Local window in key positions relative to the bottom-right aligned
  // diagonal (i + seqlen_k - seqlen_q). < 0 means unbounded on that side.
  // causal is window_right = 0.
  int window_left = -1;
  int window_right = -1;
  // Softcap, ALiBi and dropout (score_mods.h). The handler fills every
  // derived field (set_score_scales in ffi/attention_ffi.cc).
  float softcap_premul = 0.f;      // softmax_scale / softcap; 0: softcap off
  // Scores are kept in units where exp(x * softmax_lse_scale) is the
  // unnormalised probability: softmax_scale, or softcap when capping.
  float softmax_lse_scale = 1.f;
  const float* alibi_slopes_ptr = nullptr;  // (batch, nheads) float32; nullptr: off
  float dropout_rescale = 1.f;              // 1 / (1 - dropout_p)
  uint32_t dropout_threshold = 0;           // round(dropout_p * 65536)
  // (batch, 4) uint32: seed lo, seed hi, batch index, unused; nullptr: no dropout.
  const uint32_t* rng_ptr = nullptr;

  // ---- Segment ids (document masking, fixed-length layout) ---------------
  // Per query row i of batch b, seg_q[b * seqlen_q + i] = {lo, hi, id, shift}:
  // the row may see keys j in [lo, hi] (its segment's keys, intersected with
  // the window; lo > hi: none) whose id equals `id`; `shift` puts the row at
  // key position i + shift (ALiBi's distance). Per key j, seg_k[b * seqlen_k
  // + j] = {qlo, qhi, id, exact}: rows [qlo, qhi] may see it; `exact` != 0
  // when every id of this batch element forms one run of keys, so that
  // [lo, hi] alone decides visibility. Built by jax_flash.flash_attn
  // (_segment_tables); nullptr: off. The window is folded into [lo, hi], so
  // window_left/right are unbounded when segments are on.
  const int4* __restrict__ seg_q = nullptr;
  const int4* __restrict__ seg_k = nullptr;

  // ---- Variable length ----------------------------------------------------
  // Prefix sums of sequence lengths, (batch + 1,) int32; nullptr: fixed length.
  const int* __restrict__ cu_seqlens_q = nullptr;
  const int* __restrict__ cu_seqlens_k = nullptr;

  // ---- Launch ---------------------------------------------------------------
  // The batch element and head of grid index 0 along the grid's z and y axes.
  // Those axes take at most 65535 blocks, so the launches split a larger batch
  // or head count into several grids and set these to each grid's origin
  // (heads are query heads in the forward grid, K/V heads in the backward).
  int grid_batch0 = 0;
  int grid_head0 = 0;
};

// The backward pass reads the forward's q, k, v, o and lse (AttnParams) and
// the output gradient; it writes dq, dk, dv. dk/dv have k/v's shape (nheads_k
// heads: MQA/GQA gradients are summed over the query heads of a group inside
// the kernel, never through an nheads-sized copy).
struct AttnBwdParams : AttnParams {
  const void* __restrict__ do_ptr = nullptr;  // o's layout
  void* __restrict__ dq_ptr = nullptr;        // q's layout
  void* __restrict__ dk_ptr = nullptr;        // k's layout
  void* __restrict__ dv_ptr = nullptr;        // v's layout
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;

  // Scratch owned by XLA (extra outputs of the custom call):
  // dq_accum (batch, dq_accum_splits, nheads, seqlen_q_rounded, kernel head
  // dim) float32, columns permuted (bwd::BwdTraits::DqAccumCols), zeroed
  // before the main kernel; softmax_d holds D =
  // rowsum(dO * O) in lse's layout. dq_accum_splits > 1 only in deterministic
  // mode (one slice per thread block, see bwd/kernel.h). Varlen: dq_accum is
  // (dq_accum_splits, nheads, seqlen_q_rounded, kernel head dim) with
  // seqlen_q_rounded >= total_q + batch * kBlockM, sequence b starting at a
  // tile-aligned row (BlockInfo::dq_accum_row).
  float* __restrict__ dq_accum_ptr = nullptr;
  float* __restrict__ softmax_d_ptr = nullptr;
  int dq_accum_splits = 1;
  int seqlen_q_rounded = 0;  // multiple of the backward kBlockM
  bool deterministic = false;
  // Deterministic mode without slices (dq_accum_splits == 1, no window, no
  // segment ids; see bwd/kernel.h): dq_semaphore holds one counter per
  // kBlockM x kernel head dim tile of dq_accum (dq_semaphore_tiles of them,
  // numbered in the accumulator's tile order), then the blocks' ticket
  // counter; zeroed by the preprocess kernel. nullptr otherwise.
  int* dq_semaphore_ptr = nullptr;
  int64_t dq_semaphore_tiles = 0;
};

}  // namespace jax_flash
