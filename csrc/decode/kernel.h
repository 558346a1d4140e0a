// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The split-KV decode kernel of flash_attn_with_kvcache: memory-bound
// attention of a few query rows against a long (paged or contiguous) cache.
//
// Grid (num_splits * m_blocks, nheads_k, batch): a block takes one sequence,
// one K/V head, up to kBlockM of that head's query rows (the group's query
// heads x seqlen_q rows, decode/sequence.h) and one split's K/V tiles, so
// a split's K/V bytes are read once for all those rows (more than kBlockM
// rows read them again per row block, adjacent in the grid: mostly from
// L2). Per tile:
//
//   copy         K, V tile (kBlockN keys) -> shared, kStages - 1 tiles ahead:
//                cp.async by every thread, or (sm_90, Traits::kCopyEngine)
//                bulk tensor copies issued by warp 0 on a barrier a stage
//   S = Q K^T    mma.sync m16n8k16, one 16-row slab x 16 keys per warp step
//   mask, mods   scale, softcap, ALiBi, window / left padding (softmax.h)
//   softmax      online, per warp (running max and sum in float32)
//   O += P V     P rounded to the input dtype, V read transposed by ldmatrix
//
// Warps split the keys when the rows are few: one slab (<= 16 rows, the
// usual decode) gives each warp 16 keys of a tile; two slabs, 32 keys; four,
// the whole tile. Each warp keeps its own softmax state and the epilogue
// merges the warps of a slab through shared memory (as splits merge by
// LSE), so the main loop has no block barrier besides the pipeline's.
//
// Tensor cores rather than FMA: reading K and V costs 4 * head_dim bytes a
// key, the math 4 * head_dim FLOP per key and query row, so at the H200's
// 4.8 TB/s R rows need R * 4.8 TFLOP/s. Float32 FMA (67 TFLOP/s peak, and
// each product needs a conversion and a shuffle besides) stops keeping up
// near 14 rows, and even 4 rows (32 / 8 heads, one token) would spend a
// large share of the issue slots the copies need. A 16-row MMA slab costs
// the same for 1 to 16 rows: 77 TFLOP/s at 16 rows, a quarter of what our
// mma.sync forward sustains; at 64 rows (MQA, or GQA with several query
// tokens) the MMAs approach that rate and the kernel turns compute-bound.
#pragma once

#include <cmath>

#include "params.h"
#include "ptx.h"
#include "sequence.h"
#include "softmax.h"
#include "tma.h"
#include "traits.h"

