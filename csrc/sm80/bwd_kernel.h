// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// FlashAttention-2 backward. Three launches:
//   1. preprocess: D = rowsum(dO * O) per query row (float32), and the
//      zeroed dQ accumulator,
//   2. main: one thread block per (K/V tile, K/V head, batch); for every query
//      head of the K/V head's group and every Q tile that sees the K/V tile:
//        S  = Q K^T                 P  = exp(S * scale - LSE)   (recomputed)
//        dP = dO V^T                dS = P * (dP - D)
//        dV += P^T dO               dK += dS^T Q                (registers)
//        dQ_accum += dS K           (float32 atomic adds)
//      and writes dK * scale, dV once at the end,
//   3. convert: dQ = scale * sum over splits of dQ_accum, in the input dtype.
// Deterministic mode fixes the order of every dQ addition, in one of two ways
// (the host plan picks: csrc/host/plan.cc):
//  - slices: fewer blocks than K/V tiles; block x handles tiles x,
//    x + gridDim.x, ... and adds into its own slice ("split") of the
//    accumulator, so every accumulator element has exactly one writing
//    thread and its additions happen in program order; the convert kernel
//    then sums the splits in a fixed order. Any kernel variant.
//  - ordered: one accumulator; K/V tile n adds into a dQ tile only after
//    tiles 0 .. n-1 did, counted by a per-dQ-tile counter (release/acquire).
//    Only the plain kernel (kOrderable: no window, so every K/V tile sees
//    every Q tile, and no modifiers or segment ids). A slice revisits each of
//    its dQ tiles once per sweep over Q, so with many slices their
//    read-modify-writes miss L2; the ordered blocks of a head add into the
//    same dQ tile one step apart, as the atomics path does.
// The accumulator is
// (batch, splits, nheads, seqlen_q_rounded, kHeadDim) float32, its columns
// in BwdTraits::DqAccumCols order: whole tiles with compile-time strides, so
// the atomics need no predicates and each adds four floats at once.
// dS here is the gradient with respect to the scaled scores; the scale is
// applied once to dQ and dK instead of once per element of dS.
#pragma once

#include <cute/tensor.hpp>

#include "../common/block_info.h"
#include "../common/cute_utils.h"
#include "../common/mask.h"
#include "../common/params.h"
#include "../common/score_mods.h"
#include "../common/segments.h"
#include "../common/variants.h"
#include "api.h"
#include "bwd_traits.h"

namespace jax_flash::bwd {

using namespace cute;

// ---- 1. D = rowsum(dO * O) ----------------------------------------------------
// kLanesPerRow lanes per (batch, head, row) of lse's layout: (batch, nheads,
// seqlen_q), or (nheads, total_q) for varlen (every row of the buffer; rows no
// sequence covers get a D that nothing reads). Each lane reads 16 B of O and
// of dO at a time (head_dim is a multiple of 8, every row 16 B aligned).
constexpr int kSoftmaxDLanesPerRow = 8;

// Dot product of 8 packed 16-bit floats of a and b, in float32.
template <typename Element>
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
  const Element* x = reinterpret_cast<const Element*>(&a);
  const Element* y = reinterpret_cast<const Element*>(&b);
  float sum = 0.f;
  CUTE_UNROLL
  for (int e = 0; e < 8; ++e) sum += float(x[e]) * float(y[e]);
  return sum;
}

// The same launch zeroes the float32 dQ accumulator (accum_float4s 16-byte
// chunks) and the ordered mode's counters: one launch fewer than a memset,
// and its stores overlap the loads.
template <typename Element>
__global__ void softmax_d_kernel(const AttnBwdParams p, const int64_t accum_float4s) {
  float4* const accum = reinterpret_cast<float4*>(p.dq_accum_ptr);
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < accum_float4s; i += stride) {
    accum[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (p.dq_semaphore_ptr != nullptr) {
    for (int64_t i = first; i <= p.dq_semaphore_tiles; i += stride) p.dq_semaphore_ptr[i] = 0;
  }
  constexpr int kLanes = kSoftmaxDLanesPerRow;
  const int64_t row_index = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kLanes;
  const int lane = threadIdx.x % kLanes;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int rows_per_head = varlen ? p.total_q : p.seqlen_q;
  const int64_t rows = int64_t(varlen ? 1 : p.batch) * p.nheads * rows_per_head;
  // Every lane of a row group stays to the end: the shuffles below span it.
  const bool active = row_index < rows;
  const int64_t r = active ? row_index : 0;
  const int row = r % rows_per_head;
  const int bidh = (r / rows_per_head) % p.nheads;
  const int64_t bidb = r / (int64_t(rows_per_head) * p.nheads);
  const Element* o = static_cast<const Element*>(p.o_ptr) + bidb * p.o_batch_stride +
                     row * p.o_row_stride + bidh * p.o_head_stride;
  const Element* d_o = static_cast<const Element*>(p.do_ptr) + bidb * p.do_batch_stride +
                       row * p.do_row_stride + bidh * p.do_head_stride;
  float sum = 0.f;
  if (active) {
    for (int c = lane * 8; c < p.head_dim; c += kLanes * 8) {
      sum += dot8<Element>(*reinterpret_cast<const uint4*>(o + c),
                           *reinterpret_cast<const uint4*>(d_o + c));
    }
  }
  CUTE_UNROLL
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffff, sum, offset);
  }
  if (active && lane == 0) p.softmax_d_ptr[r] = sum;  // lse's layout, row-major
}

