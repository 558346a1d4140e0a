// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Dropout mask. Whether entry (i, j) of head h, batch element b survives is a
// pure function of (seed, b, h, i, j), so the backward pass regenerates the
// forward's mask whatever its tile shapes, and jax_flash.reference computes
// the same bits in plain JAX (dropout_keep_mask). Entries are grouped in
// 16 x 16 blocks. Inside a block, entry (r, c) has
//   lane = (r % 8) * 4 + (c % 8) / 2,   slot = (r / 8) * 4 + (c / 8) * 2 + c % 2,
// which is where an m16n8 MMA accumulator keeps it: a thread's entries of
// one block share a lane. One Philox-4x32-10 call per (block, lane), with
// counter (j / 16, (i / 16) * 32 + lane, h, b) and the 64-bit seed as key,
// gives 128 bits = eight 16-bit numbers, one per slot; the entry is dropped
// when its number is below round(p * 65536).
#pragma once

#include <cstdint>

#include "cute_utils.h"
#include "params.h"

namespace jax_flash {

// Philox-4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as
// easy as 1, 2, 3", SC 2011).
__host__ __device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(kMul0) * ctr.x;
    const uint64_t p1 = uint64_t(kMul1) * ctr.z;
    ctr = make_uint4(uint32_t(p1 >> 32) ^ ctr.y ^ key.x, uint32_t(p1),
                     uint32_t(p0 >> 32) ^ ctr.w ^ key.y, uint32_t(p0));
    key.x += kWeyl0;
    key.y += kWeyl1;
  }
  return ctr;
}

// The eight 16-bit numbers of one (block, lane): slot s is bits
// [16 * (s % 2), 16 * (s % 2) + 16) of word s / 2.
__host__ __device__ __forceinline__ uint32_t dropout_slot_bits(uint4 r, int slot) {
  const uint32_t w = slot < 2 ? r.x : slot < 4 ? r.y : slot < 6 ? r.z : r.w;
  return (slot & 1) ? (w >> 16) : (w & 0xffffu);
}

// The 128 random bits of the 16 x 16 block holding (row, col), for `lane`.
__host__ __device__ __forceinline__ uint4 dropout_block_bits(uint2 seed, uint32_t batch_index,
                                                            uint32_t head, int row, int col,
                                                            int lane) {
  return philox4x32_10(
      make_uint4(uint32_t(col) / 16, (uint32_t(row) / 16) * 32 + lane, head, batch_index), seed);
}

// Whether entry (row, col) survives, computed on its own (the attention
// kernels compute a whole block's entries from one call instead).
__host__ __device__ __forceinline__ bool dropout_keep(uint2 seed, uint32_t batch_index,
                                                     uint32_t head, int row, int col,
                                                     uint32_t threshold) {
  const int lane = (row % 8) * 4 + (col % 8) / 2;
  const int slot = ((row % 16) / 8) * 4 + ((col % 16) / 8) * 2 + col % 2;
  return dropout_slot_bits(dropout_block_bits(seed, batch_index, head, row, col, lane), slot) >=
         threshold;
}

struct Dropout {
  uint2 seed;
  uint32_t batch_index, head;
  uint32_t threshold;
  bool enabled;

  __device__ __forceinline__ Dropout(const AttnParams& p, int bidb, int bidh) {
    threshold = p.dropout_threshold;
    enabled = p.rng_ptr != nullptr;
    head = bidh;
    if (enabled) {
      // rng: (batch, 4) uint32 = (seed lo, seed hi, global batch index,
      // global index of head 0): a shard of a call split over heads passes
      // its first head, so each shard draws the unsplit call's mask.
      const uint4 rng = reinterpret_cast<const uint4*>(p.rng_ptr)[bidb];
      seed = make_uint2(rng.x, rng.y);
      batch_index = rng.z;
      head += rng.w;
    }
  }
  __device__ __forceinline__ bool on() const { return enabled; }


  // Applies the mask to an m16n8 accumulator fragment acc(e, m, n) in place:
  // kept entries are multiplied by kept_scale, dropped ones become 0.
  // Returns which entries were kept, bit e + 4 * (m + M * n), for fragments
  // of up to 64 entries (0 for larger ones). coords(e, m, n)
  // is an entry's tile-local (row, col) and (row0, col0) the tile's origin.
  // kAtomsPerCall = 2 when fragment atoms n and n + 1 are the two 8-column
  // halves of one 16-column block (one warp spans the tile's columns); 1
  // otherwise, each call then serving one atom with half of its bits.
  template <int kAtomsPerCall, typename TA, typename TC>
  __device__ __forceinline__ uint64_t apply(TA& acc, TC const& coords, int row0, int col0,
                                            float kept_scale) const {
    using namespace cute;
    constexpr int kM = decltype(size<1>(acc))::value;
    constexpr int kN = decltype(size<2>(acc))::value;
    static_assert(kN % kAtomsPerCall == 0);
    constexpr bool kBits = kM * kN * 4 <= 64;  // larger fragments return no bits
    uint64_t kept = 0;
    CUTE_UNROLL
    for (int m = 0; m < kM; ++m) {
      CUTE_UNROLL
      for (int n = 0; n < kN; n += kAtomsPerCall) {
        const int row = row0 + get<0>(coords(0, m, n));
        const int col = col0 + get<1>(coords(0, m, n));
        const int lane = (row % 8) * 4 + (col % 8) / 2;
        const uint4 bits = dropout_block_bits(seed, batch_index, head, row, col, lane);
        CUTE_UNROLL
        for (int a = 0; a < kAtomsPerCall; ++a) {
          // This atom's column half of the block, as a slot offset.
          const int half = (kAtomsPerCall == 2 ? a : (col % 16) / 8) * 2;
          CUTE_UNROLL
          for (int e = 0; e < 4; ++e) {
            // e: column parity (e % 2), row half (e / 2), as in the MMA's C layout.
            const int slot = (e / 2) * 4 + half + e % 2;
            const bool keep = dropout_slot_bits(bits, slot) >= threshold;
            acc(e, m, n + a) = keep ? acc(e, m, n + a) * kept_scale : 0.f;
            if constexpr (kBits) kept |= uint64_t(keep) << (e + 4 * (m + kM * (n + a)));
          }
        }
      }
    }
    return kept;
  }
};

}  // namespace jax_flash
