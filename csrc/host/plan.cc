// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
#include "plan.h"

#include <algorithm>
#include <cstdlib>

#include "../common/launch.h"
#include "../decode/tile.h"
#include "../sm80/api.h"

namespace jax_flash {
namespace {

// JAX_FLASH_HEADDIMS defines one JAX_FLASH_HDIM_<d> per compiled head dim.
constexpr int kCompiledHeadDims[] = {
#ifdef JAX_FLASH_HDIM_32
    32,
#endif
#ifdef JAX_FLASH_HDIM_64
    64,
#endif
#ifdef JAX_FLASH_HDIM_96
    96,
#endif
#ifdef JAX_FLASH_HDIM_128
    128,
#endif
#ifdef JAX_FLASH_HDIM_192
    192,
#endif
#ifdef JAX_FLASH_HDIM_256
    256,
#endif
    -1,  // sentinel: keeps the array non-empty in a build with no kernels
};

constexpr int kMaxHeadDim = 256;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

std::string head_dim_list() {
  std::string s = "[";
  for (int d : compiled_head_dims()) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
  return s + "]";
}

// Kernels read rows in 16-byte chunks: the head dim is padded to 8 (with
// zero columns, which add nothing to q.k and give zero output columns), and
// the smallest compiled head dim at least that large serves it.
std::string choose_head_dim(int64_t head_dim, int* padded, int* kernel) {
  if (head_dim < 1 || head_dim > kMaxHeadDim) {
    return "headdim must be in [1, " + std::to_string(kMaxHeadDim) + "], got " +
           std::to_string(head_dim);
  }
  *padded = static_cast<int>(round_up(head_dim, 8));
  *kernel = -1;
  for (int d : compiled_head_dims()) {
    if (d >= *padded) {
      *kernel = d;
      break;
    }
  }
  if (*kernel < 0) {
    return "headdim " + std::to_string(head_dim) +
           " has no compiled kernel in this build (compiled head dims: " + head_dim_list() +
           "; rebuild with JAX_FLASH_HEADDIMS)";
  }
  return "";
}

// JAX_FLASH_FORCE_VARIANT=<name>: every call the named variant covers runs
// on it instead of a cheaper one, as it would in a build without the cheaper
// variants: what a smaller build would cost, timed on one build
// (benchmarks/bench_variants.py). Read once per process. Returns the
// variant's index, -1 when unset, or an error message.
std::string forced_variant(int* index) {
  static const std::string name = [] {
    const char* value = std::getenv("JAX_FLASH_FORCE_VARIANT");
    return std::string(value == nullptr ? "" : value);
  }();
  *index = -1;
  if (name.empty()) return "";
  std::string compiled;
  for (int i = 0; i < kNumVariants; ++i) {
    if (!kVariantCompiled[i]) continue;
    if (name == kVariantNames[i]) {
      *index = i;
      return "";
    }
    compiled += std::string(compiled.empty() ? "" : ", ") + kVariantNames[i];
  }
  return std::string("JAX_FLASH_FORCE_VARIANT must name a compiled variant (one of ") + compiled +
         "), got '" + name + "'";
}

// Where the decode kernels copy K/V tiles with sm_90's copy engine:
// contiguous caches and pages of a multiple of a tile by default (on an
// H100 a tie with cp.async on contiguous caches, 0.5-6% faster on pages of
// 64 and 256; notes entry 59), every page size it serves with
// JAX_FLASH_DECODE_COPY=tma (pages of 16 read up to 15% slower there),
// nowhere with cp_async. Read once per process.
enum class DecodeCopy { kAuto, kEngine, kCpAsync };
DecodeCopy decode_copy_setting() {
  static const DecodeCopy setting = [] {
    const char* value = std::getenv("JAX_FLASH_DECODE_COPY");
    const std::string v = value == nullptr ? "" : value;
    return v == "tma" ? DecodeCopy::kEngine : v == "cp_async" ? DecodeCopy::kCpAsync
                                                             : DecodeCopy::kAuto;
  }();
  return setting;
}

bool decode_copy_engine_serves(int64_t page_size, int block_n) {
  switch (decode_copy_setting()) {
    case DecodeCopy::kCpAsync: return false;
    case DecodeCopy::kEngine: return decode::copy_engine_page_size(page_size, block_n);
    case DecodeCopy::kAuto: return page_size % block_n == 0;  // 0: contiguous
  }
  return false;
}

}  // namespace

const char* name_of(Family family) {
  switch (family) {
    case Family::kSm80: return "sm80";
  }
  return "?";
}

std::vector<const char*> compiled_variants() {
  std::vector<const char*> names;
  for (int i = 0; i < kNumVariants; ++i) {
    if (kVariantCompiled[i]) names.push_back(kVariantNames[i]);
  }
  return names;
}

std::vector<int> compiled_head_dims() {
  std::vector<int> dims;
  for (int d : kCompiledHeadDims) {
    if (d > 0) dims.push_back(d);
  }
  return dims;
}

std::string make_plan(const Problem& pb, Plan* plan) {
  *plan = Plan{};
  plan->family = Family::kSm80;
  const std::string err =
      choose_head_dim(pb.head_dim, &plan->head_dim_padded, &plan->kernel_head_dim);
  if (!err.empty()) return err;
  Features need;
  need.local = pb.local && !pb.segments;  // segment tables carry the window
  need.mods = pb.softcap || pb.alibi;
  need.dropout = pb.dropout;
  need.segs = pb.segments;
  plan->variant = choose_variant(need);
  int forced = -1;
  const std::string forced_err = forced_variant(&forced);
  if (!forced_err.empty()) return forced_err;
  if (forced >= 0 && covers(kVariantFeatures[forced], need)) {
    plan->variant = static_cast<Variant>(forced);
  }
  // Varlen: room for every sequence to start on a tile boundary (params.h).
  plan->dq_tile_rows = bwd::kBwdBlockM;
  const int64_t rows = pb.varlen() ? pb.total_q + pb.batch * bwd::kBwdBlockM : pb.seqlen_q;
  plan->dq_accum_rows = round_up(rows, bwd::kBwdBlockM);
  if (plan->dq_accum_rows > INT32_MAX) {
    return "too many query rows for the backward's dQ accumulator: " +
           std::to_string(plan->dq_accum_rows) + " (at most 2^31 - 1)";
  }
  return "";
}

int64_t dq_tiles(const Problem& pb, const Plan& plan) {
  return (pb.varlen() ? 1 : pb.batch) * pb.nheads * (plan.dq_accum_rows / plan.dq_tile_rows);
}

// Slices give each thread block its own accumulator: enough to fill the GPU
// once (one block per slice, K/V head and batch element), never more than
// there are K/V tiles. Ordering costs a wait per step, slices cost memory
// and, at more than two per head, L2 misses: fwd+bwd d=128 on an H200 took
// 1.07 / 1.08 / 1.17 / 1.21x the atomics path's time with slices and
// 1.17 / 1.13 / 1.12 / 1.13x ordered at seqlen 2048 / 4096 / 8192 / 16384
// (1 / 2 / 4 / 8 slices; notes/kernel_experiments.md, entry 27).
DqMode plan_dq_mode(const Problem& pb, const Plan& plan, int num_sms) {
  DqMode mode;
  if (!pb.deterministic) return mode;
  const int64_t n_blocks = (pb.seqlen_k + bwd::kBwdBlockNMin - 1) / bwd::kBwdBlockNMin;
  const int64_t fill = num_sms / std::max<int64_t>(1, pb.batch * pb.nheads_k);
  mode.splits = static_cast<int>(std::max<int64_t>(1, std::min(n_blocks, fill)));
  // Ordered blocks draw tickets within one grid: no split grids (launch.h).
  const bool one_grid = pb.batch <= kMaxGridYZ && pb.nheads_k <= kMaxGridYZ;
  if (mode.splits > 2 && orders_dq(features_of(plan.variant)) && one_grid) {
    mode.splits = 1;
    mode.ordered = true;
    // One counter per dQ tile, then the blocks' ticket counter.
    mode.semaphore = pb.nheads * (plan.dq_accum_rows / plan.dq_tile_rows) + 1;
  }
  return mode;
}

std::string check_dq_mode(const Problem& pb, const Plan& plan, const DqMode& mode) {
  if (mode.splits < 1 || mode.splits > 65535 || (!pb.deterministic && mode.splits != 1)) {
    return "dq_accum must hold 1 slice, or 1 to 65535 when deterministic; got " +
           std::to_string(mode.splits) + " (deterministic=" + (pb.deterministic ? "1" : "0") + ")";
  }
  if (!mode.ordered) return "";
  const bool one_grid = pb.batch <= kMaxGridYZ && pb.nheads_k <= kMaxGridYZ;
  if (!pb.deterministic || mode.splits != 1 || !orders_dq(features_of(plan.variant)) ||
      !one_grid || mode.semaphore < dq_tiles(pb, plan) + 1) {
    return std::string("a non-empty dq_semaphore needs deterministic=True, one dq_accum slice, ") +
           "the plain kernel (no window, softcap, ALiBi, dropout or segment ids; this call runs '" +
           name_of(plan.variant) + "'), at most 65535 batch elements and K/V heads, and at least " +
           std::to_string(dq_tiles(pb, plan) + 1) + " counters; got " +
           std::to_string(mode.semaphore);
  }
  return "";
}

// ---- kv-cache decode -------------------------------------------------------------

// Split-KV: a decode block costs its tiles plus a fixed overhead (Q load,
// pipeline fill, epilogue; about two tiles' time, kBlockOverheadTiles), and
// a round of resident blocks lasts as long as its busiest SM takes. Most
// tiles are latency-bound: a block reads about as fast beside another on
// its SM as alone, so a round of up to kvcache_blocks_per_sm per SM (from the
// tile's shared memory, 1 KB of it reserved per block by the driver, at
// most 4) takes one block's time. The narrow d = 128 tile on a contiguous
// cache reads about 25 GB/s alone, an H100's share of DRAM per SM: there
// a second block adds no bandwidth, and its rounds hold one block per SM.
// On an H100, 128 such blocks of twice the keys read 2-7% faster than 256
// co-resident ones (2% slower at 8k keys x batch 2); the same rule lost 6%
// at d = 64, 9-14% at d = 192 and up to 14% on pages of 16 or 64 keys
// (notes entries 49, 50), and held an H200 (37 GB/s an SM) to 0.74-0.81x
// cuDNN where two blocks read 0.98x (entry 54). So it takes devices of at
// most kOneBlockGBps an SM; others, and devices of unknown bandwidth, keep
// the resident count. With `blocks` blocks per split and
// `wave` blocks a round, s splits take
//   ceil(blocks * s / wave) rounds x (tiles / s + kBlockOverheadTiles)
// plus a combine pass (kCombineTiles) when s > 1. A ragged last round costs
// a whole round: 64 blocks in 9 splits (576 blocks on 264 slots) take three
// rounds where 8 splits take two. The plan takes the s of least cost among
// those that leave a split at least kMinKeysPerSplit keys of a full-length
// sequence, more splits only for a gain of over 5% (the model is rough: 512
// blocks on 264 slots, 3% idle, are not worth 17 splits). Decode contexts
// are runtime values, so the model assumes full caches: a cache far longer
// than its sequences gets splits that find no keys (a block launch and a
// skip in the combine each).
int kvcache_blocks_per_sm(const KVCachePlan& plan, const DeviceInfo& device,
                          int64_t page_size) {
  constexpr int kReservedSmemPerBlock = 1024;
  constexpr int kMaxBlocksPerSm = 4;
  constexpr int kOneBlockGBps = 28;  // DRAM GB/s per SM that one such block keeps up with
  const int smem =
      decode::decode_smem_bytes(plan.kernel_head_dim, plan.narrow, plan.copy_engine) +
      kReservedSmemPerBlock;
  const int resident = std::clamp(device.smem_per_sm / smem, 1, kMaxBlocksPerSm);
  const bool fills_sm = plan.narrow && plan.kernel_head_dim == 128 && page_size == 0 &&
                        device.dram_gbps > 0 &&
                        device.dram_gbps <= int64_t(kOneBlockGBps) * device.num_sms;
  return fills_sm ? 1 : resident;
}

int kvcache_num_splits(const KVCacheProblem& pb, const KVCachePlan& plan,
                       const DeviceInfo& device) {
  const int64_t tiles = (pb.seqlen_cache + plan.block_n - 1) / plan.block_n;
  const int64_t cap = std::min<int64_t>(decode::kMaxSplits, std::max<int64_t>(1, tiles));
  if (pb.num_splits > 0) return static_cast<int>(std::min(pb.num_splits, cap));
  const int64_t blocks = pb.batch * pb.nheads_k * plan.m_blocks;
  if (blocks == 0 || tiles <= 1) return 1;
  constexpr double kBlockOverheadTiles = 2.0;
  constexpr double kCombineTiles = 1.0;
  constexpr double kMinGain = 0.95;
  const int64_t wave = int64_t(std::max(device.num_sms, 1)) * plan.blocks_per_sm;
  const int64_t by_length =
      std::max<int64_t>(1, tiles * plan.block_n / decode::kMinKeysPerSplit);
  const int64_t most = std::min(by_length, cap);
  int64_t best = 1;
  double best_cost = 0.0;
  for (int64_t s = 1; s <= most; ++s) {
    const int64_t per_split = (tiles + s - 1) / s;
    if (s > 1 && (tiles + per_split - 1) / per_split < s) continue;  // same runs as fewer
    const int64_t rounds = (blocks * s + wave - 1) / wave;
    const double cost = double(rounds) * (double(per_split) + kBlockOverheadTiles) +
                        (s > 1 ? kCombineTiles : 0.0);
    if (s == 1 || cost < kMinGain * best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return static_cast<int>(best);
}

std::string make_kvcache_plan(const KVCacheProblem& pb, const DeviceInfo& device,
                              KVCachePlan* plan) {
  *plan = KVCachePlan{};
  std::string err = choose_head_dim(pb.head_dim, &plan->head_dim_padded, &plan->kernel_head_dim);
  if (!err.empty()) return err;
  if (pb.batch < 0 || pb.seqlen_q < 0 || pb.nheads < 0 || pb.nheads_k < 1 ||
      pb.nheads % pb.nheads_k != 0 || pb.seqlen_cache < 0 || pb.num_splits < 0 ||
      pb.page_size < 0) {
    return "kv-cache sizes must be >= 0 with nheads a multiple of nheads_k >= 1 and "
           "num_splits >= 0; got batch " + std::to_string(pb.batch) + ", seqlen_q " +
           std::to_string(pb.seqlen_q) + ", nheads " + std::to_string(pb.nheads) +
           ", nheads_k " + std::to_string(pb.nheads_k) + ", seqlen_cache " +
           std::to_string(pb.seqlen_cache) + ", num_splits " + std::to_string(pb.num_splits) +
           ", page_size " + std::to_string(pb.page_size);
  }
  // The narrow tile when the rows fit one slab and its shared memory fits
  // the device (sm_86 / sm_89 allow 99 KB a block: the wide tile there
  // above d = 64, as on a device that could not be asked). Its copies: by
  // the copy engine on sm_90 where decode_copy_engine_serves says so, else
  // by cp.async; the two d = 64 tiles differ in stages (decode/tile.h).
  const int64_t rows = pb.nheads / pb.nheads_k * pb.seqlen_q;
  const bool engine = device.cc_major >= 9 &&
                      plan->kernel_head_dim % decode::kBoxColumns == 0 &&
                      pb.head_dim == plan->kernel_head_dim &&
                      decode_copy_engine_serves(pb.page_size, decode::kDecodeBlockN);
  plan->narrow = rows <= decode::kNarrowRows && device.smem_per_block > 0 &&
                 decode::decode_smem_bytes(plan->kernel_head_dim, true, engine) <=
                     device.smem_per_block;
  plan->copy_engine = plan->narrow && engine;
  const decode::DecodeTile tile =
      decode::decode_tile(plan->kernel_head_dim, plan->narrow, plan->copy_engine);
  plan->block_m = tile.block_m;
  plan->block_n = tile.block_n;
  plan->stages = tile.stages;
  plan->m_blocks = std::max<int64_t>(1, (rows + tile.block_m - 1) / tile.block_m);
  plan->blocks_per_sm = kvcache_blocks_per_sm(*plan, device, pb.page_size);
  plan->num_splits = kvcache_num_splits(pb, *plan, device);
  if (plan->num_splits > 1) {
    plan->out_accum_shape = {plan->num_splits, pb.batch, pb.nheads, pb.seqlen_q,
                             plan->head_dim_padded};
    plan->lse_accum_shape = {plan->num_splits, pb.batch, pb.nheads, pb.seqlen_q};
  } else {
    plan->out_accum_shape = {0};
    plan->lse_accum_shape = {0};
  }
  return "";
}

}  // namespace jax_flash
