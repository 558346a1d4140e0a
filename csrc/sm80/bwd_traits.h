// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Tile shapes, shared-memory layouts and copy/MMA atoms of the backward
// kernel for one (element type, head dim).
//
// A thread block owns one K/V tile (kBlockN keys) and walks the Q tiles
// (kBlockM queries) that see it. Five GEMMs per step, each with its own warp
// arrangement because their output shapes differ:
//   S  = Q K^T,  dP = dO V^T        (M x N)   TiledMmaSdP
//   dV += P^T dO, dK += dS^T Q      (N x D)   TiledMmadKV, accumulated in registers
//   dQ  = dS K                       (M x D)   TiledMmadQ, added to a float32 buffer
// P and dS go through shared memory, where the transposed reads of the dV/dK
// GEMMs find them.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace jax_flash::bwd {

using namespace cute;

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_,
          int kSdPWarpsM, int kdKVWarpsN, int kdQWarpsM>
struct BwdTraits {
  using Element = Element_;
  using ElementAccum = float;

  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;

  static_assert(kHeadDim % 32 == 0);
  static_assert(kBlockN % 64 == 0, "P/dS rows use the 64-wide swizzle atom");
  static_assert(kNWarps % kSdPWarpsM == 0 && kNWarps % kdKVWarpsN == 0 &&
                kNWarps % kdQWarpsM == 0);

  // ---- MMAs ------------------------------------------------------------------
  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  template <int kWarpsM>
  using WarpTiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kWarpsM>, Int<kNWarps / kWarpsM>, _1>>,
                                Tile<Int<16 * kWarpsM>, Int<16 * (kNWarps / kWarpsM)>, _16>>;
  using TiledMmaSdP = WarpTiledMma<kSdPWarpsM>;  // (M, N) += (M, D) x (N, D)
  using TiledMmadKV = WarpTiledMma<kdKVWarpsN>;  // (N, D) += (N, M) x (D, M)
  using TiledMmadQ = WarpTiledMma<kdQWarpsM>;    // (M, D)  = (M, N) x (D, N)

  // Column order of the float32 dQ accumulator. In one row, a thread's dQ
  // fragment holds the column pairs 8 * (kdQWarpsN * h + w) + 2t + {0, 1}
  // (warp w of kdQWarpsN along D, quad lane t, repeat h along D). The pairs
  // of repeats 2g and 2g + 1 are stored next to each other, so the thread's
  // four columns are one 16-byte vector atomic on sm_90 (bwd/kernel.h,
  // add_to_global, checks this at compile time). With h = h0 + 2 h1:
  //   column b + 2t + 8w + 8 kdQWarpsN h0 + 16 kdQWarpsN h1
  //   is stored at b + 4t + 16w + 2 h0 + 16 kdQWarpsN h1.
  static constexpr int kdQWarpsN = kNWarps / kdQWarpsM;
  static_assert(kHeadDim % (16 * kdQWarpsN) == 0, "an even number of dQ repeats along D");
  using DqAccumCols =
      Layout<Shape<_2, _4, Int<kdQWarpsN>, _2, Int<kHeadDim / (16 * kdQWarpsN)>>,
             Stride<_1, _4, _16, _2, Int<16 * kdQWarpsN>>>;

  // ---- Shared memory -----------------------------------------------------------
  static constexpr int kSmemRowK = kHeadDim % 64 == 0 ? 64 : 32;
  using SmemLayoutAtomD = decltype(composition(
      Swizzle<kSmemRowK == 64 ? 3 : 2, 3, 3>{},
      Layout<Shape<_8, Int<kSmemRowK>>, Stride<Int<kSmemRowK>, _1>>{}));
  using SmemLayoutAtomN = decltype(composition(
      Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));

  using SmemLayoutQdO = decltype(tile_to_shape(SmemLayoutAtomD{},
                                               Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // (M, D)
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtomD{},
                                              Shape<Int<kBlockN>, Int<kHeadDim>>{}));   // (N, D)
  using SmemLayoutPdS = decltype(tile_to_shape(SmemLayoutAtomN{},
                                               Shape<Int<kBlockM>, Int<kBlockN>>{}));   // (M, N)
  // Transposed views of the same bytes, for B operands read along the other
  // dimension (and P^T / dS^T as A operands).
  using SmemLayoutQdOt = decltype(composition(
      SmemLayoutQdO{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}, GenRowMajor{})));  // (D, M)
  using SmemLayoutKt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));   // (D, N)
  using SmemLayoutPdSt = decltype(composition(
      SmemLayoutPdS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, GenRowMajor{})));   // (N, M)

  static constexpr int kSmemQdOElems = cosize_v<SmemLayoutQdO>;
  static constexpr int kSmemKVElems = cosize_v<SmemLayoutKV>;
  static constexpr int kSmemPdSElems = cosize_v<SmemLayoutPdS>;
  // Q and dO are double-buffered: the next Q tile streams in during the five
  // GEMMs of the current one.
  static constexpr int kSmemBytes =
      (4 * kSmemQdOElems + 2 * kSmemKVElems + 2 * kSmemPdSElems) * int(sizeof(Element));

  // ---- Copies -------------------------------------------------------------------
  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomC = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>;

  static constexpr int kElemsPer16B = 16 / sizeof(Element);
  static constexpr int kThreadsPerRow = kSmemRowK / kElemsPer16B;
  using GmemThreadLayout =
      Layout<Shape<Int<kNThreads / kThreadsPerRow>, Int<kThreadsPerRow>>,
             Stride<Int<kThreadsPerRow>, _1>>;
  using GmemValLayout = Layout<Shape<_1, Int<kElemsPer16B>>>;
  using GmemTiledCopy = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemThreadLayout{},
      GmemValLayout{}));
  using GmemTiledCopyOut = decltype(make_tiled_copy(
      Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{}, GmemThreadLayout{},
      GmemValLayout{}));
};

// Per compiled head dim: (kBlockN, kSdPWarpsM, kdKVWarpsN, kdQWarpsM), all
// with 64 query rows and 8 warps. dK and dV accumulators take
// 2 * kBlockN * kHeadDim / 256 registers per thread, which bounds kBlockN for
// the large head dims. Wider K/V tiles read less shared memory per MMA, and
// above d = 128 warps tiled 4x2 / 2x4 / 2x4 beat 2x4 / 4x2 / 4x2 by 5-9%
// (notes/kernel_experiments.md, entries 8, 10 and 16).
template <int kHeadDim>
struct BwdShape {
  static constexpr int kBlockN = kHeadDim <= 128 ? 128 : 64;
  static constexpr int kSdPWarpsM = kHeadDim > 128 ? 4 : 2;
  static constexpr int kdKVWarpsN = kHeadDim > 128 ? 2 : 4;
  // dQ tiles (64, kHeadDim): two warps along M need kHeadDim % 64 == 0.
  static constexpr int kdQWarpsM = kHeadDim >= 128 ? 2 : 4;
};

template <typename Element, int kHeadDim>
struct BwdConfig {
  using Shape_ = BwdShape<kHeadDim>;
  using Traits = BwdTraits<Element, kHeadDim, /*kBlockM=*/64, Shape_::kBlockN, /*kNWarps=*/8,
                           Shape_::kSdPWarpsM, Shape_::kdKVWarpsN, Shape_::kdQWarpsM>;
};

}  // namespace jax_flash::bwd
