// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// FlashAttention-2 forward for one (Q tile, batch, head): the thread block
// keeps its Q tile in shared memory, walks the K/V tiles from the last needed
// one backwards (so the one tile that may need seqlen/causal masking comes
// first), and keeps O and the softmax statistics in registers:
//
//   for each K/V tile j:   S = Q K_j^T            (tensor cores, fp32 acc)
//                          m, l, O rescaled       (online softmax)
//                          O += exp(S - m) V_j    (P straight from registers)
//   O /= l,  LSE = m + log(l)
//
// Loads overlap compute: V_j streams in while S = Q K_j^T runs, K_{j-1}
// while O += P V_j runs (cp.async, one K and one V buffer).
#pragma once

#include <cute/tensor.hpp>

#include "../common/block_info.h"
#include "../common/cute_utils.h"
#include "../common/mask.h"
#include "../common/params.h"
#include "../common/score_mods.h"
#include "../common/segments.h"
#include "../common/softmax.h"
#include "fwd_traits.h"

namespace jax_flash::fwd {

using namespace cute;

// A Q tile with no visible key at all (window entirely outside the keys, or
// seqlen_k == 0): O = 0 and LSE = +inf, written without touching K/V.
template <typename Traits, typename GO>
__device__ void write_empty_rows(const AttnParams& p, GO& gO, float* lse, int rows_left) {
  using Element = typename Traits::Element;
  const int rows = min(rows_left, Traits::kBlockM);
  for (int i = threadIdx.x; i < rows * p.head_dim; i += Traits::kNThreads) {
    gO(i / p.head_dim, i % p.head_dim) = Element(0.f);
  }
  for (int i = threadIdx.x; i < rows; i += Traits::kNThreads) lse[i] = INFINITY;
}

// kHasMods: softcap and ALiBi, kHasDropout: dropout too (score_mods.h),
// kHasSegs: segment ids (segments.h), each switched on at run time; the
// kernels without them carry none of their registers. kFixedOffset: the
// scores are bounded (softcap alone) and the softmax keeps a fixed offset per
// row instead of a running max (OnlineSoftmax::update_fixed_offset).
template <typename Traits, bool kIsLocal, bool kHasMods, bool kHasDropout, bool kHasSegs,
          bool kFixedOffset>
__device__ __forceinline__ void attn_fwd_tile(const AttnParams& p, const int m_block, const int bidb,
                              const int bidh) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  const int tid = threadIdx.x;

  const BlockInfo info(p, bidb);
  if (m_block * kBlockM >= info.seqlen_q) return;
  const int rows_left = info.seqlen_q - m_block * kBlockM;
  const Mask<kBlockM, kBlockN, kIsLocal> mask(info.seqlen_q, info.seqlen_k, p.window_left,
                                              p.window_right);
  int n_block_min = mask.n_block_min(m_block);
  int n_block_max = mask.n_block_max(m_block);
  const bool segs = kHasSegs && p.seg_q != nullptr;
  // Segment ids: only the K/V tiles the rows' intervals reach; of those, the
  // ones inside every row's interval (when the intervals decide alone) run
  // unmasked.
  int seg_full_lo = 0, seg_full_hi = -1;  // keys every row of the tile sees
  if (segs) {
    const SegmentRange range = segment_key_range<Traits::kNThreads>(
        p, bidb, m_block * kBlockM, min(rows_left, kBlockM));
    if (range.lo > range.hi) {
      n_block_max = n_block_min;
    } else {
      n_block_min = max(n_block_min, range.lo / kBlockN);
      n_block_max = min(n_block_max, range.hi / kBlockN + 1);
    }
    if (info.seqlen_k > 0 && p.seg_k[int64_t(bidb) * p.seqlen_k].w != 0) {
      seg_full_lo = range.max_lo;
      seg_full_hi = range.min_hi;
    }
  }
  auto needs_mask = [&](int n) {
    return mask.tile_needs_mask(m_block, n) ||
           (kHasSegs && segs && (n * kBlockN < seg_full_lo || n * kBlockN + kBlockN - 1 > seg_full_hi));
  };
  const ScoreMods mods(p, bidb, bidh, info.seqlen_q, info.seqlen_k);
  const Dropout dropout(p, bidb, bidh);