// ---- 3. dQ = scale * sum_s dQ_accum[s] -------------------------------------------
// Eight consecutive columns per thread (head_dim is a multiple of 8): four
// float2 reads per split (the pairs 8k + 2t + {0, 1} lie 4 floats apart in
// the accumulator's column order, BwdTraits::DqAccumCols), one 16 B store.
// Index math in Index (32-bit whenever the element count allows: 64-bit
// division is a long instruction sequence, and this kernel should be bound
// by memory). Varlen: every row of the buffer, 0 for rows no sequence covers.
template <typename Traits, typename Index>
__device__ __forceinline__ void convert_dq(const AttnBwdParams& p, Index total) {
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kBlockM = Traits::kBlockM;
  const Index chunks = p.head_dim / 8;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const Index rows_per_batch = varlen ? p.total_q : p.seqlen_q;
  const Index nheads = p.nheads;
  const int64_t split_stride = int64_t(p.nheads) * p.seqlen_q_rounded * kHeadDim;
  for (Index i = blockIdx.x * Index(blockDim.x) + threadIdx.x; i < total;
       i += Index(gridDim.x) * blockDim.x) {
    const int c = int(i % chunks) * 8;
    const Index r = i / chunks;  // (batch, row, head) flattened, as dq
    const int bidh = int(r % nheads);
    const Index row_batch = r / nheads;
    int64_t row = row_batch % rows_per_batch;
    const int64_t bidb = row_batch / rows_per_batch;
    Element* dq = static_cast<Element*>(p.dq_ptr) + bidb * p.dq_batch_stride +
                  row * p.dq_row_stride + bidh * p.dq_head_stride + c;
    const float* acc = p.dq_accum_ptr + bidb * p.dq_accum_splits * split_stride;
    if (varlen) {
      // Row -> (sequence, row inside it) -> its tile-aligned accumulator row.
      const int seq = sequence_of_row(p.cu_seqlens_q, p.batch, p.seqlen_q, p.total_q, int(row));
      if (seq < 0) {
        *reinterpret_cast<uint4*>(dq) = make_uint4(0, 0, 0, 0);  // +0.0 in fp16 and bf16
        continue;
      }
      const int start = SeqRows(p.cu_seqlens_q, seq, p.seqlen_q, p.total_q).start;
      row = (start + int64_t(seq) * kBlockM) / kBlockM * kBlockM + (row - start);
    }
    acc += (bidh * int64_t(p.seqlen_q_rounded) + row) * kHeadDim +
           int(typename Traits::DqAccumCols{}(c));
    float sum[8];
    CUTE_UNROLL
    for (int e = 0; e < 8; ++e) sum[e] = 0.f;
    for (int s = 0; s < p.dq_accum_splits; ++s) {
      CUTE_UNROLL
      for (int t = 0; t < 4; ++t) {
        const float2 pair = *reinterpret_cast<const float2*>(acc + s * split_stride + 4 * t);
        sum[2 * t] += pair.x;
        sum[2 * t + 1] += pair.y;
      }
    }
    uint4 packed;
    Element* out = reinterpret_cast<Element*>(&packed);
    CUTE_UNROLL
    for (int e = 0; e < 8; ++e) out[e] = Element(sum[e] * p.softmax_scale);
    *reinterpret_cast<uint4*>(dq) = packed;
  }
}

template <typename Traits>
__global__ void convert_dq_kernel(const AttnBwdParams p) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t total = int64_t(varlen ? 1 : p.batch) * (varlen ? p.total_q : p.seqlen_q) *
                        p.nheads * (p.head_dim / 8);
  if (total < (int64_t{1} << 31)) {
    convert_dq<Traits, uint32_t>(p, uint32_t(total));
  } else {
    convert_dq<Traits, int64_t>(p, total);
  }
}

// ---- 2. Main kernel -----------------------------------------------------------
// P and dS of one tile with softcap, ALiBi and dropout. On entry scores = S
// (raw q.k) and dp = dO V^T; on return scores = P with dropped entries zeroed
// (dV's operand; 1 / (1 - p) is applied to dV once at the end) and dp = dS,
// the gradient with respect to the raw q.k divided by softmax_scale:
//   dS = P * (keep * dp / (1 - p) - D) * (1 - x^2)   with x = tanh(s * scale / softcap),
// the last factor only with softcap (d(softcap * x) / ds = scale * (1 - x^2)).
// acc_*: MMA fragments, *_rc: their (rows, cols) views; tScS, tScS_rc: the
// tile-local coordinates in both shapes.
template <bool kHasDropout, typename TR, typename TA, typename TC, typename TCrc, typename MaskT,
          int kRows, typename SegRows>
