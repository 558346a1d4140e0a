// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Small CuTe helpers shared by the attention kernels: register-layout views of
// MMA accumulators, warp-quad reductions, dtype conversion of fragments,
// predicated tile copies, and the two GEMM shapes of attention (both operands
// in shared memory, or A already in registers).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

namespace jax_flash {

using namespace cute;

// ---- Accumulator views ------------------------------------------------------
// An SM80 m16n8 accumulator fragment is ((2 cols, 2 row halves), MMA_M, MMA_N).
// Viewed as (rows, cols) = ((2, MMA_M), (2, MMA_N)) each thread sees whole
// rows, which is what the row-wise softmax and masking want.
template <typename Layout>
__device__ __forceinline__ constexpr auto acc_rowcol(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3);
  static_assert(decltype(size<0>(acc))::value == 4);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(get<0, 0>(acc), get<2>(acc)));
}

// The accumulator of S = Q K^T re-read as the A operand of O += P V: two
// neighbouring n8 accumulator tiles hold exactly the registers of one m16k16
// A tile, so ((2,2), MMA_M, MMA_N) becomes ((2,2,2), MMA_M, MMA_N / 2) with no
// data movement.
template <typename Layout>
__device__ __forceinline__ constexpr auto acc_as_operand_a(Layout acc) {
  static_assert(decltype(size<2>(acc))::value % 2 == 0);
  auto split = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // ((2,2), M, (2, N/2))
  return make_layout(make_layout(get<0>(split), get<2, 0>(split)), get<1>(split),
                     get<2, 1>(split));
}

// ---- Conversions ------------------------------------------------------------
// A register tensor of `To` with t's (compact) layout; packed conversions
// (cvt.rn.bf16x2.f32) through cutlass's array converter.
template <typename To, typename Engine, typename Layout>
__device__ __forceinline__ auto convert_fragment(Tensor<Engine, Layout> const& t) {
  using From = typename Engine::value_type;
  constexpr int kN = decltype(size(t))::value;
  Tensor out = make_tensor<To>(t.layout());
  cutlass::NumericArrayConverter<To, From, kN> convert;
  *reinterpret_cast<cutlass::Array<To, kN>*>(out.data()) =
      convert(*reinterpret_cast<const cutlass::Array<From, kN>*>(t.data()));
  return out;
}

// ---- Warp-quad reductions ---------------------------------------------------
// The four threads of an MMA quad (lanes 4r..4r+3) share each accumulator row.
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
template <typename Op>
__device__ __forceinline__ float quad_allreduce(float x, Op op) {
  x = op(x, __shfl_xor_sync(0xffffffff, x, 2));
  x = op(x, __shfl_xor_sync(0xffffffff, x, 1));
  return x;
}

// ---- Predicated tile copy ---------------------------------------------------
// Copies the rows with coordinate < max_rows and the column chunks with
// col_ok(k); everything else in dst is zero-filled, so padded rows/columns of
// K and V contribute exact zeros (never stale shared memory, which could hold
// inf/NaN and poison 0 * x).
template <typename TiledCopy, typename TS, typename TD, typename TC, typename TP>
__device__ __forceinline__ void copy_tile(TiledCopy const& tiled_copy, TS const& src, TD&& dst,
                                          TC const& coord, TP const& col_ok, int max_rows) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(dst); ++m) {
    if (get<0>(coord(0, m, 0)) < max_rows) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(dst); ++k) {
        if (col_ok(k)) {
          copy(tiled_copy, src(_, m, k), dst(_, m, k));
        } else {
          clear(dst(_, m, k));
        }
      }
    } else {
      clear(dst(_, m, _));
    }
  }
}

// Whole rows, columns predicated: the steady-state K/V load. With every
// column present (all_cols) it is a plain unpredicated tiled copy.
template <typename TiledCopy, typename TS, typename TD, typename TP>
__device__ __forceinline__ void copy_tile_cols(TiledCopy const& tiled_copy, TS const& src,
                                               TD&& dst, TP const& col_ok, bool all_cols) {
  if (all_cols) {
    copy(tiled_copy, src, dst);
    return;
  }
  CUTE_UNROLL
  for (int k = 0; k < size<2>(dst); ++k) {
    if (col_ok(k)) {
      copy(tiled_copy, src(_, _, k), dst(_, _, k));
    } else {
      clear(dst(_, _, k));
    }
  }
}

// ---- GEMMs ------------------------------------------------------------------
// acc += A B^T with both operands in shared memory. The ldmatrix of k-slice
// i+1 is issued before the MMAs of slice i so shared-memory latency hides
// behind tensor-core work.
template <typename Acc, typename RA, typename RB, typename SA, typename SB, typename TiledMma,
          typename CopyA, typename CopyB, typename ThrCopyA, typename ThrCopyB>
__device__ __forceinline__ void gemm_ss(Acc& acc, RA& tCrA, RB& tCrB, SA const& tCsA,
                                        SB const& tCsB, TiledMma const& tiled_mma,
                                        CopyA const& copy_a, CopyB const& copy_b,
                                        ThrCopyA const& thr_copy_a, ThrCopyB const& thr_copy_b) {
  Tensor tCrA_view = thr_copy_a.retile_D(tCrA);  // (CPY, CPY_M, CPY_K)
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);  // (CPY, CPY_N, CPY_K)
  copy(copy_a, tCsA(_, _, 0), tCrA_view(_, _, 0));
  copy(copy_b, tCsB(_, _, 0), tCrB_view(_, _, 0));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(tCrA); ++i) {
    if (i + 1 < size<2>(tCrA)) {
      copy(copy_a, tCsA(_, _, i + 1), tCrA_view(_, _, i + 1));
      copy(copy_b, tCsB(_, _, i + 1), tCrB_view(_, _, i + 1));
    }
    gemm(tiled_mma, tCrA(_, _, i), tCrB(_, _, i), acc);
  }
}

// acc += A B^T with A already in registers (P after softmax) and B in shared
// memory.
template <typename Acc, typename RA, typename RB, typename SB, typename TiledMma, typename CopyB,
          typename ThrCopyB>
__device__ __forceinline__ void gemm_rs(Acc& acc, RA const& tCrA, RB& tCrB, SB const& tCsB,
                                        TiledMma const& tiled_mma, CopyB const& copy_b,
                                        ThrCopyB const& thr_copy_b) {
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);  // (CPY, CPY_N, CPY_K)
  copy(copy_b, tCsB(_, _, 0), tCrB_view(_, _, 0));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(tCrA); ++i) {
    if (i + 1 < size<2>(tCrA)) {
      copy(copy_b, tCsB(_, _, i + 1), tCrB_view(_, _, i + 1));
    }
    gemm(tiled_mma, tCrA(_, _, i), tCrB(_, _, i), acc);
  }
}

}  // namespace jax_flash
