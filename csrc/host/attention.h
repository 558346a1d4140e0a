// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The host entry points of the attention custom calls, free of XLA types: the
// FFI layer (csrc/ffi/) turns XLA's buffers and attributes into these plain
// structs and calls them. Each one validates its operands against the plan
// (host/plan.h), fills the kernel parameters and launches on `stream`.
// Nothing here allocates device memory, synchronises or exits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace jax_flash {

enum class ElementType { kF16, kBF16, kF32, kU32, kS32, kU8, kOther };

// A dense row-major device buffer.
struct Tensor {
  void* data = nullptr;
  ElementType type = ElementType::kOther;
  std::vector<int64_t> dims;

  int64_t size() const;  // elements
};

// How q, k and v arrive: three arrays, q + one kv (batch..., seqlen_k, 2,
// nheads_k, d) array, or one qkv (batch..., seqlen, 3, nheads, d) array. The
// kernels read and write packed buffers in place.
enum class Packing { kNone, kKv, kQkv };

// The attributes of every attention call (see jax_flash/_src/cuda.py).
struct ScoreAttrs {
  float softmax_scale = 1.f;
  int32_t window_left = -1, window_right = -1;  // -1: unbounded; causal: right = 0
  float softcap = 0.f;                          // 0: off
  float dropout_p = 0.f;                        // 0: off
  int32_t dropout_threshold = 0;                // round(dropout_p * 65536)
  int32_t max_seqlen_q = 0, max_seqlen_k = 0;   // varlen only
  bool deterministic = false;                   // backward only
};

// Operands every attention call takes after its arrays, each empty when off:
// alibi_slopes float32 (batch..., nheads); rng uint32 (batch..., 4);
// cu_seqlens_q/k int32 (batch + 1,); seg_q/seg_k int32 (batch..., seqlen, 4)
// segment tables (common/params.h).
struct Optional {
  Tensor alibi, rng, cu_seqlens_q, cu_seqlens_k, seg_q, seg_k;
};

// "(2, 3)", "(4,)": a shape for error messages.
std::string ShapeString(const std::vector<int64_t>& dims);

struct Status {
  enum Code { kOk, kInvalidArgument, kInternal } code = kOk;
  std::string message;

  bool ok() const { return code == kOk; }
  static Status Invalid(std::string m) { return {kInvalidArgument, std::move(m)}; }
};

// inputs: (q, k, v), (q, kv) or (qkv) per packing. Writes out (q's logical
// shape) and lse (batch..., nheads, seqlen_q) or (nheads, total_q) for varlen.
Status attention_fwd(Packing packing, const std::vector<Tensor>& inputs, const Optional& opt,
                     const ScoreAttrs& attrs, const Tensor& out, const Tensor& lse,
                     cudaStream_t stream);

// inputs as above; grads in the inputs' layout (dq, dk, dv / dq, dkv / dqkv);
// scratch: dq_accum float32, softmax_d float32 (lse's layout), dq_semaphore
// int32, shaped from the plan (empty semaphore: no ordered mode).
Status attention_bwd(Packing packing, const std::vector<Tensor>& inputs, const Tensor& out,
                     const Tensor& lse, const Tensor& d_out, const Optional& opt,
                     const ScoreAttrs& attrs, const std::vector<Tensor>& grads,
                     const Tensor& dq_accum, const Tensor& softmax_d,
                     const Tensor& dq_semaphore, cudaStream_t stream);

// rng uint32 (batch..., 4) -> keep uint8 (batch..., nheads, seqlen_q, seqlen_k):
// the dropout mask the attention kernels draw.
Status dropout_mask(const Tensor& rng, int32_t dropout_threshold, const Tensor& keep,
                    cudaStream_t stream);

}  // namespace jax_flash