__device__ __forceinline__ void scores_with_mods(
    TR& scores, TR& dp, TA& acc_s, TA& acc_dp, TC const& tScS, TCrc const& tScS_rc, int m_block,
    int n_block, MaskT const& mask, ScoreMods const& mods, Dropout const& dropout,
    const float (&lse_log2)[kRows], const float (&d_row)[kRows], float scale_log2,
    float dropout_rescale, const SegRows* seg_rows) {
  constexpr int kBlockM = MaskT::kBlockM, kBlockN = MaskT::kBlockN;
  const int row0 = m_block * kBlockM, col0 = n_block * kBlockN;
  // Which entries survive dropout, one bit per fragment entry; dp of the
  // dropped ones is 0, of the kept ones dp / (1 - p). Warps share the tile's
  // columns, so each RNG call serves one 8-column atom.
  constexpr int kM = decltype(size<1>(acc_s))::value;
  static_assert(decltype(size(acc_s))::value <= 64, "one bit per fragment entry");
  uint64_t kept = ~uint64_t(0);
  if (kHasDropout && dropout.on()) kept = dropout.template apply<1>(acc_dp, tScS, row0, col0, dropout_rescale);
  // dp - D, times the softcap derivative (computed before ALiBi and the mask
  // change the scores).
  if (mods.softcap_premul != 0.f) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const float x = ScoreMods::tanh_approx(scores(r, c) * mods.softcap_premul);
        scores(r, c) = x;
        dp(r, c) = (dp(r, c) - d_row[r]) * (1.f - x * x);
      }
    }
  } else {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) dp(r, c) -= d_row[r];
    }
  }
  if (mods.alibi_slope != 0.f) {
    mods.alibi(scores, tScS_rc, row0, col0, seg_rows != nullptr ? seg_rows->shift : nullptr);
  }
  if (mask.tile_needs_mask(m_block, n_block)) mask.apply(scores, tScS_rc, m_block, n_block);
  if (seg_rows != nullptr) seg_rows->template apply<kBlockN>(scores, tScS_rc, col0, mask.seqlen_k);
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(scores); ++c) {
      const float prob = exp2f(scores(r, c) * scale_log2 - lse_log2[r]);
      scores(r, c) = prob;
      dp(r, c) *= prob;
    }
  }
  if (kHasDropout && dropout.on()) {
    CUTE_UNROLL
    for (int n = 0; n < size<2>(acc_s); ++n) {
      CUTE_UNROLL
      for (int m = 0; m < kM; ++m) {
        CUTE_UNROLL
        for (int e = 0; e < 4; ++e) {
          if (!((kept >> (e + 4 * (m + kM * n))) & 1)) acc_s(e, m, n) = 0.f;
        }
      }
    }
  }
}

// dst += src with float32 atomics; dst (MMA, MMA_M, MMA_D) is a dQ fragment
// over the accumulator's column order (BwdTraits::DqAccumCols), where the
// column pairs (0, 1) of repeats 2g and 2g + 1 along D are four consecutive
// floats: sm_90 adds them with one 16-byte vector atomic, a quarter of the
// scalar atomic instructions (they throttled the load/store pipe,
// notes/kernel_experiments.md).
template <typename TD, typename TS>
__device__ __forceinline__ void add_to_global(TD& dst, TS const& src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using L = decltype(dst.layout());
  static_assert(decltype(size<0, 0>(L{}))::value == 2 && decltype(size<2>(L{}))::value % 2 == 0);
  static_assert(decltype(L{}(_1{}, _0{}, _0{}))::value - decltype(L{}(_0{}, _0{}, _0{}))::value == 1 &&
                    decltype(L{}(_0{}, _0{}, _1{}))::value - decltype(L{}(_0{}, _0{}, _0{}))::value == 2,
                "pairs of repeats along D are adjacent");
  CUTE_UNROLL
  for (int n = 0; n < size<2>(src); n += 2) {
    CUTE_UNROLL
    for (int m = 0; m < size<1>(src); ++m) {
      CUTE_UNROLL
      for (int r = 0; r < size<0, 1>(src); ++r) {
        // red, not atomicAdd: ptxas keeps atomicAdd(float4*) as a value-returning
        // ATOMG in the ordered mode's kernel.
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};"
                     :
                     : "l"(&dst(make_coord(0, r), m, n)), "f"(src(make_coord(0, r), m, n)),
                       "f"(src(make_coord(1, r), m, n)), "f"(src(make_coord(0, r), m, n + 1)),
                       "f"(src(make_coord(1, r), m, n + 1)));
      }
    }
  }
#else
  CUTE_UNROLL
  for (int i = 0; i < size(src); ++i) atomicAdd(&dst(i), src(i));