namespace jax_flash::decode {

// ---- Global -> shared ------------------------------------------------------------
// Q rows [row0, row0 + kBlockM) of K/V head hk; rows past the group's and
// columns past head_dim are zero-filled (they add nothing to S).
template <typename Traits>
__device__ __forceinline__ void copy_q(const DecodeParams& p, int b, int hk, int row0,
                                       uint32_t sQ) {
  using Element = typename Traits::Element;
  const Element* q = static_cast<const Element*>(p.q_ptr);
  const int rows = p.group * p.seqlen_q;
#pragma unroll
  for (int it = 0; it < Traits::kQCopies; ++it) {
    const int idx = threadIdx.x + it * Traits::kNThreads;
    if (Traits::kQChunks % Traits::kNThreads != 0 && idx >= Traits::kQChunks) break;
    const int r = idx / Traits::kChunks, chunk = idx % Traits::kChunks;
    const int m = row0 + r;
    const bool valid = m < rows && chunk * 8 < p.head_dim;
    int64_t offset = 0;
    if (valid) {
      const int i = m / p.group, head = hk * p.group + m % p.group;
      offset = ((int64_t(b) * p.seqlen_q + i) * p.nheads + head) * p.head_dim + chunk * 8;
    }
    cp_async_16(sQ + r * Traits::kRowPitch +
                    Traits::template chunk_offset<Traits::kQUnitBytes>(r, chunk),
                q + offset, valid);
  }
}

// K and V rows of `tile` into one stage. Keys outside [key_begin, key_end)
// (another sequence's tiles never are: tiles are this sequence's) and
// columns past head_dim are zero-filled and never addressed, so clamped
// lengths and tables bound every read. s_rows: the tile's cache rows staged
// by PageRows (pages shorter than a tile), or nullptr to look them up here.
template <typename Traits>
__device__ __forceinline__ void copy_kv_tile(const DecodeParams& p, const SequenceInfo& seq,
                                             int tile, uint32_t sK, uint32_t sV,
                                             const int64_t* s_rows) {
  using Element = typename Traits::Element;
  const Element* k = static_cast<const Element*>(p.k_ptr);
  const Element* v = static_cast<const Element*>(p.v_ptr);
  const int key0 = tile * Traits::kBlockN;
  // key0 < key_end <= seqlen_cache: a valid position to look its page up by.
  const int64_t first_row = seq.tile_in_one_page ? seq.cache_row(p, key0) : 0;
  // Unrolled by 4, not fully: four iterations' table reads still overlap,
  // and ptxas keeps d=256 at 241 registers without spills (full unrolling
  // hoisted all 16 rows' addresses: 255 registers and 48 B of spills).
#pragma unroll 4
  for (int it = 0; it < Traits::kKVCopies; ++it) {
    const int idx = threadIdx.x + it * Traits::kNThreads;
    const int r = idx / Traits::kChunks, chunk = idx % Traits::kChunks;
    const int key = key0 + r;
    const bool valid = key >= seq.key_begin && key < seq.key_end && chunk * 8 < p.head_dim;
    int64_t offset = 0;
    if (valid) {
      const int64_t row = seq.tile_in_one_page ? first_row + r
                          : s_rows != nullptr  ? s_rows[r]
                                               : seq.cache_row(p, key);
      offset = row * p.cache_row_stride + seq.head_offset + chunk * 8;
    }
    const int dst =
        r * Traits::kRowPitch + Traits::template chunk_offset<Traits::kKVUnitBytes>(r, chunk);
    cp_async_16(sK + dst, k + offset, valid);
    cp_async_16(sV + dst, v + offset, valid);
  }
}

// Pages shorter than a tile put a table read on the path of every key
// row's copy. Instead the first kBlockN threads each take one key of the
// tile after next: load() issues its block_table read before the block
// computes a tile, store() writes the key's cache row into shared memory
// after it (the read has landed by then), and the next barrier publishes
// the rows to the copy that needs them.
struct PageRows {
  int page = 0;     // block_table entry (clamped on store)
  int in_page = 0;  // key % page_size
  bool valid = false;

  template <int kBlockN>
  __device__ __forceinline__ void load(const DecodeParams& p, const SequenceInfo& seq, int tile) {
    const int key = tile * kBlockN + threadIdx.x;
    // key < key_end <= seqlen_cache: the table read stays in its row.
    valid = threadIdx.x < kBlockN && key >= seq.key_begin && key < seq.key_end;
    if (valid) {
      page = seq.table[key / p.page_size];
      in_page = key % p.page_size;
    }
  }

