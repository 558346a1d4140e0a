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

// 64-key tiles everywhere: 16 keys per warp when the four warps split a
// tile's keys, and a page of 64, 128 or 256 rows holds whole tiles. Stages
// keep about 70 KB of K/V per block (two blocks per H200 SM at d <= 128):
// 4 stages of 18 KB at d <= 64, 2 of 35 KB at d = 128; d > 128 keeps 2
// stages of 68 KB and halves block_m so the block fits an A100's 163 KB.
constexpr DecodeTile decode_tile(int head_dim) {
  return DecodeTile{64, head_dim <= 128 ? 64 : 32, head_dim <= 64 ? 4 : 2};
}

constexpr int kDecodeThreads = 128;  // four warps
constexpr int kDecodeWarps = kDecodeThreads / 32;

// Shared-memory rows carry 8 extra elements (16 B): successive rows then
// start 4 banks apart, so the eight 16 B rows one ldmatrix phase reads hit
// eight different 4-bank groups (conflict-free for every compiled head dim).
constexpr int decode_smem_row_bytes(int head_dim) { return (head_dim + 8) * 2; }

// Q rows, then `stages` K/V tiles (K and V of a tile side by side).
constexpr int decode_smem_bytes(int head_dim) {
  const DecodeTile t = decode_tile(head_dim);
  return decode_smem_row_bytes(head_dim) * (t.block_m + 2 * t.stages * t.block_n);
}

// Split-KV: at most this many splits (the scratch and the combine kernel's
// loop grow with it), and at least this many keys per split in the
// automatic choice (below that a split's pipeline fill costs more than its
// parallelism gains).
constexpr int kMaxSplits = 128;
constexpr int kMinKeysPerSplit = 256;

}  // namespace jax_flash::decode
