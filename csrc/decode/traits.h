// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Compile-time facts of one decode kernel (element type, compiled head dim,
// narrow or wide tile, copies by cp.async or by the copy engine): tile sizes
// (decode/tile.h), shared-memory layout, and the lane -> address maps of
// the ldmatrix reads. Everything here is a constexpr.
#pragma once

#include "tile.h"

namespace jax_flash::decode {

template <typename Element_, int kHeadDim_, bool kNarrow_, bool kCopyEngine_ = false>
struct DecodeTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // compiled; the actual one is <= and a multiple of 8
  static constexpr bool kNarrow = kNarrow_;
  // K/V tiles by sm_90's bulk tensor copies (decode/tma.h) instead of
  // cp.async: narrow tiles of head dims that are a multiple of 64.
  static constexpr bool kCopyEngine = kCopyEngine_;
  static constexpr DecodeTile kTile = decode_tile(kHeadDim, kNarrow, kCopyEngine);
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kStages = kTile.stages;
  static constexpr int kNThreads = kDecodeThreads;
  static constexpr int kNWarps = kDecodeWarps;

  static constexpr int kChunks = kHeadDim / 8;    // 16-byte chunks per row
  static constexpr int kKSteps = kHeadDim / 16;   // k16 MMA steps of S = Q K^T
  static constexpr int kDTiles = kHeadDim / 8;    // n8 MMA tiles of O (per row slab)

  // ---- Shared memory ---------------------------------------------------------
  // [Q: kBlockM rows][page rows, narrow only: 2 x kBlockN int64, or the
  // copy engine's barriers][stage 0: K kBlockN rows, V kBlockN rows][stage
  // 1] ..., Q/K/V rows of kRowBytes (decode/tile.h: chunks permuted, or
  // rows padded, for conflict-free ldmatrix). The copy engine writes a box
  // of 64 columns (128 bytes, its widest swizzled row) at a time, so its
  // Q, K and V are stored unit-major: 64-column units of all the rows, one
  // after the other, rows 128 bytes apart in a unit, chunks permuted the
  // same way (its 128-byte swizzle is exactly that permutation when a unit
  // starts at a multiple of 1024 bytes). At d = 64 the two layouts agree.
  static constexpr bool kSwizzled = decode_smem_swizzled(kHeadDim);
  static constexpr int kRowBytes = decode_smem_row_bytes(kHeadDim);
  static_assert(!kCopyEngine || (kNarrow && kSwizzled), "copy engine: narrow, swizzled tiles");
  static constexpr int kRowPitch = kCopyEngine ? 128 : kRowBytes;  // row to row in a unit
  static constexpr int kQBytes = kBlockM * kRowBytes;
  static constexpr bool kStagePageRows = kNarrow && !kCopyEngine;  // PageRows (kernel.h)
  static constexpr int kStagesOffset = kQBytes + (kNarrow ? kPageRowsBytes : 0);
  static constexpr int kTileBytes = kBlockN * kRowBytes;  // K or V of one stage
  // Bytes from one 64-column unit to the next: within a row, or (unit-major)
  // past all the rows of Q or of a K/V tile.
  static constexpr int kQUnitBytes = kCopyEngine ? kBlockM * 128 : 128;
  static constexpr int kKVUnitBytes = kCopyEngine ? kBlockN * 128 : 128;
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kSmemBytes = decode_smem_bytes(kHeadDim, kNarrow, kCopyEngine);

  // Epilogue, over the K/V stages once the main loop is done: each warp's
  // 16 x kHeadDim O accumulator (rows padded by 8 floats: a half-warp's
  // float2 writes, 4 rows x 8 words, then cover the 32 banks once), row
  // maxima, row sums.
  static constexpr int kMergeRowFloats = kHeadDim + 8;
  static constexpr int kMergeBytes = kNWarps * 16 * (kMergeRowFloats + 2) * 4;