  template <int kBlockN>
  __device__ __forceinline__ void store(const DecodeParams& p, int64_t* s_rows) const {
    if (threadIdx.x < kBlockN) {
      s_rows[threadIdx.x] =
          valid ? int64_t(clamp_int(page, 0, p.num_pages - 1)) * p.page_size + in_page : 0;
    }
  }
};

// ---- K/V tiles by the copy engine (sm_90; decode/tma.h) --------------------------
// Warp 0 copies a tile into a stage: lane j takes its piece j of box_rows
// keys (one page lookup) and copies it for every 64-column unit of K and V,
// after lane 0 told the stage's barrier how many bytes all lanes' pieces
// bring. Pieces with no key in [key_begin, key_end) are not copied (their
// page may not exist); the rest of a tile's keys outside it are zeroed
// once it landed (zero_outside).
template <typename Traits>
__device__ __forceinline__ void engine_copy_tile(const DecodeParams& p, const DecodeMaps& maps,
                                                 const SequenceInfo& seq, int tile, uint32_t sK,
                                                 uint32_t sV, uint32_t bar) {
  constexpr int kUnits = Traits::kHeadDim / kBoxColumns;
  const int lane = threadIdx.x % 32;
  const int key = tile * Traits::kBlockN + lane * p.box_rows;
  const bool mine = lane * p.box_rows < Traits::kBlockN && key < seq.key_end &&
                    key + p.box_rows > seq.key_begin;
  const unsigned pieces = __ballot_sync(0xffffffffu, mine);
  if (lane == 0) {
    mbarrier_arrive_expect_tx(bar, __popc(pieces) * p.box_rows * Traits::kHeadDim * 2 *
                                       int(sizeof(typename Traits::Element)));
  }
  if (!mine) return;
  // key < key_end <= seqlen_cache: the page lookup stays in the table's row.
  const int row = static_cast<int>(seq.cache_row(p, key));
  const int offset = lane * p.box_rows * Traits::kRowPitch;
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {
    const int column = static_cast<int>(seq.head_offset) + u * kBoxColumns;
    tma_load_2d(sK + u * Traits::kKVUnitBytes + offset, &maps.k, bar, column, row);
    tma_load_2d(sV + u * Traits::kKVUnitBytes + offset, &maps.v, bar, column, row);
  }
}

// V rows of a landed tile whose keys lie outside [key_begin, key_end): the
// copy brought another sequence's rows, stale ones (pieces not copied) or
// the zeros past the cache there; P is 0 at those keys (their scores are
// masked whatever K holds) and V must be finite for 0 * V to be 0.
template <typename Traits>
__device__ __forceinline__ void zero_outside(const SequenceInfo& seq, int key0, uint32_t sV) {
  for (int idx = threadIdx.x; idx < Traits::kBlockN * Traits::kChunks; idx += Traits::kNThreads) {
    const int r = idx / Traits::kChunks, chunk = idx % Traits::kChunks;
    if (key0 + r >= seq.key_begin && key0 + r < seq.key_end) continue;
    const uint32_t dst = sV + r * Traits::kRowPitch +
                         Traits::template chunk_offset<Traits::kKVUnitBytes>(r, chunk);
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0) : "memory");
  }
  // The copy engine writes this stage again later.
  fence_proxy_async_shared();
}

// ---- One warp step: 16 rows x 16 keys ------------------------------------------
// q_row, k_row, v_row: the shared addresses of this lane's ldmatrix rows
// (traits.h) in the warp's Q slab and at the step's first key in the
// stage's K and V tiles; key0: the logical position of that key.
template <typename Traits>
__device__ __forceinline__ void attend_step(float (&acc_o)[Traits::kDTiles][4],
                                            OnlineSoftmax& softmax, uint32_t q_row,
                                            uint32_t k_row, uint32_t v_row, int key0,
                                            const RowBounds (&rows)[2], const ScoreMods& mods,
                                            int lane) {
  using Element = typename Traits::Element;
  // S = Q K^T: two n8 tiles (keys 0-7, 8-15 of the step), float32.
  float s[2][4] = {};
#pragma unroll
  for (int kk = 0; kk < Traits::kKSteps; ++kk) {
    uint32_t a[4], b[4];
    ldmatrix_x4(a, q_row + Traits::q_lane_col(lane, kk));
    ldmatrix_x4(b, k_row + Traits::k_lane_col(lane, kk));
    mma_16816<Element>(s[0], a, b[0], b[1]);
    mma_16816<Element>(s[1], a, b[2], b[3]);
  }
  // Scores in log2 units; keys a row may not see at -inf.
  const int t = lane % 4;
#pragma unroll
  for (int n = 0; n < 2; ++n) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s[n][j] = mods(s[n][j], key0 + 8 * n + 2 * t + (j & 1), rows[j >> 1]);
    }
  }
  softmax.update(s, acc_o);
  // P as the A operand: the two n8 accumulator tiles are exactly one m16k16
  // A tile's registers (keys 2t, 2t+1 | 8+2t, 9+2t; rows g | g+8).
  const uint32_t pa[4] = {pack2<Element>(s[0][0], s[0][1]), pack2<Element>(s[0][2], s[0][3]),
                          pack2<Element>(s[1][0], s[1][1]), pack2<Element>(s[1][2], s[1][3])};
  // O += P V, 16 output columns per ldmatrix.
