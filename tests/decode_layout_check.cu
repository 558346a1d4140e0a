// Host check of the decode kernels' shared-memory layout (csrc/decode/
// tile.h, traits.h), for every compiled head dim and both tiles: the copy's
// chunk map is a bijection into each row; every ldmatrix lane address (Q, K,
// V maps, each 16-column step, slabs at multiples of 16 rows) lands on the
// (row, chunk) the fragment layout names; the eight rows of each 8x8 matrix
// fall in eight different 16-byte bank groups (no bank conflicts); and rows
// whose head dim allows it are unpadded, so that every 32-byte global sector
// lands on an aligned 32-byte piece of shared memory. Prints one line per
// (head dim, tile) and exits 1 on any violation. tests/test_decode_layout.py
// compiles and runs it.
#include <cuda_fp16.h>

#include <cstdio>
#include <set>

#include "decode/traits.h"

using namespace jax_flash::decode;

template <int kHeadDim, bool kNarrow>
int check() {
  using T = DecodeTraits<__half, kHeadDim, kNarrow>;
  int bad = 0;
  for (int r = 0; r < T::kBlockN; ++r) {
    std::set<int> seen;
    for (int c = 0; c < T::kChunks; ++c) {
      const int o = T::chunk_offset(r, c);
      if (o < 0 || o + 16 > T::kRowBytes || o % 16 != 0 || !seen.insert(o).second) ++bad;
      // A 32-byte sector (chunks 2j, 2j + 1) stays one aligned 32-byte piece.
      if (decode_smem_swizzled(kHeadDim) && c % 2 == 0 &&
          ((r * T::kRowBytes + o) / 32 != (r * T::kRowBytes + T::chunk_offset(r, c + 1)) / 32)) {
        ++bad;
      }
    }
  }
  if (decode_smem_swizzled(kHeadDim) != (T::kRowBytes == 2 * kHeadDim)) ++bad;
  for (int slab = 0; slab < T::kBlockN; slab += 16) {
    for (int step = 0; step < T::kChunks / 2; ++step) {
      for (int op = 0; op < 3; ++op) {
        std::set<int> groups[4];  // per 8x8 matrix: bank groups of its eight rows
        for (int lane = 0; lane < 32; ++lane) {
          const int m = lane / 8, r = lane % 8;
          int row, chunk, addr;
          if (op == 0) {
            row = r + 8 * (m & 1), chunk = 2 * step + (m >> 1);
            addr = T::q_lane_row(lane) + T::q_lane_col(lane, step);
          } else if (op == 1) {
            row = r + 8 * (m >> 1), chunk = 2 * step + (m & 1);
            addr = T::k_lane_row(lane) + T::k_lane_col(lane, step);
          } else {
            row = r + 8 * (m & 1), chunk = 2 * step + (m >> 1);
            addr = T::v_lane_row(lane) + T::v_lane_col(lane, step);
          }
          addr += slab * T::kRowBytes;
          const int want = (slab + row) * T::kRowBytes + T::chunk_offset(slab + row, chunk);
          if (addr != want) ++bad;
          if (!groups[m].insert(addr / 16 % 8).second) ++bad;
        }
      }
    }
  }
  std::printf("head_dim=%d narrow=%d row_bytes=%d stages=%d smem=%d %s\n", kHeadDim, kNarrow,
              T::kRowBytes, T::kStages, T::kSmemBytes, bad ? "FAIL" : "ok");
  return bad;
}

int main() {
  const int bad = check<32, false>() + check<32, true>() + check<64, false>() +
                  check<64, true>() + check<96, false>() + check<96, true>() +
                  check<128, false>() + check<128, true>() + check<192, false>() +
                  check<192, true>() + check<256, false>() + check<256, true>();
  return bad ? 1 : 0;
}