  // ---- Copies ------------------------------------------------------------------
  // Each thread issues up to kQCopies / kKVCopies 16-byte cp.async per Q
  // load / per K (and V) tile, consecutive threads on consecutive chunks of
  // a row (a narrow tile's Q can have fewer chunks than threads).
  static constexpr int kQChunks = kBlockM * kChunks;
  static constexpr int kQCopies = (kQChunks + kNThreads - 1) / kNThreads;
  static constexpr int kKVCopies = kBlockN * kChunks / kNThreads;

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "compiled head dims: 32 .. 256, step 32");
  static_assert(kBlockN % (16 * kNWarps) == 0, "four warps can split a tile into 16-key steps");
  static_assert(kBlockM % 16 == 0 && kBlockM <= 16 * kNWarps, "a warp per 16-row slab at most");
  static_assert(kBlockN * kChunks % kNThreads == 0, "K/V copies divide evenly among the threads");
  static_assert(kStages >= 2, "the main loop overlaps the next tile's copy with this one's math");
  static_assert(kMergeBytes <= kStages * kStageBytes, "the epilogue fits in the K/V stages");
  static_assert(kRowBytes % 16 == 0, "16-byte aligned rows for cp.async and ldmatrix");
  static_assert(!kSwizzled || (kRowBytes % 128 == 0 && kQBytes % 128 == 0 &&
                               kStagesOffset % 128 == 0 && kTileBytes % 128 == 0),
                "permuted rows are whole 128-byte units from 128-byte aligned bases");
  static_assert(!kCopyEngine || (kStagesOffset % 1024 == 0 && kKVUnitBytes % 1024 == 0 &&
                                 kStages * 8 <= kPageRowsBytes),
                "copy engine boxes start at multiples of 1024 bytes; its barriers fit");
  static_assert(kBlockN <= kNThreads && 2 * kBlockN * 8 <= kPageRowsBytes,
                "a thread per key of a tile stages its page row; two tiles' rows fit");

  // Byte offset of 16-byte chunk `chunk` of row `row` from that row's
  // start (row * kRowPitch) in Q (kUnitBytes = kQUnitBytes) or a K/V tile
  // (kKVUnitBytes). tile.h: rows permuted within 128-byte units where the
  // head dim allows.
  template <int kUnitBytes>
  static __host__ __device__ __forceinline__ constexpr int chunk_offset(int row, int chunk) {
    if (!kCopyEngine) return decode_chunk_offset(kHeadDim, row, chunk);
    return kUnitBytes * (chunk / 8) + decode_chunk_offset(64, row, chunk % 8);
  }

  // ---- ldmatrix lane maps (decode/ptx.h) -----------------------------------------
  // In one x4 load each lane addresses one 16-byte row piece: *_lane_row is
  // the byte offset of its row from a 16-row (or 16-key) slab's first row,
  // lane_col that of its piece (column half `half` of the 16 columns
  // [16 * step, 16 * step + 16)). Slabs start at rows that are multiples of
  // 8, so a lane's row is lane % 8 modulo 8, which is all the chunk
  // permutation needs. lane_col equals chunk_offset(lane, 2 * step + half),
  // written so that it takes four values per lane plus a multiple of
  // kUnitBytes (an immediate in unrolled loops) rather than one register
  // per step.
  template <int kUnitBytes>
  static __host__ __device__ __forceinline__ int lane_col(int lane, int half, int step) {
    if (!kSwizzled) return 32 * step + 16 * half;
    const int s = lane & 7;
    return kUnitBytes * (step >> 2) + 32 * ((step & 3) ^ (s >> 1)) + 16 * (half ^ (s & 1));
  }
  // Q as the A operand of S = Q K^T: matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15),
  // row halves first: a0..a3.
  static __host__ __device__ __forceinline__ int q_lane_row(int lane) {
    return (lane % 8 + 8 * ((lane / 8) & 1)) * kRowPitch;
  }
  static __host__ __device__ __forceinline__ int q_lane_col(int lane, int step) {
    return lane_col<kQUnitBytes>(lane, lane / 8 >> 1, step);
  }
  // K as the B operand (B[k][n] = K[n][k]): matrices (keys 0-7: cols 0-7,
  // 8-15 | keys 8-15: cols 0-7, 8-15) give b0, b1 of n-tile 0 then of n-tile 1.
  static __host__ __device__ __forceinline__ int k_lane_row(int lane) {
    return (lane % 8 + 8 * (lane / 8 >> 1)) * kRowPitch;
  }
  static __host__ __device__ __forceinline__ int k_lane_col(int lane, int step) {
    return lane_col<kKVUnitBytes>(lane, (lane / 8) & 1, step);
  }
  // V as the B operand of O += P V (B[k][n] = V[k][n], read transposed):
  // matrices (cols 0-7: keys 0-7, 8-15 | cols 8-15: keys 0-7, 8-15) give
  // b0, b1 of output n-tile 0 then of n-tile 1.
  static __host__ __device__ __forceinline__ int v_lane_row(int lane) {
    return (lane % 8 + 8 * ((lane / 8) & 1)) * kRowPitch;
  }
  static __host__ __device__ __forceinline__ int v_lane_col(int lane, int step) {
    return lane_col<kKVUnitBytes>(lane, lane / 8 >> 1, step);
  }
};

}  // namespace jax_flash::decode
