// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The tile sizes of the kv-cache decode kernels, in one constexpr function,
// plain C++: the kernels (decode/kernel.h) build their shared-memory layout
// from it and the host plan (host/plan.cc) sizes grids, splits and scratch
// from the same numbers.
#pragma once

namespace jax_flash::decode {

struct DecodeTile {
  int block_n;  // keys per K/V tile (one pipeline stage)
  int block_m;  // query rows per thread block (16 per MMA row slab)
  int stages;   // K/V tiles in shared memory (cp.async pipeline depth)
};

constexpr int kDecodeThreads = 128;  // four warps
constexpr int kDecodeWarps = kDecodeThreads / 32;

// Shared-memory rows. cp.async fills them 16 B at a time from 32-byte
// global sectors, and a sector whose shared destination straddles a 32-byte
// boundary is fetched from L2 twice (padded rows of odd index did: 1.5x the
// K/V sectors, notes/kernel_experiments.md entry 38). Head dims that are a
// multiple of 64 keep unpadded rows (whole 128-byte units, every sector
// aligned) with the 16-byte chunks of row r permuted by XOR with r % 8 inside
// each unit (decode_chunk_offset), so the eight rows one ldmatrix phase reads
// at one logical chunk hit eight different 4-bank groups. The others (32,
// 96) pad each row by 8 elements, which puts successive rows 4 banks apart:
// conflict-free too, with the odd rows' sectors fetched twice.
constexpr bool decode_smem_swizzled(int head_dim) { return head_dim % 64 == 0; }
constexpr int decode_smem_row_bytes(int head_dim) {
  return decode_smem_swizzled(head_dim) ? head_dim * 2 : (head_dim + 8) * 2;
}
// Byte offset of 16-byte chunk `chunk` (8 elements) of row `row` in its
// shared-memory row.
constexpr int decode_chunk_offset(int head_dim, int row, int chunk) {
  return (decode_smem_swizzled(head_dim) ? chunk ^ (row & 7) : chunk) * 16;
}

// A block streams its keys one 64-key tile per stage, and a block's speed
// is bounded by the tiles it has in flight (stages - 1) rather than by its
// share of the memory bandwidth, so stages are what shared memory buys.
//
// Wide tiles (up to 64 query rows, 32 above d=128) keep about 70 KB of K/V
// per block (two blocks per H200 SM at d <= 128): 4 stages of 10-16 KB at
// d <= 64, 2 of 26-32 KB at d = 96 and 128; d > 128 keeps 2 stages of
// 48-64 KB and halves block_m so the block fits an A100's 163 KB.
//
// Narrow tiles (one 16-row MMA slab: the usual decode, a GQA group of up to
// 16 query heads and one token) need a quarter of the Q rows, and take as
// many stages as fit kNarrowSmemBudget (two blocks per H200 SM), 2 to 8:
// 3 at d=128 (two tiles in flight instead of one), 6 at d=64, 2 at d=192
// and d=256 (d=256 then needs 137 KB: one block per SM).
//
// The d=64 narrow tile that copies by cp.async (pages shorter than a tile
// on sm_90, every cache before it) keeps kCpAsyncStagesD64 instead: on an
// H100 three blocks of 4 stages a SM read pages of 16 1-10% faster (by
// row) than two of 6, where the copy engine's tile of 4 stages read
// contiguous caches no faster (notes/kernel_experiments.md entry 61).
constexpr int kNarrowRows = 16;
constexpr int kNarrowSmemBudget = 110 * 1024;
constexpr int kCpAsyncStagesD64 = 4;
constexpr int kDecodeBlockN = 64;  // keys per K/V tile

// Paged caches with pages shorter than a tile: the cache row of each key of
// the next tile, staged in shared memory (two buffers of int64). Narrow
// tiles only: the wide d=64 tile fills an A100 SM exactly twice without it.
constexpr int kPageRowsBytes = 2 * kDecodeBlockN * 8;

constexpr DecodeTile decode_tile(int head_dim, bool narrow = false, bool copy_engine = false) {
  if (!narrow) return DecodeTile{kDecodeBlockN, head_dim <= 128 ? 64 : 32, head_dim <= 64 ? 4 : 2};
  if (head_dim == 64 && !copy_engine) {
    return DecodeTile{kDecodeBlockN, kNarrowRows, kCpAsyncStagesD64};
  }
  const int row = decode_smem_row_bytes(head_dim);
  const int stages =
      (kNarrowSmemBudget - kNarrowRows * row - kPageRowsBytes) / (2 * kDecodeBlockN * row);
  return DecodeTile{kDecodeBlockN, kNarrowRows, stages < 2 ? 2 : stages > 8 ? 8 : stages};
}

// Q rows, the staged page rows (narrow), then `stages` K/V tiles (K and V
// of a tile side by side).
constexpr int decode_smem_bytes(int head_dim, bool narrow = false, bool copy_engine = false) {
  const DecodeTile t = decode_tile(head_dim, narrow, copy_engine);
  return decode_smem_row_bytes(head_dim) * (t.block_m + 2 * t.stages * t.block_n) +
         (narrow ? kPageRowsBytes : 0);
}

// sm_90's copy engine (decode/tma.h) brings boxes of 64 columns (128
// bytes, its widest swizzled row) and serves pages that are a multiple of a
// tile or a divisor of it of at least 8 rows (a box then starts at a
// multiple of 1024 bytes, which the swizzle needs); contiguous caches
// (page_size 0 here) always.
constexpr int kBoxColumns = 64;
constexpr bool copy_engine_page_size(long long page_size, int block_n) {
  return page_size == 0 || page_size % block_n == 0 ||
         (block_n % page_size == 0 && page_size >= 8);
}

// Split-KV: at most this many splits (the scratch and the combine kernel's
// loop grow with it), and at least this many keys per split in the
// automatic choice (below that a split's pipeline fill costs more than its
// parallelism gains).
constexpr int kMaxSplits = 128;
constexpr int kMinKeysPerSplit = 256;

}  // namespace jax_flash::decode