#endif
}

// Ordered mode's counters (csrc/params.h dq_semaphore). The adds of a K/V
// tile to a dQ tile happen-before the counter's increment (every thread's adds
// precede a block barrier, then thread 0 fences and increments), and a warp's
// adds happen-after the acquire load by its lane 0 that saw the count it waits
// for. (Fencing in every warp and counting warps measured 4-7% slower at
// seqlen 8192-16384, notes/kernel_experiments.md entry 27.)
__device__ __forceinline__ void wait_for_count(const int* counter, int count) {
  if (threadIdx.x % 32 == 0) {
    int seen;
    do {
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < count);
  }
  __syncwarp();
}

__device__ __forceinline__ void release_increment(int* counter) {
  asm volatile("fence.acq_rel.gpu;\n\tred.relaxed.gpu.global.add.s32 [%0], 1;"
               :
               : "l"(counter)
               : "memory");
}

// kHasMods: softcap and ALiBi, kHasDropout: dropout too (score_mods.h),
// kHasSegs: segment ids (segments.h), each switched on at run time. Not
// __forceinline__: ptxas inlines the one call anyway, and forcing it cost the
// plain kernel 20-52 B of spills (notes/kernel_experiments.md, entry 20).
template <typename Traits, bool kIsLocal, bool kHasMods, bool kHasDropout, bool kHasSegs>
__device__ void attn_bwd_tile(const AttnBwdParams& p, const int n_block, const int bidb,
                              const int bidh_k, const int split) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;
  const int tid = threadIdx.x;

  const BlockInfo info(p, bidb);
  if (n_block * kBlockN >= info.seqlen_k) return;
  const int keys_left = info.seqlen_k - n_block * kBlockN;
  const Mask<kBlockM, kBlockN, kIsLocal> mask(info.seqlen_q, info.seqlen_k, p.window_left,
                                              p.window_right);
  int m_block_min = mask.m_block_min(n_block);
  int m_block_max = mask.m_block_max(n_block);
  const bool segs = kHasSegs && p.seg_q != nullptr;
  if (segs) {
    // Only the Q tiles holding a row that sees one of this tile's keys.
    const SegmentRange range = segment_row_range<Traits::kNThreads>(
        p, bidb, n_block * kBlockN, min(keys_left, kBlockN));
    if (range.lo > range.hi) {
      m_block_max = m_block_min;
    } else {
      m_block_min = max(m_block_min, range.lo / kBlockM);
      m_block_max = min(m_block_max, range.hi / kBlockM + 1);
    }
  }

  // ---- Global tiles ------------------------------------------------------------
  // A 64-bit tile base plus 32-bit offsets inside the tile (the handler bounds
  // the row strides), as in the forward kernel: fewer live address registers.
  auto tile = [](auto* base, int64_t row_stride, auto tile_shape) {
    return make_tensor(make_gmem_ptr(base),
                       make_layout(tile_shape, make_stride(int(row_stride), _1{})));
  };
  const int64_t k_off = info.k_offset(p.k_batch_stride, p.k_row_stride, bidb) +
                        int64_t(n_block) * kBlockN * p.k_row_stride + bidh_k * p.k_head_stride;
  const int64_t v_off = info.k_offset(p.v_batch_stride, p.v_row_stride, bidb) +
                        int64_t(n_block) * kBlockN * p.v_row_stride + bidh_k * p.v_head_stride;
  Tensor gK = tile(static_cast<const Element*>(p.k_ptr) + k_off, p.k_row_stride, TileKV{});  // (N, D)
  Tensor gV = tile(static_cast<const Element*>(p.v_ptr) + v_off, p.v_row_stride, TileKV{});  // (N, D)
  // Q / dO tile m of query head h_first + dh.
  const int h_first = bidh_k * p.h_per_hk;
  const Element* q_base = static_cast<const Element*>(p.q_ptr) +
                          info.q_offset(p.q_batch_stride, p.q_row_stride, bidb) +
                          int64_t(h_first) * p.q_head_stride;
  const Element* do_base = static_cast<const Element*>(p.do_ptr) +
                           info.q_offset(p.do_batch_stride, p.do_row_stride, bidb) +
                           int64_t(h_first) * p.do_head_stride;
  auto q_tile = [&](int dh, int m) {
    return tile(q_base + dh * p.q_head_stride + int64_t(m) * kBlockM * p.q_row_stride,
                p.q_row_stride, TileQ{});
  };
  auto do_tile = [&](int dh, int m) {
    return tile(do_base + dh * p.do_head_stride + int64_t(m) * kBlockM * p.do_row_stride,
                p.do_row_stride, TileQ{});
  };

  // dQ accumulator tile m of query head h: static strides, so every atomic
  // address is the thread's base plus an immediate.
  const bool varlen_q = p.cu_seqlens_q != nullptr;
  float* const dq_accum_split =
      p.dq_accum_ptr +
      (int64_t(varlen_q ? 0 : bidb) * p.dq_accum_splits + split) * p.nheads *
          int64_t(p.seqlen_q_rounded) * kHeadDim +
      info.template dq_accum_row<kBlockM>(bidb) * kHeadDim;
  auto dq_accum_tile = [&](int h, int m) {
    return make_tensor(
        make_gmem_ptr(dq_accum_split + (int64_t(h) * p.seqlen_q_rounded + m * kBlockM) * kHeadDim),
        make_layout(make_layout(Int<kBlockM>{}, Int<kHeadDim>{}), typename Traits::DqAccumCols{}));
  };
  // Ordered deterministic mode (top of file): the counter of dQ tile (h, m).
  // Every K/V tile sees every Q tile, so n_block tiles add to each before this one.
  const bool ordered = kOrderable<kIsLocal, kHasMods, kHasDropout, kHasSegs> &&
                       p.dq_semaphore_ptr != nullptr;
  auto dq_tile_counter = [&](int h, int m) {
    return p.dq_semaphore_ptr + (dq_accum_split - p.dq_accum_ptr) / (kBlockM * kHeadDim) +
           int64_t(h) * (p.seqlen_q_rounded / kBlockM) + m;
  };

  // ---- Shared tiles ------------------------------------------------------------
  extern __shared__ char smem[];
  Element* smem_q = reinterpret_cast<Element*>(smem);               // 2 stages
  Element* smem_do = smem_q + 2 * Traits::kSmemQdOElems;            // 2 stages
  Element* smem_k = smem_do + 2 * Traits::kSmemQdOElems;
  Element* smem_v = smem_k + Traits::kSmemKVElems;
  Element* smem_p = smem_v + Traits::kSmemKVElems;
  Element* smem_ds = smem_p + Traits::kSmemPdSElems;
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKV{});    // (N, D)
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutKV{});    // (N, D)
  Tensor sKt = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKt{});   // (D, N)
  Tensor sP = make_tensor(make_smem_ptr(smem_p), typename Traits::SmemLayoutPdS{});   // (M, N)
  Tensor sdS = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutPdS{}); // (M, N)
  Tensor sPt = make_tensor(make_smem_ptr(smem_p), typename Traits::SmemLayoutPdSt{});  // (N, M)
  Tensor sdSt = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutPdSt{}); // (N, M)
  // Stage `stage` of the double-buffered Q or dO tile, as (M, D) or transposed.
  auto staged = [](Element* base, int stage, auto layout) {
    return make_tensor(make_smem_ptr(base + stage * Traits::kSmemQdOElems), layout);
  };
  auto sQ = [&](int stage) { return staged(smem_q, stage, typename Traits::SmemLayoutQdO{}); };
  auto sdO = [&](int stage) { return staged(smem_do, stage, typename Traits::SmemLayoutQdO{}); };
  auto sQt = [&](int stage) { return staged(smem_q, stage, typename Traits::SmemLayoutQdOt{}); };
  auto sdOt = [&](int stage) { return staged(smem_do, stage, typename Traits::SmemLayoutQdOt{}); };

  // ---- Global -> shared ----------------------------------------------------------
  typename Traits::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(TileQ{}));     // (CPY, CPY_M, CPY_D)
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(TileKV{}));  // (CPY, CPY_N, CPY_D)
  Tensor tDok = make_tensor<bool>(make_shape(size<2>(tQcQ)));            // (CPY_D)
  CUTE_UNROLL
  for (int k = 0; k < size(tDok); ++k) tDok(k) = get<1>(tQcQ(0, 0, k)) < p.head_dim;

  auto load_q_do = [&](int dh, int m, int stage) {
    const int rows = info.seqlen_q - m * kBlockM;
    copy_tile(gmem_copy, gmem_thr.partition_S(q_tile(dh, m)), gmem_thr.partition_D(sQ(stage)),
              tQcQ, tDok, rows);
    copy_tile(gmem_copy, gmem_thr.partition_S(do_tile(dh, m)), gmem_thr.partition_D(sdO(stage)),
              tQcQ, tDok, rows);
  };

  // ---- MMA partitions -------------------------------------------------------------
  typename Traits::TiledMmaSdP mma_sdp;
  typename Traits::TiledMmadKV mma_dkv;
  typename Traits::TiledMmadQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);

  auto copy_a_sdp = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_sdp);
  auto copy_b_sdp = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma_sdp);
  auto thr_copy_a_sdp = copy_a_sdp.get_thread_slice(tid);
  auto thr_copy_b_sdp = copy_b_sdp.get_thread_slice(tid);
  auto copy_a_dkv = make_tiled_copy_A(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
  auto copy_b_dkv = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
  auto thr_copy_a_dkv = copy_a_dkv.get_thread_slice(tid);
  auto thr_copy_b_dkv = copy_b_dkv.get_thread_slice(tid);
  auto copy_a_dq = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_dq);
  auto copy_b_dq = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dq);
  auto thr_copy_a_dq = copy_a_dq.get_thread_slice(tid);
  auto thr_copy_b_dq = copy_b_dq.get_thread_slice(tid);

  // Register fragments (shapes only depend on the tile shapes).
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ(0));    // (MMA, MMA_M, MMA_D)
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);       // (MMA, MMA_N, MMA_D)
  Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO(0)); // (MMA, MMA_M, MMA_D)
  Tensor tdPrV = thr_sdp.partition_fragment_B(sV);      // (MMA, MMA_N, MMA_D)
  Tensor tdKVrPt = thr_dkv.partition_fragment_A(
      make_tensor(smem_p, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{})));   // (MMA, MMA_N, MMA_M)
  Tensor tdKVrQdOt = thr_dkv.partition_fragment_B(
      make_tensor(smem_q, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{})));  // (MMA, MMA_D, MMA_M)
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);     // (MMA, MMA_M, MMA_N)
  Tensor tdQrKt = thr_dq.partition_fragment_B(
      make_tensor(smem_k, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{})));  // (MMA, MMA_D, MMA_N)

  Tensor acc_dk = partition_fragment_C(mma_dkv, TileKV{});  // (MMA, MMA_N, MMA_D)
  Tensor acc_dv = partition_fragment_C(mma_dkv, TileKV{});  // (MMA, MMA_N, MMA_D)
  clear(acc_dk);
  clear(acc_dv);

  // Tile-local (row, col) of the S/dP accumulators and of the dQ accumulator.
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(TileS{}));
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));  // (rows, cols)
  constexpr int kRowsS = decltype(size<0>(tScS_rc))::value;

  // Registers -> shared for P and dS.
  auto copy_c_sdp = make_tiled_copy_C(typename Traits::SmemCopyAtomC{}, mma_sdp);
  auto thr_copy_c_sdp = copy_c_sdp.get_thread_slice(tid);
  Tensor tPsP = thr_copy_c_sdp.partition_D(sP);
  Tensor tdSsdS = thr_copy_c_sdp.partition_D(sdS);

  // ---- Prologue: K, V and the first Q/dO tile in flight ----------------------------
  const int steps_per_head = m_block_max - m_block_min;
  const int num_steps = steps_per_head > 0 ? steps_per_head * p.h_per_hk : 0;
  copy_tile(gmem_copy, gmem_thr.partition_S(gK), gmem_thr.partition_D(sK), tKVcKV, tDok,
            keys_left);
  copy_tile(gmem_copy, gmem_thr.partition_S(gV), gmem_thr.partition_D(sV), tKVcKV, tDok,
            keys_left);
  if (num_steps > 0) load_q_do(0, m_block_min, 0);
  cp_async_fence();

  const float scale_log2 = p.softmax_scale_log2;
  constexpr float kLog2e = 1.4426950408889634f;

  // LSE and D rows of the group's first query head; head h_first + dh starts
  // dh * stats_head_stride rows later (block_info.h).
  const int64_t stats0 = info.stats_offset(p, bidb, h_first);
  const float* const lse_heads = p.lse_ptr + stats0;
  const float* const d_heads = p.softmax_d_ptr + stats0;
  const int stats_head_stride = int(info.stats_offset(p, bidb, h_first + 1) - stats0);

  int dh = 0, m_block = m_block_min;  // this step's query head (h_first + dh) and Q tile
  CUTE_NO_UNROLL
  for (int step = 0; step < num_steps; ++step) {
    const int h = h_first + dh;
    const int stage = step % 2;
    const int rows_left = info.seqlen_q - m_block * kBlockM;

    cp_async_wait<0>();
    __syncthreads();  // Q/dO of this step landed; the previous step is done with
                      // sP, sdS and the other Q/dO stage.
    int dh_next = dh, m_next = m_block + 1;
    if (m_next == m_block_max) {
      m_next = m_block_min;
      ++dh_next;
    }
    if (step + 1 < num_steps) load_q_do(dh_next, m_next, stage ^ 1);
    cp_async_fence();

    // This Q tile's LSE and D, loaded before the GEMMs so that their latency
    // hides behind them (read right before use, they were the kernel's main
    // stall: ncu "long scoreboard", notes/kernel_experiments.md). Rows past
    // seqlen_q read LSE = +inf, so their P (and dS) are 0 and they add nothing
    // to dK, dV.
    const int64_t row_stat0 = int64_t(dh) * stats_head_stride + m_block * kBlockM;
    float lse_log2[kRowsS], d_row[kRowsS];
    CUTE_UNROLL
    for (int r = 0; r < kRowsS; ++r) {
      const int row = get<0>(tScS_rc(r, 0));
      const bool valid = row < rows_left;
      // An empty row has LSE = +inf: exp2(-inf) = 0 for every entry.
      lse_log2[r] = valid ? lse_heads[row_stat0 + row] * kLog2e : INFINITY;
      d_row[r] = valid ? d_heads[row_stat0 + row] : 0.f;
    }

    // Softcap/ALiBi/dropout of this step's query head.
    const ScoreMods mods(p, bidb, h, info.seqlen_q, info.seqlen_k);
    // This step's rows' segment intervals (same for every head).
    SegmentRows<kHasSegs ? kRowsS : 1> seg_rows;
    if constexpr (kHasSegs) {
      if (segs) seg_rows.load(p, bidb, m_block * kBlockM, rows_left, tScS_rc);
    }
    const Dropout dropout(p, bidb, h);

    // S = Q K^T, dP = dO V^T
    Tensor acc_s = partition_fragment_C(mma_sdp, TileS{});   // (MMA, MMA_M, MMA_N)
    Tensor acc_dp = partition_fragment_C(mma_sdp, TileS{});  // (MMA, MMA_M, MMA_N)
    clear(acc_s);
    clear(acc_dp);
    gemm_ss(acc_s, tSrQ, tSrK, thr_copy_a_sdp.partition_S(sQ(stage)),
            thr_copy_b_sdp.partition_S(sK), mma_sdp, copy_a_sdp, copy_b_sdp, thr_copy_a_sdp,
            thr_copy_b_sdp);
    gemm_ss(acc_dp, tdPrdO, tdPrV, thr_copy_a_sdp.partition_S(sdO(stage)),
            thr_copy_b_sdp.partition_S(sV), mma_sdp, copy_a_sdp, copy_b_sdp, thr_copy_a_sdp,
            thr_copy_b_sdp);

    // P = exp(S * scale - LSE), dS = P * (dP - D).
    Tensor scores = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (rows, cols)
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));    // (rows, cols)
    if constexpr (kHasMods) {
      scores_with_mods<kHasDropout>(scores, dp, acc_s, acc_dp, tScS, tScS_rc, m_block, n_block, mask, mods,
                       dropout, lse_log2, d_row, scale_log2, p.dropout_rescale,
                       kHasSegs && segs ? &seg_rows : nullptr);
    } else {
      if (mask.tile_needs_mask(m_block, n_block)) mask.apply(scores, tScS_rc, m_block, n_block);
      if constexpr (kHasSegs) {
        if (segs) seg_rows.template apply<kBlockN>(scores, tScS_rc, n_block * kBlockN, info.seqlen_k);
      }
      CUTE_UNROLL
      for (int r = 0; r < kRowsS; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(scores); ++c) {
          const float prob = exp2f(scores(r, c) * scale_log2 - lse_log2[r]);
          scores(r, c) = prob;
          dp(r, c) = prob * (dp(r, c) - d_row[r]);
        }
      }
    }
    copy(copy_c_sdp, thr_copy_c_sdp.retile_S(convert_fragment<Element>(acc_s)), tPsP);
    copy(copy_c_sdp, thr_copy_c_sdp.retile_S(convert_fragment<Element>(acc_dp)), tdSsdS);
    __syncthreads();  // P and dS visible to every warp

    // dV += P^T dO, dK += dS^T Q
    gemm_ss(acc_dv, tdKVrPt, tdKVrQdOt, thr_copy_a_dkv.partition_S(sPt),
            thr_copy_b_dkv.partition_S(sdOt(stage)), mma_dkv, copy_a_dkv, copy_b_dkv,
            thr_copy_a_dkv, thr_copy_b_dkv);
    // dQ_accum += dS K
    Tensor acc_dq = partition_fragment_C(mma_dq, TileQ{});  // (MMA, MMA_M, MMA_D)
    clear(acc_dq);
    gemm_ss(acc_dq, tdQrdS, tdQrKt, thr_copy_a_dq.partition_S(sdS),
            thr_copy_b_dq.partition_S(sKt), mma_dq, copy_a_dq, copy_b_dq, thr_copy_a_dq,
            thr_copy_b_dq);

    // Rows past seqlen_q and padded columns add exact zeros into padding.
    Tensor tdQgdQ = thr_dq.partition_C(dq_accum_tile(h, m_block));  // (MMA, MMA_M, MMA_D)
    if (ordered) {
      if (step > 0 && tid == 0) {
        // Every warp's adds of the previous step preceded this step's first
        // barrier, most of a step ago: the fence is short. Pass that tile on.
        const bool wrapped = m_block == m_block_min;
        release_increment(dq_tile_counter(h - wrapped, wrapped ? m_block_max - 1 : m_block - 1));
      }
      wait_for_count(dq_tile_counter(h, m_block), n_block);
    }
    add_to_global(tdQgdQ, acc_dq);
    // dK after the dQ atomics (FlashAttention-2's order): its GEMM overlaps
    // their drain.
    gemm_ss(acc_dk, tdKVrPt, tdKVrQdOt, thr_copy_a_dkv.partition_S(sdSt),
            thr_copy_b_dkv.partition_S(sQt(stage)), mma_dkv, copy_a_dkv, copy_b_dkv,
            thr_copy_a_dkv, thr_copy_b_dkv);

    dh = dh_next;
    m_block = m_next;
  }

  // ---- Epilogue: dK * scale, dV -> shared -> global --------------------------------
  // Reuses the K and V buffers once every copy into them has landed and every
  // warp is past its last read of them. A K/V tile no query sees gets dK = dV = 0.
  cp_async_wait<0>();
  __syncthreads();
  if (ordered && num_steps > 0 && tid == 0) {
    release_increment(dq_tile_counter(h_first + p.h_per_hk - 1, m_block_max - 1));
  }
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= p.softmax_scale;
  if (kHasDropout && p.rng_ptr != nullptr) {
    // P went into dV with dropped entries zeroed but not yet rescaled.
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dv); ++i) acc_dv(i) *= p.dropout_rescale;
  }
  auto copy_c_dkv = make_tiled_copy_C(typename Traits::SmemCopyAtomC{}, mma_dkv);
  auto thr_copy_c_dkv = copy_c_dkv.get_thread_slice(tid);
  copy(copy_c_dkv, thr_copy_c_dkv.retile_S(convert_fragment<Element>(acc_dk)),
       thr_copy_c_dkv.partition_D(sK));
  copy(copy_c_dkv, thr_copy_c_dkv.retile_S(convert_fragment<Element>(acc_dv)),
       thr_copy_c_dkv.partition_D(sV));
  __syncthreads();

  const int64_t dk_off = info.k_offset(p.dk_batch_stride, p.dk_row_stride, bidb) +
                         int64_t(n_block) * kBlockN * p.dk_row_stride + bidh_k * p.dk_head_stride;
  const int64_t dv_off = info.k_offset(p.dv_batch_stride, p.dv_row_stride, bidb) +
                         int64_t(n_block) * kBlockN * p.dv_row_stride + bidh_k * p.dv_head_stride;
  typename Traits::GmemTiledCopyOut gmem_copy_out;
  auto gmem_thr_out = gmem_copy_out.get_thread_slice(tid);
  auto store = [&](auto const& s_src, Element* dst, int64_t row_stride) {
    Tensor tS = gmem_thr_out.partition_S(s_src);  // (CPY, CPY_N, CPY_D)
    Tensor tG = gmem_thr_out.partition_D(tile(dst, row_stride, TileKV{}));
    Tensor tR = make_tensor<Element>(shape(tG));
    copy(gmem_copy_out, tS, tR);
    CUTE_UNROLL
    for (int m = 0; m < size<1>(tG); ++m) {
      if (get<0>(tKVcKV(0, m, 0)) < keys_left) {
        CUTE_UNROLL
        for (int k = 0; k < size<2>(tG); ++k) {
          if (tDok(k)) copy(gmem_copy_out, tR(_, m, k), tG(_, m, k));
        }
      }
    }
  };
  store(sK, static_cast<Element*>(p.dk_ptr) + dk_off, p.dk_row_stride);
  store(sV, static_cast<Element*>(p.dv_ptr) + dv_off, p.dv_row_stride);
}

