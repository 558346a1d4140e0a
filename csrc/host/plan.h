// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The kernel plan: for one attention call, which kernel family, compiled head
// dim and variant run it, and the scratch the backward pass needs. It is
// decided here and nowhere else: the nanobind module exports make_plan and
// plan_dq_mode to Python, which sizes the custom call's outputs from them,
// and the FFI handlers check the buffers they receive against the same plan.
// Plain C++ (no CUDA, no CuTe), so it compiles fast and tests on any host.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../common/variants.h"

namespace jax_flash {

enum class Dtype { kFloat16, kBFloat16 };

// Kernel families. sm80 (mma.sync) runs on every supported GPU; a Hopper
// (wgmma/TMA) family would be added here and chosen by the plan.
enum class Family { kSm80 };
const char* name_of(Family family);

// What one call asks for. Varlen: batch is the number of sequences,
// seqlen_q/k their maximum lengths, total_q the rows of q's packed buffer.
struct Problem {
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, nheads = 0, nheads_k = 0, head_dim = 0;
  int64_t total_q = -1;  // varlen: rows of the packed q buffer; -1: fixed layout
  bool local = false;    // a window (causal included); ignored with segment ids
  bool softcap = false, alibi = false, dropout = false, segments = false;
  bool deterministic = false;

  bool varlen() const { return total_q >= 0; }
};

struct Plan {
  Family family = Family::kSm80;
  int head_dim_padded = 0;  // head_dim rounded up to 8: what the kernels read
  int kernel_head_dim = 0;  // the compiled head dim that serves it
  Variant variant = Variant::kFull;
  // Backward: the float32 dQ accumulator is (splits, nheads, dq_accum_rows,
  // kernel_head_dim) per batch element (one such block for varlen, whose
  // sequences start on tile boundaries of it: common/params.h).
  int64_t dq_accum_rows = 0;
  int dq_tile_rows = 0;  // rows of one dQ tile; dq_accum_rows is a multiple
};

// The plan for a problem, or an error message (an unsupported or uncompiled
// head dim). Everything but the deterministic backward's dQ mode.
std::string make_plan(const Problem& problem, Plan* plan);

// How the deterministic backward orders its dQ additions.
struct DqMode {
  int splits = 1;        // accumulator slices (one per thread block of a head)
  bool ordered = false;  // one slice; K/V tiles add in turn (counters)
  int64_t semaphore = 0; // int32 counters per batch element (fixed) or in all (varlen)
};

// Chooses the dQ mode for a device with num_sms multiprocessors: the atomics
// path (one slice) unless deterministic; then ordered where the variant
// allows it and slicing would take more than two slices, else slices.
DqMode plan_dq_mode(const Problem& problem, const Plan& plan, int num_sms);

// Checks a dQ mode the backward handler was given (its scratch shapes): the
// ordered mode only where plan_dq_mode could choose it, slices only when
// deterministic. Returns an error message, or empty.
std::string check_dq_mode(const Problem& problem, const Plan& plan, const DqMode& mode);

// dQ tiles of the accumulator over the whole call (ordered mode's counters,
// before the ticket counter that follows them).
int64_t dq_tiles(const Problem& problem, const Plan& plan);

// Head dims with compiled kernels, ascending.
std::vector<int> compiled_head_dims();

// Names of the variants this build compiled (JAX_FLASH_VARIANTS), cheapest first.
std::vector<const char*> compiled_variants();

// ---- flash_attn_with_kvcache: the split-KV decode kernels (csrc/decode/) ----

// One kv-cache call. seqlen_cache: logical positions per sequence (paged:
// max_blocks_per_seq * page_size); num_splits: the caller's request, 0 for
// the automatic choice.
struct KVCacheProblem {
  int64_t batch = 0, seqlen_q = 0, nheads = 0, nheads_k = 0, head_dim = 0;
  int64_t seqlen_cache = 0;
  int64_t num_splits = 0;
  int64_t page_size = 0;  // keys per page of a paged cache; 0: contiguous
};

// What the device offers the split heuristic.
struct DeviceInfo {
  int num_sms = 0;
  int smem_per_sm = 0;     // bytes of shared memory per multiprocessor
  int smem_per_block = 0;  // bytes one block may opt in to; 0: unknown (the wide tile)
  int dram_gbps = 0;       // peak DRAM bandwidth, GB/s; 0: unknown
  int cc_major = 0;        // compute capability's major number; 0: unknown
};

struct KVCachePlan {
  int head_dim_padded = 0;  // head_dim rounded up to 8: what the kernel reads
  int kernel_head_dim = 0;  // the compiled head dim that serves it
  bool narrow = false;      // the tile (decode/tile.h): one 16-row slab, deeper pipeline
  int block_m = 0;          // query rows per thread block
  int block_n = 0;          // keys per K/V tile
  int stages = 0;           // K/V tiles in shared memory
  int64_t m_blocks = 0;     // row blocks per K/V head: ceil(nheads / nheads_k * seqlen_q / block_m)
  int num_splits = 1;       // thread blocks per (sequence, K/V head, row block)
  int blocks_per_sm = 1;    // blocks a SM in the split model's rounds (kvcache_blocks_per_sm)
  // K/V tiles by sm_90's copy engine (decode/tma.h): narrow tiles of a
  // compiled head dim that is a multiple of 64 on devices of compute
  // capability 9 and up; contiguous caches and pages of a multiple of a
  // tile, or (JAX_FLASH_DECODE_COPY, plan.cc) every page it serves or none.
  bool copy_engine = false;
  // Scratch of num_splits > 1, float32 (empty (0,) otherwise): each split's
  // normalised output (num_splits, batch, nheads, seqlen_q, head_dim_padded)
  // and LSE (num_splits, batch, nheads, seqlen_q).
  std::vector<int64_t> out_accum_shape, lse_accum_shape;
};

// The plan of a kv-cache call on a device, or an error message (an
// uncompiled head dim). Splits: the request clamped into [1, min(kMaxSplits,
// K/V tiles)], or chosen by kvcache_num_splits.
std::string make_kvcache_plan(const KVCacheProblem& problem, const DeviceInfo& device,
                              KVCachePlan* plan);

// The blocks a SM holds at once in the split model's rounds: as many as the
// tile's shared memory allows (at most 4), or one where a block alone keeps
// up with the SM's share of DRAM (plan.cc says which).
int kvcache_blocks_per_sm(const KVCachePlan& plan, const DeviceInfo& device, int64_t page_size);

// The automatic split count, from a cost model of the memory-bound kernel
// (plan.cc says why): the fewest rounds of blocks times each block's tiles
// plus a fixed overhead, at least decode::kMinKeysPerSplit keys per split
// of a full cache, every split of a full cache the same number of tiles;
// rounds of plan.blocks_per_sm blocks a SM.
int kvcache_num_splits(const KVCacheProblem& problem, const KVCachePlan& plan,
                       const DeviceInfo& device);

}  // namespace jax_flash