#pragma unroll
  for (int dd = 0; dd < Traits::kDTiles / 2; ++dd) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, v_row + Traits::v_lane_col(lane, dd));
    mma_16816<Element>(acc_o[2 * dd], pa, b[0], b[1]);
    mma_16816<Element>(acc_o[2 * dd + 1], pa, b[2], b[3]);
  }
}

// ---- Epilogue --------------------------------------------------------------------
// Merges the warps of each slab (max, sum and O rescaled to the slab's max,
// like splits by LSE) and writes the block's rows: o and lse when the call
// has one split, else this split's normalised O and LSE into the scratch.
// `smem` is the K/V stage area, free once every warp left the main loop.
template <typename Traits>
__device__ __forceinline__ void write_rows(const DecodeParams& p, int b, int hk, int split,
                                           int row0, int block_rows, int warps_n,
                                           const float (&acc_o)[Traits::kDTiles][4],
                                           OnlineSoftmax& softmax, char* smem) {
  using Element = typename Traits::Element;
  constexpr float kLn2 = 0.6931471805599453f;
  constexpr int kStride = Traits::kMergeRowFloats;
  float* s_o = reinterpret_cast<float*>(smem);              // (warp, 16, kStride)
  float* s_max = s_o + Traits::kNWarps * 16 * kStride;      // (warp, 16)
  float* s_sum = s_max + Traits::kNWarps * 16;              // (warp, 16)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  // ---- Each warp's rows -> shared ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(softmax.row_sum[r]);
    const int row = warp * 16 + g + 8 * r;
    if (t == 0) {
      s_max[row] = softmax.row_max[r];
      s_sum[row] = sum;
    }
#pragma unroll
    for (int d = 0; d < Traits::kDTiles; ++d) {
      *reinterpret_cast<float2*>(s_o + row * kStride + d * 8 + 2 * t) =
          make_float2(acc_o[d][2 * r], acc_o[d][2 * r + 1]);
    }
  }
  __syncthreads();

  // ---- Merge, normalise, store: 4 columns per thread and pass ----
  constexpr int kQuads = Traits::kHeadDim / 4;
  for (int idx = threadIdx.x; idx < block_rows * kQuads; idx += Traits::kNThreads) {
    const int br = idx / kQuads, col = (idx % kQuads) * 4;
    if (col >= p.head_dim) continue;
    const int slab = br / 16, r = br % 16;
    float max = -INFINITY;
    for (int wn = 0; wn < warps_n; ++wn) max = fmaxf(max, s_max[(slab * warps_n + wn) * 16 + r]);
    float sum = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    if (max != -INFINITY) {
      for (int wn = 0; wn < warps_n; ++wn) {
        const int row = (slab * warps_n + wn) * 16 + r;
        // A warp that saw no key of this row has max -inf: factor 0.
        const float scale = exp2_approx(s_max[row] - max);
        sum += s_sum[row] * scale;
        const float4 part = *reinterpret_cast<const float4*>(s_o + row * kStride + col);
        o.x += part.x * scale;
        o.y += part.y * scale;
        o.z += part.z * scale;
        o.w += part.w * scale;
      }
      // sum >= 1: the max's own term is exp2(0).
      const float inv = 1.f / sum;
      o.x *= inv;
      o.y *= inv;
      o.z *= inv;
      o.w *= inv;
    }
    const bool empty = max == -INFINITY;
    const float lse = empty ? 0.f : (max + log2f(sum)) * kLn2;
    const int m = row0 + br;
    const int i = m / p.group, head = hk * p.group + m % p.group;
    const int64_t lse_row = (int64_t(b) * p.nheads + head) * p.seqlen_q + i;
    if (p.num_splits == 1) {
      Element* out = static_cast<Element*>(p.o_ptr) +
                     ((int64_t(b) * p.seqlen_q + i) * p.nheads + head) * p.head_dim + col;
      *reinterpret_cast<uint2*>(out) =
          make_uint2(pack2<Element>(o.x, o.y), pack2<Element>(o.z, o.w));
      // No visible key: out 0 and LSE +inf, the reference's convention.
      if (col == 0) p.lse_ptr[lse_row] = empty ? INFINITY : lse;
    } else {
      const int64_t split_row = int64_t(split) * p.batch * p.nheads * p.seqlen_q + lse_row;
      *reinterpret_cast<float4*>(p.o_accum_ptr + split_row * p.head_dim + col) = o;
      // A split that saw nothing weighs exp(-inf) = 0 in the combine.
      if (col == 0) p.lse_accum_ptr[split_row] = empty ? -INFINITY : lse;
    }
  }
}

