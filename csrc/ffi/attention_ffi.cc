// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// XLA FFI handlers: validate the buffers XLA hands over, fill AttnParams,
// launch. Nothing here allocates device memory, synchronises the stream or
// exits; every failure is an ffi::Error that JAX raises in Python.
#include "attention_ffi.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../fwd/api.h"
#include "../params.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash {
namespace {

namespace ffi = xla::ffi;

std::string ShapeString(ffi::Span<const int64_t> dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + (dims.size() == 1 ? ",)" : ")");
}

// (..., seqlen, heads, head_dim): every leading dim folds into the batch, which
// is how vmap (vmap_method="broadcast_all") reaches the kernel.
struct Bshd {
  int64_t batch = 1, seqlen = 0, heads = 0, head_dim = 0;
};

ffi::Error ReadBshd(const char* name, ffi::AnyBuffer buf, Bshd* out) {
  const auto dims = buf.dimensions();
  if (dims.size() < 4) {
    return ffi::Error::InvalidArgument(std::string(name) +
                                       " must have rank >= 4 (batch..., seqlen, heads, "
                                       "head_dim), got shape " + ShapeString(dims));
  }
  const size_t r = dims.size();
  out->batch = 1;
  for (size_t i = 0; i + 3 < r; ++i) out->batch *= dims[i];
  out->seqlen = dims[r - 3];
  out->heads = dims[r - 2];
  out->head_dim = dims[r - 1];
  return ffi::Error::Success();
}

ffi::Error AttnFwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                       ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::Buffer<ffi::F32>> lse, float softmax_scale,
                       int32_t window_left, int32_t window_right) {
  const auto dtype = q.element_type();
  if (dtype != ffi::F16 && dtype != ffi::BF16) {
    return ffi::Error::InvalidArgument("q must be float16 or bfloat16");
  }
  if (k.element_type() != dtype || v.element_type() != dtype ||
      out->element_type() != dtype) {
    return ffi::Error::InvalidArgument("q, k, v and out must share one dtype");
  }
  Bshd sq, sk, sv;
  if (auto e = ReadBshd("q", q, &sq); e.failure()) return e;
  if (auto e = ReadBshd("k", k, &sk); e.failure()) return e;
  if (auto e = ReadBshd("v", v, &sv); e.failure()) return e;
  if (sk.batch != sq.batch || sv.batch != sq.batch || sk.seqlen != sv.seqlen ||
      sk.heads != sv.heads || sk.head_dim != sq.head_dim || sv.head_dim != sq.head_dim) {
    return ffi::Error::InvalidArgument(
        "expected k and v of shape (batch..., seqlen_k, nheads_k, head_dim) matching q " +
        ShapeString(q.dimensions()) + ", got k " + ShapeString(k.dimensions()) + " and v " +
        ShapeString(v.dimensions()));
  }
  if (sk.heads == 0 || sq.heads % sk.heads != 0) {
    return ffi::Error::InvalidArgument("nheads (" + std::to_string(sq.heads) +
                                       ") must be a multiple of nheads_k (" +
                                       std::to_string(sk.heads) + ")");
  }
  if (sq.head_dim % 8 != 0 || fwd::kernel_head_dim(sq.head_dim) < 0) {
    return ffi::Error::InvalidArgument(
        "head_dim " + std::to_string(sq.head_dim) +
        " has no compiled kernel (needs a multiple of 8 up to the largest compiled head dim)");
  }
  if (out->dimensions().size() != q.dimensions().size() ||
      out->element_count() != q.element_count()) {
    return ffi::Error::InvalidArgument("out must have q's shape " +
                                       ShapeString(q.dimensions()));
  }
  if (lse->element_count() != static_cast<size_t>(sq.batch * sq.heads * sq.seqlen)) {
    return ffi::Error::InvalidArgument("lse must have shape (batch..., nheads, seqlen_q)");
  }
  // K/V tiles are addressed with 32-bit offsets inside a tile.
  if (sk.heads * sk.head_dim >= (int64_t{1} << 24)) {
    return ffi::Error::InvalidArgument("nheads_k * head_dim must be < 2^24, got " +
                                       std::to_string(sk.heads * sk.head_dim));
  }
  // Grid y/z limits.
  if (sq.batch > 65535 || sq.heads > 65535) {
    return ffi::Error::InvalidArgument("batch and nheads must be <= 65535, got batch " +
                                       std::to_string(sq.batch) + " and nheads " +
                                       std::to_string(sq.heads));
  }
  if (sq.batch == 0 || sq.seqlen == 0 || sq.heads == 0) return ffi::Error::Success();

  AttnParams p;
  p.q_ptr = q.untyped_data();
  p.k_ptr = k.untyped_data();
  p.v_ptr = v.untyped_data();
  p.o_ptr = out->untyped_data();
  p.lse_ptr = lse->typed_data();
  // Dense row-major buffers, as XLA hands them to custom calls.
  p.q_head_stride = sq.head_dim;
  p.q_row_stride = sq.heads * sq.head_dim;
  p.q_batch_stride = sq.seqlen * p.q_row_stride;
  p.k_head_stride = p.v_head_stride = sk.head_dim;
  p.k_row_stride = p.v_row_stride = sk.heads * sk.head_dim;
  p.k_batch_stride = p.v_batch_stride = sk.seqlen * p.k_row_stride;
  p.o_head_stride = p.q_head_stride;
  p.o_row_stride = p.q_row_stride;
  p.o_batch_stride = p.q_batch_stride;
  p.batch = static_cast<int>(sq.batch);
  p.seqlen_q = static_cast<int>(sq.seqlen);
  p.seqlen_k = static_cast<int>(sk.seqlen);
  p.nheads = static_cast<int>(sq.heads);
  p.nheads_k = static_cast<int>(sk.heads);
  p.head_dim = static_cast<int>(sq.head_dim);
  p.h_per_hk = p.nheads / p.nheads_k;
  p.softmax_scale = softmax_scale;
  p.softmax_scale_log2 = softmax_scale * 1.4426950408889634f;  // log2(e)
  p.window_left = window_left;
  p.window_right = window_right;

  const auto kind = dtype == ffi::F16 ? fwd::Dtype::kFloat16 : fwd::Dtype::kBFloat16;
  const cudaError_t err = fwd::run_fwd(kind, p, stream);
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_flash forward kernel launch failed: ") +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnFwd, AttnFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q (batch..., seqlen_q, nheads, d)
                                  .Arg<ffi::AnyBuffer>()  // k (batch..., seqlen_k, nheads_k, d)
                                  .Arg<ffi::AnyBuffer>()  // v (batch..., seqlen_k, nheads_k, d)
                                  .Ret<ffi::AnyBuffer>()  // out, q's shape
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse (batch..., nheads, seqlen_q)
                                  .Attr<float>("softmax_scale")
                                  .Attr<int32_t>("window_left")    // -1: unbounded
                                  .Attr<int32_t>("window_right"),  // -1: unbounded; causal: 0
                              {ffi::Traits::kCmdBufferCompatible});

int CompiledHeadDimFor(int head_dim) { return fwd::kernel_head_dim(head_dim); }

}  // namespace jax_flash
