// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// XLA FFI handlers: decode the buffers and attributes XLA hands over into the
// host layer's plain structs (host/attention.h), call it, and turn its status
// into an ffi::Error that JAX raises in Python (buffers.h). Nothing else
// happens here.
#include "attention_ffi.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../host/attention.h"
#include "../host/plan.h"
#include "buffers.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash {
namespace {

namespace ffi = xla::ffi;

// Operands [first, first + n) as Tensors.
ffi::Error ReadArgs(const ffi::RemainingArgs& args, size_t first, size_t n,
                    std::vector<Tensor>* out) {
  for (size_t i = first; i < first + n; ++i) {
    auto buf = args.get<ffi::AnyBuffer>(i);
    if (buf.has_error()) return buf.error();
    out->push_back(TensorOf(*buf));
  }
  return ffi::Error::Success();
}

ffi::Error ReadRets(const ffi::RemainingRets& rets, size_t n, std::vector<Tensor>* out) {
  for (size_t i = 0; i < n; ++i) {
    auto buf = rets.get<ffi::AnyBuffer>(i);
    if (buf.has_error()) return buf.error();
    out->push_back(TensorOf(**buf));
  }
  return ffi::Error::Success();
}

// The attributes of every attention call; `deterministic` in the backward.
ffi::Error ReadAttrs(const ffi::Dictionary& d, bool backward, ScoreAttrs* a) {
  ffi::Error e = ffi::Error::Success();
  if ((e = GetAttr(d, "softmax_scale", &a->softmax_scale)).failure() ||
      (e = GetAttr(d, "window_left", &a->window_left)).failure() ||
      (e = GetAttr(d, "window_right", &a->window_right)).failure() ||
      (e = GetAttr(d, "softcap", &a->softcap)).failure() ||
      (e = GetAttr(d, "dropout_p", &a->dropout_p)).failure() ||
      (e = GetAttr(d, "dropout_threshold", &a->dropout_threshold)).failure() ||
      (e = GetAttr(d, "max_seqlen_q", &a->max_seqlen_q)).failure() ||
      (e = GetAttr(d, "max_seqlen_k", &a->max_seqlen_k)).failure()) {
    return e;
  }
  if (backward) return GetAttr(d, "deterministic", &a->deterministic);
  return ffi::Error::Success();
}

// alibi_slopes, rng, cu_seqlens_q, cu_seqlens_k, seg_q, seg_k, from `first`.
constexpr size_t kNumOptional = 6;
ffi::Error ReadOptional(const ffi::RemainingArgs& args, size_t first, Optional* o) {
  std::vector<Tensor> t;
  if (auto e = ReadArgs(args, first, kNumOptional, &t); e.failure()) return e;
  *o = Optional{t[0], t[1], t[2], t[3], t[4], t[5]};
  return ffi::Error::Success();
}

constexpr size_t NumInputs(Packing packing) {
  return packing == Packing::kQkv ? 1 : packing == Packing::kKv ? 2 : 3;
}

ffi::Error CheckCounts(const ffi::RemainingArgs& args, size_t num_args,
                       const ffi::RemainingRets& rets, size_t num_rets) {
  if (args.size() != num_args || rets.size() != num_rets) {
    return ffi::Error::InvalidArgument(
        "expected " + std::to_string(num_args) + " operands and " + std::to_string(num_rets) +
        " results, got " + std::to_string(args.size()) + " and " + std::to_string(rets.size()));
  }
  return ffi::Error::Success();
}

// Operands: the packing's q/k/v buffers, then the optional operands.
// Results: out, lse.
template <Packing kPacking>
ffi::Error AttnFwdImpl(cudaStream_t stream, ffi::RemainingArgs args, ffi::RemainingRets rets,
                       ffi::Dictionary attrs) {
  constexpr size_t n = NumInputs(kPacking);
  if (auto e = CheckCounts(args, n + kNumOptional, rets, 2); e.failure()) return e;
  std::vector<Tensor> inputs, results;
  Optional opt;
  ScoreAttrs a;
  if (auto e = ReadArgs(args, 0, n, &inputs); e.failure()) return e;
  if (auto e = ReadOptional(args, n, &opt); e.failure()) return e;
  if (auto e = ReadRets(rets, 2, &results); e.failure()) return e;
  if (auto e = ReadAttrs(attrs, /*backward=*/false, &a); e.failure()) return e;
  return ToError(attention_fwd(kPacking, inputs, opt, a, results[0], results[1], stream));
}

// Operands: the packing's q/k/v buffers, out, lse, d_out, then the optional
// operands. Results: the gradients in the inputs' layout, then the scratch
// dq_accum, softmax_d and dq_semaphore.
template <Packing kPacking>
ffi::Error AttnBwdImpl(cudaStream_t stream, ffi::RemainingArgs args, ffi::RemainingRets rets,
                       ffi::Dictionary attrs) {
  constexpr size_t n = NumInputs(kPacking);
  if (auto e = CheckCounts(args, n + 3 + kNumOptional, rets, n + 3); e.failure()) return e;
  std::vector<Tensor> inputs, saved, results;
  Optional opt;
  ScoreAttrs a;
  if (auto e = ReadArgs(args, 0, n, &inputs); e.failure()) return e;
  if (auto e = ReadArgs(args, n, 3, &saved); e.failure()) return e;  // out, lse, d_out
  if (auto e = ReadOptional(args, n + 3, &opt); e.failure()) return e;
  if (auto e = ReadRets(rets, n + 3, &results); e.failure()) return e;
  if (auto e = ReadAttrs(attrs, /*backward=*/true, &a); e.failure()) return e;
  const std::vector<Tensor> grads(results.begin(), results.begin() + n);
  return ToError(attention_bwd(kPacking, inputs, saved[0], saved[1], saved[2], opt, a, grads,
                               results[n], results[n + 1], results[n + 2], stream));
}

ffi::Error DropoutMaskImpl(cudaStream_t stream, ffi::AnyBuffer rng, int32_t dropout_threshold,
                           ffi::Result<ffi::AnyBuffer> keep) {
  return ToError(dropout_mask(TensorOf(rng), dropout_threshold, TensorOf(*keep), stream));
}

auto AttentionBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .RemainingArgs()
      .RemainingRets()
      .Attrs<ffi::Dictionary>();
}

}  // namespace

// q (batch..., seqlen_q, nheads, d), k/v (batch..., seqlen_k, nheads_k, d),
// kv (batch..., seqlen_k, 2, nheads_k, d), qkv (batch..., seqlen, 3, nheads, d).
XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnFwd, AttnFwdImpl<Packing::kNone>, AttentionBinding(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnFwdKvpacked, AttnFwdImpl<Packing::kKv>, AttentionBinding(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnFwdQkvpacked, AttnFwdImpl<Packing::kQkv>, AttentionBinding(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnBwd, AttnBwdImpl<Packing::kNone>, AttentionBinding(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnBwdKvpacked, AttnBwdImpl<Packing::kKv>, AttentionBinding(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnBwdQkvpacked, AttnBwdImpl<Packing::kQkv>, AttentionBinding(),
                              {ffi::Traits::kCmdBufferCompatible});

// rng (batch..., 4) uint32 -> keep (batch..., nheads, seqlen_q, seqlen_k) uint8.
XLA_FFI_DEFINE_HANDLER_SYMBOL(DropoutMask, DropoutMaskImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int32_t>("dropout_threshold")
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_flash
