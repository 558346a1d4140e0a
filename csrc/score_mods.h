// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Score modifiers between S = Q K^T and the softmax, shared by the forward
// and backward kernels:
//
//   softcap  s -> softcap * tanh(s * scale / softcap)
//   ALiBi    s -> s - slope * |i + seqlen_k - seqlen_q - j|
//   dropout  P -> P * keep / (1 - p), keep drawn from a counter-based RNG
//
// Units. The kernels keep scores in "softmax units" x and exponentiate with
// one FFMA, exp(x * lse_scale) = exp2(x * softmax_scale_log2). Without softcap
// x is the raw q.k and lse_scale the softmax scale. With softcap x is
// tanh(q.k * scale / softcap) and lse_scale is softcap, so capping costs one
// multiply and one tanh per score. ALiBi slopes are divided by lse_scale once
// per tile.
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
    if (enabled) {
      // rng: (batch, 4) uint32 = (seed lo, seed hi, batch index, unused).
      const uint4 rng = reinterpret_cast<const uint4*>(p.rng_ptr)[bidb];
      seed = make_uint2(rng.x, rng.y);
      batch_index = rng.z;
    }
    head = bidh;
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

// Softcap and ALiBi on a (rows, cols) view of the scores.
struct ScoreMods {
  float softcap_premul;  // scale / softcap; 0: off
  float alibi_slope;     // slope / lse_scale; 0: off
  int diag_shift;        // seqlen_k - seqlen_q

  __device__ __forceinline__ ScoreMods(const AttnParams& p, int bidb, int bidh, int seqlen_q,
                                       int seqlen_k) {
    softcap_premul = p.softcap_premul;
    alibi_slope = p.alibi_slopes_ptr != nullptr
                      ? p.alibi_slopes_ptr[int64_t(bidb) * p.nheads + bidh] / p.softmax_lse_scale
                      : 0.f;
    diag_shift = seqlen_k - seqlen_q;
  }

  __device__ __forceinline__ static float tanh_approx(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }

  template <typename TS>
  __device__ __forceinline__ void softcap(TS& scores) const {
    CUTE_UNROLL
    for (int i = 0; i < cute::size(scores); ++i) scores(i) = tanh_approx(scores(i) * softcap_premul);
  }

  // row_shift: per-row diagonal shifts (segment ids: the row's segment
  // decides its key position), indexed like the rows of scores; nullptr:
  // diag_shift for every row.
  template <typename TS, typename TC>
  __device__ __forceinline__ void alibi(TS& scores, TC const& coords, int row0, int col0,
                                        const int* row_shift = nullptr) const {
    using namespace cute;
    CUTE_UNROLL
    for (int r = 0; r < size<0>(scores); ++r) {
      // Signed distance of this thread's first column of the row from the
      // row's diagonal; the other columns sit at compile-time offsets.
      const int shift = row_shift != nullptr ? row_shift[r] : diag_shift;
      const float base =
          float(col0 + get<1>(coords(r, 0)) - (row0 + get<0>(coords(r, 0)) + shift));
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const float dist = fabsf(base + float(get<1>(coords(r, c)) - get<1>(coords(r, 0))));
        scores(r, c) -= alibi_slope * dist;
      }
    }
  }

  // Forward: both modifiers, in FlashAttention's order (cap, then bias).
  template <typename TS, typename TC>
  __device__ __forceinline__ void apply(TS& scores, TC const& coords, int row0, int col0,
                                        const int* row_shift = nullptr) const {
    if (softcap_premul != 0.f) softcap(scores);
    if (alibi_slope != 0.f) alibi(scores, coords, row0, col0, row_shift);
  }
};

}  // namespace jax_flash