  // ---- Global tiles ----------------------------------------------------------
  const int bidh_k = bidh / p.h_per_hk;
  Tensor mQ = make_tensor(
      make_gmem_ptr(static_cast<const Element*>(p.q_ptr) +
                    info.q_offset(p.q_batch_stride, p.q_row_stride, bidb) + bidh * p.q_head_stride),
      make_shape(info.seqlen_q, Int<kHeadDim>{}), make_stride(p.q_row_stride, _1{}));
  const Element* k_base = static_cast<const Element*>(p.k_ptr) +
                         info.k_offset(p.k_batch_stride, p.k_row_stride, bidb) +
                         bidh_k * p.k_head_stride;
  const Element* v_base = static_cast<const Element*>(p.v_ptr) +
                         info.k_offset(p.v_batch_stride, p.v_row_stride, bidb) +
                         bidh_k * p.v_head_stride;
  Tensor mO = make_tensor(
      make_gmem_ptr(static_cast<Element*>(p.o_ptr) +
                    info.q_offset(p.o_batch_stride, p.o_row_stride, bidb) + bidh * p.o_head_stride),
      make_shape(info.seqlen_q, Int<kHeadDim>{}), make_stride(p.o_row_stride, _1{}));
  Tensor gQ = local_tile(mQ, TileQ{}, make_coord(m_block, 0));   // (M, D)
  // K/V tile n: a 64-bit tile base plus 32-bit offsets inside the tile (the
  // handler bounds row strides), which keeps fewer address registers live in
  // the main loop: +6-8% at d=128 (notes/kernel_experiments.md).
  auto kv_tile = [&](const Element* base, int64_t row_stride, int n) {
    return make_tensor(make_gmem_ptr(base + int64_t(n) * kBlockN * row_stride),
                       make_layout(TileKV{}, make_stride(int(row_stride), _1{})));  // (N, D)
  };
  Tensor gO = local_tile(mO, TileQ{}, make_coord(m_block, 0));   // (M, D)
  float* gLSE = p.lse_ptr + info.stats_offset(p, bidb, bidh) + m_block * kBlockM;

  if (n_block_max <= n_block_min) {
    write_empty_rows<Traits>(p, gO, gLSE, rows_left);
    return;
  }

