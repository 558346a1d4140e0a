// Host check of the decode kernels' shared-memory layout (csrc/decode/
// tile.h, traits.h), for every compiled head dim and both tiles, and for
// the copy engine's unit-major layout: the chunk map is a bijection into
// each buffer (for the copy engine, the 128-byte swizzle's own map); every
// ldmatrix lane address (Q, K, V maps, each 16-column step, slabs at
// multiples of 16 rows) lands on the (row, chunk) the fragment layout
// names; the eight rows of each 8x8 matrix fall in eight different 16-byte
// bank groups (no bank conflicts); and rows whose head dim allows it are
// unpadded, so that every 32-byte global sector lands on an aligned
// 32-byte piece of shared memory. Prints one line per (head dim, tile,
// copy) and exits 1 on any violation. tests/test_decode_layout.py compiles
// and runs it.
#include <cuda_fp16.h>

#include <cstdio>
#include <set>

#include "decode/traits.h"

using namespace jax_flash::decode;

// Byte offset of (row, chunk) in Q (kQ) or a K/V tile, from the buffer's start.
template <typename T, bool kQ>
int offset(int row, int chunk) {
  constexpr int kUnit = kQ ? T::kQUnitBytes : T::kKVUnitBytes;
  return row * T::kRowPitch + T::template chunk_offset<kUnit>(row, chunk);
}

// Where sm_90's copy engine puts (row, chunk) of a box of 64 columns with
// the 128-byte swizzle, in its own terms: address bits 4-6 XOR bits 7-9 of
// the unswizzled offset, the box at a multiple of 1024 bytes.
int copy_engine_offset(int unit_bytes, int row, int chunk) {
  const int linear = row * 128 + (chunk % 8) * 16;
  return unit_bytes * (chunk / 8) + (linear ^ (((linear >> 7) & 7) << 4));
}

template <int kHeadDim, bool kNarrow, bool kCopyEngine = false>
int check() {
  using T = DecodeTraits<__half, kHeadDim, kNarrow, kCopyEngine>;
  int bad = 0;
  // Chunks of distinct (row, chunk) land on distinct 16-byte slots inside
  // the buffer; a 32-byte sector (chunks 2j, 2j + 1) stays one aligned
  // 32-byte piece where rows are unpadded.
  for (const bool q : {true, false}) {
    const int rows = q ? T::kBlockM : T::kBlockN;
    std::set<int> seen;
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < T::kChunks; ++c) {
        const int o = q ? offset<T, true>(r, c) : offset<T, false>(r, c);
        if (o < 0 || o + 16 > rows * T::kRowBytes || o % 16 != 0 || !seen.insert(o).second) ++bad;
        if (decode_smem_swizzled(kHeadDim) && c % 2 == 0 &&
            o / 32 != (q ? offset<T, true>(r, c + 1) : offset<T, false>(r, c + 1)) / 32) {
          ++bad;
        }
        if (kCopyEngine &&
            o != copy_engine_offset(q ? T::kQUnitBytes : T::kKVUnitBytes, r, c)) {
          ++bad;
        }
      }
    }
  }
  if (decode_smem_swizzled(kHeadDim) != (T::kRowBytes == 2 * kHeadDim)) ++bad;
  for (int slab = 0; slab < T::kBlockN; slab += 16) {
    for (int step = 0; step < T::kChunks / 2; ++step) {
      for (int op = 0; op < 3; ++op) {
        if (op == 0 && slab >= T::kBlockM) continue;
        std::set<int> groups[4];  // per 8x8 matrix: bank groups of its eight rows
        for (int lane = 0; lane < 32; ++lane) {
          const int m = lane / 8, r = lane % 8;
          int row, chunk, addr, want;
          if (op == 0) {
            row = r + 8 * (m & 1), chunk = 2 * step + (m >> 1);
            addr = T::q_lane_row(lane) + T::q_lane_col(lane, step);
            want = offset<T, true>(slab + row, chunk);
          } else if (op == 1) {
            row = r + 8 * (m >> 1), chunk = 2 * step + (m & 1);
            addr = T::k_lane_row(lane) + T::k_lane_col(lane, step);
            want = offset<T, false>(slab + row, chunk);
          } else {
            row = r + 8 * (m & 1), chunk = 2 * step + (m >> 1);
            addr = T::v_lane_row(lane) + T::v_lane_col(lane, step);
            want = offset<T, false>(slab + row, chunk);
          }
          addr += slab * T::kRowPitch;
          if (addr != want) ++bad;
          if (!groups[m].insert(addr / 16 % 8).second) ++bad;
        }
      }
    }
  }
  std::printf("head_dim=%d narrow=%d row_bytes=%d stages=%d smem=%d copy_engine=%d %s\n",
              kHeadDim, kNarrow, T::kRowBytes, T::kStages, T::kSmemBytes, kCopyEngine,
              bad ? "FAIL" : "ok");
  return bad;
}

int main() {
  const int bad = check<32, false>() + check<32, true>() + check<64, false>() +
                  check<64, true>() + check<96, false>() + check<96, true>() +
                  check<128, false>() + check<128, true>() + check<192, false>() +
                  check<192, true>() + check<256, false>() + check<256, true>() +
                  check<64, true, true>() + check<128, true, true>() +
                  check<192, true, true>() + check<256, true, true>();
  return bad ? 1 : 0;
}
