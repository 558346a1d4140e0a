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

}  // namespace jax_flash
