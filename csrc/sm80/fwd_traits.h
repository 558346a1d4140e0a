// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Tile shapes, shared-memory layouts and copy/MMA atoms of the forward kernel
// for one (element type, head dim). Everything here is a type or a constexpr;
// the kernel composes them.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace jax_flash::fwd {

using namespace cute;

// kHeadDim: compiled head dim (the actual one may be smaller, multiple of 8).
// kBlockM x kBlockN: the S = Q K^T tile one thread block computes per step.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdTraits {
  using Element = Element_;
  using ElementAccum = float;

  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;

  static_assert(kHeadDim % 32 == 0, "compiled head dims are multiples of 32");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole 16-row MMA slabs");
  static_assert(kBlockN % 16 == 0, "P is reused as an MMA A operand in 16-wide k slices");

  // ---- MMA -----------------------------------------------------------------
  // Warps tile M; every warp sees the whole N and K extent of a tile. The 16
  // in N lets one ldmatrix.x4 feed two n8 MMAs of the B operand.
  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>,
                            Tile<Int<16 * kNWarps>, _16, _16>>;

  // ---- Shared memory ---------------------------------------------------------
  // Rows of kSmemRowK elements (128 B for 64 bf16) swizzled so that both the
  // 16 B cp.async writes and the ldmatrix reads are bank-conflict free.
  static constexpr int kSmemRowK = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kSmemRowK == 64 ? 3 : 2;
  using SmemLayoutAtom = decltype(composition(
      Swizzle<kSwizzleBits, 3, 3>{},
      Layout<Shape<_8, Int<kSmemRowK>>, Stride<Int<kSmemRowK>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // (M, D)
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{},
                                              Shape<Int<kBlockN>, Int<kHeadDim>>{}));  // (N, D)
  // V^T as the B operand of O += P V: (D, N) view of the same bytes.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  // O is staged through Q's buffer before the coalesced global store.
  using SmemLayoutO = SmemLayoutQ;

  static constexpr int kSmemQBytes = cosize_v<SmemLayoutQ> * sizeof(Element);
  static constexpr int kSmemKVBytes = cosize_v<SmemLayoutKV> * sizeof(Element);
  static constexpr int kSmemBytes = kSmemQBytes + 2 * kSmemKVBytes;  // Q, K, V

  // ---- Copies ----------------------------------------------------------------
  // Shared -> registers: ldmatrix; V is read transposed.
  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>;

  // Global <-> shared: 16 B per thread per access, a warp covering whole
  // kSmemRowK-wide row segments so every access is coalesced.
  static constexpr int kElemsPer16B = 16 / sizeof(Element);
  static constexpr int kThreadsPerRow = kSmemRowK / kElemsPer16B;
  static_assert(kNThreads % kThreadsPerRow == 0);
  using GmemThreadLayout =
      Layout<Shape<Int<kNThreads / kThreadsPerRow>, Int<kThreadsPerRow>>,
             Stride<Int<kThreadsPerRow>, _1>>;
  using GmemValLayout = Layout<Shape<_1, Int<kElemsPer16B>>>;
  using GmemTiledCopyQKV = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemThreadLayout{},
      GmemValLayout{}));
  using GmemTiledCopyO = decltype(make_tiled_copy(
      Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{}, GmemThreadLayout{},
      GmemValLayout{}));
};

// Tile configuration per compiled head dim, for sm80/sm90 (mma.sync). Four
// warps of 32 rows each keep shared-memory reads per MMA low; shared memory
// stays <= 64 KB up to d=128 so two blocks fit per SM. d=64 uses 128x64, not
// 128x128: +2-8% on H200 (notes/kernel_experiments.md).
template <typename Element, int kHeadDim>
struct FwdConfig;
template <typename E> struct FwdConfig<E, 32>  { using Traits = FwdTraits<E, 32, 128, 128, 4>; };
template <typename E> struct FwdConfig<E, 64>  { using Traits = FwdTraits<E, 64, 128, 64, 4>; };
template <typename E> struct FwdConfig<E, 96>  { using Traits = FwdTraits<E, 96, 128, 64, 4>; };
template <typename E> struct FwdConfig<E, 128> { using Traits = FwdTraits<E, 128, 128, 64, 4>; };
template <typename E> struct FwdConfig<E, 192> { using Traits = FwdTraits<E, 192, 128, 64, 8>; };
template <typename E> struct FwdConfig<E, 256> { using Traits = FwdTraits<E, 256, 128, 64, 8>; };

}  // namespace jax_flash::fwd
