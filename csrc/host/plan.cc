// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
#include "plan.h"

#include <algorithm>

#include "../common/launch.h"
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

}  // namespace

const char* name_of(Family family) {
  switch (family) {
    case Family::kSm80: return "sm80";
  }
  return "?";
}

std::vector<int> compiled_head_dims() {
  std::vector<int> dims;
  for (int d : kCompiledHeadDims) {
    if (d > 0) dims.push_back(d);
  }
  return dims;
}

std::string make_plan(const Problem& pb, Plan* plan) {
  if (pb.head_dim < 1 || pb.head_dim > kMaxHeadDim) {
    return "headdim must be in [1, " + std::to_string(kMaxHeadDim) + "], got " +
           std::to_string(pb.head_dim);
  }
  *plan = Plan{};
  plan->family = Family::kSm80;
  // Kernels read rows in 16-byte chunks: the head dim is padded to 8 (with
  // zero columns, which add nothing to q.k and give zero output columns).
  plan->head_dim_padded = static_cast<int>(round_up(pb.head_dim, 8));
  plan->kernel_head_dim = -1;
  for (int d : compiled_head_dims()) {
    if (d >= plan->head_dim_padded) {
      plan->kernel_head_dim = d;
      break;
    }
  }
  if (plan->kernel_head_dim < 0) {
    return "headdim " + std::to_string(pb.head_dim) +
           " has no compiled kernel in this build (compiled head dims: " + head_dim_list() +
           "; rebuild with JAX_FLASH_HEADDIMS)";
  }
  Features need;
  need.local = pb.local && !pb.segments;  // segment tables carry the window
  need.mods = pb.softcap || pb.alibi;
  need.dropout = pb.dropout;
  need.segs = pb.segments;
  plan->variant = choose_variant(need);
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

}  // namespace jax_flash