// Grid: (K/V tiles, or accumulator splits with slices; nheads_k; batch), offset
// by params.grid_head0/grid_batch0 (both 0 in ordered mode: one grid).
template <typename Traits, bool kIsLocal, bool kHasMods, bool kHasDropout, bool kHasSegs>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    attn_bwd_kernel(const __grid_constant__ AttnBwdParams params) {
  const int num_n_blocks = (params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  int split = params.deterministic ? blockIdx.x : 0;
  int n_first = blockIdx.x, n_stride = gridDim.x;
  int bidb = params.grid_batch0 + blockIdx.z, bidh_k = params.grid_head0 + blockIdx.y;
  if (kOrderable<kIsLocal, kHasMods, kHasDropout, kHasSegs> && params.dq_semaphore_ptr != nullptr) {
    // Ordered mode: a block's (K/V tile, head, batch) is the ticket it draws
    // when it starts, K/V tile slowest. The tiles a block waits for then
    // belong to blocks that started before it, whatever order the hardware
    // launches blocks in: no deadlock. Heads fastest: the blocks running at
    // once span few K/V tiles of any one head, so its chain is short.
    __shared__ int ticket;
    if (threadIdx.x == 0) {
      ticket = atomicAdd(params.dq_semaphore_ptr + params.dq_semaphore_tiles, 1);
    }
    __syncthreads();
    const int rest = ticket % (gridDim.y * gridDim.z);
    n_first = ticket / (gridDim.y * gridDim.z);
    n_stride = num_n_blocks;  // one tile
    split = 0;
    bidb = rest / gridDim.y;
    bidh_k = rest % gridDim.y;
  }
  for (int n_block = n_first; n_block < num_n_blocks; n_block += n_stride) {
    attn_bwd_tile<Traits, kIsLocal, kHasMods, kHasDropout, kHasSegs>(params, n_block, bidb,
                                                                     bidh_k, split);
    __syncthreads();  // the next tile reuses the shared memory
  }
}

}  // namespace jax_flash::bwd