// ---- The kernel ------------------------------------------------------------------
template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads)
    decode_kernel(const DecodeParams p, const __grid_constant__ DecodeMaps maps) {
  constexpr int kBlockN = Traits::kBlockN, kBlockM = Traits::kBlockM, kStages = Traits::kStages;
  extern __shared__ __align__(1024) char smem[];

  // ---- Tile scheduler: which split, rows, K/V head and sequence ----
  // Blocks of one split are adjacent (x = split * m_blocks + row block), so
  // the row blocks reading the same keys run together and share them in L2.
  const int split = blockIdx.x / p.m_blocks;
  const int m_block = blockIdx.x % p.m_blocks;
  const int hk = blockIdx.y + p.grid_head0;
  const int b = blockIdx.z + p.grid_batch0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const int row0 = m_block * kBlockM;
  const int block_rows = min(kBlockM, p.group * p.seqlen_q - row0);
  const SequenceInfo seq(p, b, hk, split, row0, block_rows, kBlockN);
  // Warps over (16-row slabs) x (keys of a tile); block-uniform.
  const int warps_m = block_rows <= 16 ? 1 : block_rows <= 32 ? 2 : 4;
  const int warps_n = Traits::kNWarps / warps_m;
  const int slab = warp / warps_n, wn = warp % warps_n;
  const int keys_per_warp = kBlockN / warps_n;

  // ---- Shared memory ----
  const uint32_t s_q = smem_address(smem);
  const uint32_t s_kv = s_q + Traits::kStagesOffset;
  auto s_k = [&](int stage) { return s_kv + stage * Traits::kStageBytes; };
  auto s_v = [&](int stage) { return s_kv + stage * Traits::kStageBytes + Traits::kTileBytes; };
  int64_t* s_rows_base = reinterpret_cast<int64_t*>(smem + Traits::kQBytes);
  auto s_rows = [&](int n) { return s_rows_base + (n % 2) * kBlockN; };
  // Copy engine: one barrier a stage where the page rows would be.
  auto s_bar = [&](int stage) { return s_q + Traits::kQBytes + 8 * stage; };
  constexpr bool kEngine = Traits::kCopyEngine;
#ifndef JAX_FLASH_DECODE_COPY_ENGINE
  if constexpr (kEngine) __trap();  // never launched before sm_90 (decode/launch.h)
#endif

  // ---- Prologue: Q, then the first kStages - 1 tiles, one group each ----
  // Groups are committed even when empty, so that the wait below counts
  // tiles the same way in every block. With pages shorter than a tile
  // (block-uniform) a narrow tile stages the rows of tile kStages - 1 here,
  // those of each later tile one iteration ahead (PageRows); a wide tile
  // looks them up in its copies.
  const int n_tiles = seq.tile_end - seq.tile_begin;
  const bool stage_rows = Traits::kStagePageRows && !seq.tile_in_one_page;
  if constexpr (kEngine) {
    if (threadIdx.x == 0) {
      // The swizzle follows shared addresses: boxes must start at multiples
      // of 1024 bytes (traits.h keeps them there from an aligned base).
      if (s_kv % 1024 != 0) __trap();
      prefetch_tensor_map(&maps.k);
      prefetch_tensor_map(&maps.v);
      for (int stage = 0; stage < kStages; ++stage) mbarrier_init(s_bar(stage), 1);
      fence_proxy_async_shared();
    }
    __syncthreads();
  }
  copy_q<Traits>(p, b, hk, row0, s_q);
  if constexpr (kEngine) {
    cp_async_commit();
    if (warp == 0) {
      for (int stage = 0; stage < kStages - 1 && stage < n_tiles; ++stage) {
        engine_copy_tile<Traits>(p, maps, seq, seq.tile_begin + stage, s_k(stage), s_v(stage),
                                 s_bar(stage));
      }
    }
    cp_async_wait<0>();  // Q; the loop's first barrier shows it to every warp
  } else {
#pragma unroll
    for (int stage = 0; stage < kStages - 1; ++stage) {
      if (stage < n_tiles) {
        copy_kv_tile<Traits>(p, seq, seq.tile_begin + stage, s_k(stage), s_v(stage), nullptr);
      }
      cp_async_commit();
    }
  }
  PageRows page_rows;
  if (stage_rows && kStages - 1 < n_tiles) {
    page_rows.load<kBlockN>(p, seq, seq.tile_begin + kStages - 1);
    page_rows.store<kBlockN>(p, s_rows(kStages - 1));
  }

  // ---- This thread's rows: g and g + 8 of its warp's slab ----
  const RowBounds rows[2] = {
      row_bounds(p, seq, b, hk, row0 + slab * 16 + lane / 4),
      row_bounds(p, seq, b, hk, row0 + slab * 16 + lane / 4 + 8)};
  const ScoreMods mods(p);
  OnlineSoftmax softmax;
  float acc_o[Traits::kDTiles][4];
#pragma unroll
  for (int d = 0; d < Traits::kDTiles; ++d) {
    acc_o[d][0] = acc_o[d][1] = acc_o[d][2] = acc_o[d][3] = 0.f;
  }
  const uint32_t q_row = s_q + slab * 16 * Traits::kRowPitch + Traits::q_lane_row(lane);

  // ---- Main loop over the split's tiles ----
  for (int n = 0; n < n_tiles; ++n) {
    // Tile n (and Q) landed; every warp is done with tile n - 1's stage and
    // the staged rows of tile n + kStages - 1 are visible.
    const int stage = n % kStages;
    const int tile_key0 = (seq.tile_begin + n) * kBlockN;
    const int next = n + kStages - 1;
    bool stage_after = false;
    if constexpr (kEngine) {
      mbarrier_wait(s_bar(stage), (n / kStages) & 1);
      if (tile_key0 < seq.key_begin || tile_key0 + kBlockN > seq.key_end) {
        zero_outside<Traits>(seq, tile_key0, s_v(stage));
      }
      __syncthreads();
      if (warp == 0 && next < n_tiles) {
        engine_copy_tile<Traits>(p, maps, seq, seq.tile_begin + next, s_k(next % kStages),
                                 s_v(next % kStages), s_bar(next % kStages));
      }
    } else {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      if (next < n_tiles) {
        copy_kv_tile<Traits>(p, seq, seq.tile_begin + next, s_k(next % kStages),
                             s_v(next % kStages), stage_rows ? s_rows(next) : nullptr);
      }
      cp_async_commit();
      stage_after = stage_rows && next + 1 < n_tiles;
      if (stage_after) page_rows.load<kBlockN>(p, seq, seq.tile_begin + next + 1);
    }

    for (int step = 0; step < keys_per_warp / 16; ++step) {
      const int key = wn * keys_per_warp + step * 16;  // in the tile
      attend_step<Traits>(acc_o, softmax, q_row,
                          s_k(stage) + key * Traits::kRowPitch + Traits::k_lane_row(lane),
                          s_v(stage) + key * Traits::kRowPitch + Traits::v_lane_row(lane),
                          tile_key0 + key, rows, mods, lane);
    }
    // The buffer's last reader was the copy of iteration n - 1, before this
    // iteration's barrier.
    if (stage_after) page_rows.store<kBlockN>(p, s_rows(next + 1));
  }

  // ---- Epilogue ----
  // The combine (launch.h) may take the SM slots this block's last reads
  // leave; it waits for this grid's writes before reading them.
  launch_dependents();
  // No copy may still land in the stages the epilogue reuses.
  cp_async_wait<0>();
  __syncthreads();
  write_rows<Traits>(p, b, hk, split, row0, block_rows, warps_n, acc_o, softmax,
                     smem + Traits::kStagesOffset);
}

}  // namespace jax_flash::decode