  // ---- Shared tiles ----------------------------------------------------------
  extern __shared__ char smem[];
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)),
                          typename Traits::SmemLayoutQ{});                      // (M, D)
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{}); // (N, D)
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{}); // (N, D)
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});          // (D, N)

  // ---- Partition: global -> shared ----------------------------------------
  typename Traits::GmemTiledCopyQKV gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr.partition_S(gQ);  // (CPY, CPY_M, CPY_D)
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVsV = gmem_thr.partition_D(sV);
  // Tile-local coordinates of each copied chunk, for the row/column predicates.
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(TileQ{}));    // (CPY, CPY_M, CPY_D)
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(TileKV{})); // (CPY, CPY_N, CPY_D)
  // Head-dim chunks beyond the actual head dim are zero-filled, never read.
  Tensor tDok = make_tensor<bool>(make_shape(size<2>(tQsQ)));  // (CPY_D)
  CUTE_UNROLL
  for (int k = 0; k < size(tDok); ++k) tDok(k) = get<1>(tQcQ(0, 0, k)) < p.head_dim;
  const bool all_cols = p.head_dim == kHeadDim;

  // ---- Partition: shared -> registers -> tensor cores ------------------------
  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);  // (MMA, MMA_M, MMA_D)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);  // (MMA, MMA_N, MMA_D)
  Tensor tOrVt = thr_mma.partition_fragment_B(
      make_tensor(sV.data(), make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{})));  // (MMA, MMA_D, MMA_N)
  Tensor acc_o = partition_fragment_C(tiled_mma, TileQ{});  // (MMA, MMA_M, MMA_D)

  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_q = smem_copy_q.get_thread_slice(tid);
  Tensor tSsQ = smem_thr_q.partition_S(sQ);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_k = smem_copy_k.get_thread_slice(tid);
  Tensor tSsK = smem_thr_k.partition_S(sK);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto smem_thr_v = smem_copy_v.get_thread_slice(tid);
  Tensor tOsVt = smem_thr_v.partition_S(sVt);

  // (row, col) of every S accumulator entry, tile-local, for masking.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));  // (rows, cols)
  constexpr int kRowsS = decltype(size<0>(tScS_rc))::value;
  SegmentRows<kHasSegs ? kRowsS : 1> seg_rows;
  if constexpr (kHasSegs) {
    if (segs) seg_rows.load(p, bidb, m_block * kBlockM, rows_left, tScS_rc);
  }

  // ---- Prologue: Q and the last K tile in flight ------------------------------
  int n_block = n_block_max - 1;
  copy_tile(gmem_copy, tQgQ, tQsQ, tQcQ, tDok, rows_left);
  copy_tile(gmem_copy, gmem_thr.partition_S(kv_tile(k_base, p.k_row_stride, n_block)), tKsK, tKVcKV, tDok,
            info.seqlen_k - n_block * kBlockN);
  cp_async_fence();

  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));  // (rows, D cols)
  constexpr int kRows = decltype(size<0>(acc_o_rc))::value;
  OnlineSoftmax<kRows> softmax;

  // ---- Main loop over K/V tiles, last to first ------------------------------
  // One step of the loop. kFirst: no earlier statistics to rescale. kMasked:
  // the tile has entries outside the sequence or the window, so its loads are
  // row-predicated and its scores masked; the steady-state steps carry
  // neither, which keeps the hot loop short and its register pressure low.
  auto step = [&](auto first, auto masked) __attribute__((always_inline)) {
    constexpr bool kFirst = decltype(first)::value;
    constexpr bool kMasked = decltype(masked)::value;
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K_j landed; every thread is done reading V_{j+1}

    if constexpr (kMasked) {
      copy_tile(gmem_copy, gmem_thr.partition_S(kv_tile(v_base, p.v_row_stride, n_block)), tVsV, tKVcKV, tDok,
                info.seqlen_k - n_block * kBlockN);
    } else {
      copy_tile_cols(gmem_copy, gmem_thr.partition_S(kv_tile(v_base, p.v_row_stride, n_block)), tVsV, tDok, all_cols);
    }
    cp_async_fence();

    // S = Q K_j^T
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_copy_q, smem_copy_k, smem_thr_q,
            smem_thr_k);
    Tensor scores = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (rows, N cols)
    if constexpr (kFixedOffset) {
      mods.softcap(scores);  // softcap alone (fwd/launch.h)
    } else if constexpr (kHasMods) {
      mods.apply(scores, tScS_rc, m_block * kBlockM, n_block * kBlockN,
                 kHasSegs && segs ? seg_rows.shift : nullptr);
    }
    if constexpr (kMasked) {
      mask.apply(scores, tScS_rc, m_block, n_block);
      if constexpr (kHasSegs) {
        if (segs) seg_rows.template apply<kBlockN>(scores, tScS_rc, n_block * kBlockN, info.seqlen_k);
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V_j landed; every thread is done reading K_j
    if (n_block > n_block_min) {
      // Only the last tile can be partial: K_{j-1} is whole.
      copy_tile_cols(gmem_copy, gmem_thr.partition_S(kv_tile(k_base, p.k_row_stride, n_block - 1)), tKsK, tDok, all_cols);
      cp_async_fence();
    }

    if constexpr (kFixedOffset) {
      softmax.template update_fixed_offset<kFirst, kMasked>(scores, p.softmax_scale_log2);
    } else {
      softmax.template update<kFirst>(scores, acc_o_rc, p.softmax_scale_log2);
    }
    if constexpr (kHasDropout) {
      // Dropped entries leave P V but not the row sums: the LSE and the
      // normalisation are those of the full softmax. One warp spans the
      // tile's columns, so fragment atoms n, n + 1 form one 16-column block.
      if (dropout.on()) dropout.template apply<2>(acc_s, tScS, m_block * kBlockM, n_block * kBlockN, 1.f);
    }

    // O += P V_j, P converted to the input dtype and reused in place as the A
    // operand.
    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_as_operand_a(rP.layout()));  // (MMA, MMA_M, MMA_N/2)
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, smem_copy_v, smem_thr_v);
  };

  // Tiles needing a mask sit at the two ends of [n_block_min, n_block_max):
  // the right edge (seqlen_k, causal diagonal) and the left window edge (or
  // the segment's first key).
  step(true_type{}, true_type{});
  for (--n_block; n_block >= n_block_min && needs_mask(n_block); --n_block) {
    step(false_type{}, true_type{});
  }
  CUTE_NO_UNROLL
  for (; n_block >= n_block_min && !needs_mask(n_block); --n_block) {
    step(false_type{}, false_type{});
  }
  for (; n_block >= n_block_min; --n_block) step(false_type{}, true_type{});

  // ---- Epilogue: O /= l, LSE, store -------------------------------------------
  float lse[kRows];
  const float out_scale = kHasDropout && dropout.on() ? p.dropout_rescale : 1.f;
  softmax.finalize(acc_o_rc, p.softmax_lse_scale, out_scale, lse);

  // Registers -> shared (reusing Q's buffer: every thread passed the barrier
  // after its last read of sQ) -> coalesced 16 B global stores.
  Tensor rO = convert_fragment<Element>(acc_o);
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutO{});  // (M, D)
  auto smem_copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto smem_thr_o = smem_copy_o.get_thread_slice(tid);
  copy(smem_copy_o, smem_thr_o.retile_S(rO), smem_thr_o.partition_D(sO));

  // LSE: lane 0 of each quad holds column 0 of its rows.
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(TileQ{}));
  Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));  // (rows, D cols)
  if (get<1>(tOcO_rc(0, 0)) == 0) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int row = get<0>(tOcO_rc(r, 0));
      if (row < rows_left) gLSE[row] = lse[r];
    }
  }

  __syncthreads();
  typename Traits::GmemTiledCopyO gmem_copy_o;
  auto gmem_thr_o = gmem_copy_o.get_thread_slice(tid);
  Tensor tOsO = gmem_thr_o.partition_S(sO);  // (CPY, CPY_M, CPY_D)
  Tensor tOgO = gmem_thr_o.partition_D(gO);
  Tensor tOrO = make_tensor<Element>(shape(tOgO));
  copy(gmem_copy_o, tOsO, tOrO);
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tOgO); ++m) {
    if (get<0>(tQcQ(0, m, 0)) < rows_left) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tOgO); ++k) {
        if (tDok(k)) copy(gmem_copy_o, tOrO(_, m, k), tOgO(_, m, k));
      }
    }
  }
}

// Grid: (Q tiles, nheads, batch), offset by params.grid_head0/grid_batch0.
// Local/causal grids run the Q tiles with the most K/V work first, which
// evens out the tail of the launch.
template <typename Traits, bool kIsLocal, bool kHasMods, bool kHasDropout, bool kHasSegs,
          bool kFixedOffset>
__global__ void __launch_bounds__(Traits::kNThreads)
    attn_fwd_kernel(const __grid_constant__ AttnParams params) {
  const int m_block = kIsLocal || kHasSegs ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  attn_fwd_tile<Traits, kIsLocal, kHasMods, kHasDropout, kHasSegs, kFixedOffset>(
      params, m_block, params.grid_batch0 + blockIdx.z, params.grid_head0 + blockIdx.y);
}

}  // namespace jax_flash::fwd
