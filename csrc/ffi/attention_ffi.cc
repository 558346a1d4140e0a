// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// XLA FFI handlers: validate the buffers XLA hands over, fill AttnParams,
// launch. Nothing here allocates device memory, synchronises the stream or
// exits; every failure is an ffi::Error that JAX raises in Python.
#include "attention_ffi.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../bwd/api.h"
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

// Validates q, k, v (dtype, shapes, head ratio, head dim) and fills the
// sizes and dense row-major strides of AttnParams. Every handler starts here.
ffi::Error SetQkv(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, AttnParams* p) {
  const auto dtype = q.element_type();
  if (dtype != ffi::F16 && dtype != ffi::BF16) {
    return ffi::Error::InvalidArgument("q must be float16 or bfloat16");
  }
  if (k.element_type() != dtype || v.element_type() != dtype) {
    return ffi::Error::InvalidArgument("q, k and v must share one dtype");
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
  p->q_ptr = q.untyped_data();
  p->k_ptr = k.untyped_data();
  p->v_ptr = v.untyped_data();
  // Dense row-major buffers, as XLA hands them to custom calls.
  p->q_head_stride = sq.head_dim;
  p->q_row_stride = sq.heads * sq.head_dim;
  p->q_batch_stride = sq.seqlen * p->q_row_stride;
  p->k_head_stride = p->v_head_stride = sk.head_dim;
  p->k_row_stride = p->v_row_stride = sk.heads * sk.head_dim;
  p->k_batch_stride = p->v_batch_stride = sk.seqlen * p->k_row_stride;
  p->o_head_stride = p->q_head_stride;
  p->o_row_stride = p->q_row_stride;
  p->o_batch_stride = p->q_batch_stride;
  p->batch = static_cast<int>(sq.batch);
  p->seqlen_q = static_cast<int>(sq.seqlen);
  p->seqlen_k = static_cast<int>(sk.seqlen);
  p->nheads = static_cast<int>(sq.heads);
  p->nheads_k = static_cast<int>(sk.heads);
  p->head_dim = static_cast<int>(sq.head_dim);
  p->h_per_hk = p->nheads / p->nheads_k;
  return ffi::Error::Success();
}

void SetScoreOptions(float softmax_scale, int32_t window_left, int32_t window_right,
                     AttnParams* p) {
  p->softmax_scale = softmax_scale;
  p->softmax_scale_log2 = softmax_scale * 1.4426950408889634f;  // log2(e)
  p->window_left = window_left;
  p->window_right = window_right;
}

ffi::Error SameShape(const char* name, ffi::AnyBuffer buf, ffi::AnyBuffer like,
                     const char* like_name) {
  const auto a = buf.dimensions(), b = like.dimensions();
  bool same = a.size() == b.size() && buf.element_type() == like.element_type();
  for (size_t i = 0; same && i < a.size(); ++i) same = a[i] == b[i];
  if (!same) {
    return ffi::Error::InvalidArgument(std::string(name) + " must have " + like_name +
                                       "'s shape " + ShapeString(b) + " and dtype, got " +
                                       ShapeString(a));
  }
  return ffi::Error::Success();
}

fwd::Dtype KernelDtype(ffi::AnyBuffer q) {
  return q.element_type() == ffi::F16 ? fwd::Dtype::kFloat16 : fwd::Dtype::kBFloat16;
}

ffi::Error LaunchError(const char* what, cudaError_t err) {
  return ffi::Error::Internal(std::string("jax_flash ") + what +
                              " kernel launch failed: " + cudaGetErrorString(err));
}

ffi::Error AttnFwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                       ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::Buffer<ffi::F32>> lse, float softmax_scale,
                       int32_t window_left, int32_t window_right) {
  AttnParams p;
  if (auto e = SetQkv(q, k, v, &p); e.failure()) return e;
  if (auto e = SameShape("out", *out, q, "q"); e.failure()) return e;
  if (lse->element_count() != size_t(p.batch) * p.nheads * p.seqlen_q) {
    return ffi::Error::InvalidArgument("lse must have shape (batch..., nheads, seqlen_q)");
  }
  if (p.batch == 0 || p.seqlen_q == 0 || p.nheads == 0) return ffi::Error::Success();
  p.o_ptr = out->untyped_data();
  p.lse_ptr = lse->typed_data();
  SetScoreOptions(softmax_scale, window_left, window_right, &p);
  const cudaError_t err = fwd::run_fwd(KernelDtype(q), p, stream);
  return err == cudaSuccess ? ffi::Error::Success() : LaunchError("forward", err);
}

ffi::Error AttnBwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                       ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::Buffer<ffi::F32> lse,
                       ffi::AnyBuffer d_out, ffi::Result<ffi::AnyBuffer> dq,
                       ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                       ffi::Result<ffi::Buffer<ffi::F32>> dq_accum,
                       ffi::Result<ffi::Buffer<ffi::F32>> softmax_d,
                       ffi::Result<ffi::Buffer<ffi::S32>> dq_semaphore, float softmax_scale,
                       int32_t window_left, int32_t window_right, bool deterministic) {
  AttnBwdParams p;
  if (auto e = SetQkv(q, k, v, &p); e.failure()) return e;
  if (auto e = SameShape("out", out, q, "q"); e.failure()) return e;
  if (auto e = SameShape("d_out", d_out, q, "q"); e.failure()) return e;
  if (auto e = SameShape("dq", *dq, q, "q"); e.failure()) return e;
  if (auto e = SameShape("dk", *dk, k, "k"); e.failure()) return e;
  if (auto e = SameShape("dv", *dv, v, "v"); e.failure()) return e;
  const size_t rows = size_t(p.batch) * p.nheads * p.seqlen_q;
  const size_t m_blocks = (p.seqlen_q + bwd::kBwdBlockM - 1) / bwd::kBwdBlockM;
  if (lse.element_count() != rows || softmax_d->element_count() != rows) {
    return ffi::Error::InvalidArgument(
        "lse and softmax_d must have shape (batch..., nheads, seqlen_q)");
  }
  if (dq_accum->element_count() != rows * p.head_dim) {
    return ffi::Error::InvalidArgument("dq_accum must have shape (batch..., seqlen_q, nheads, " +
                                       std::to_string(p.head_dim) + ")");
  }
  if (dq_semaphore->element_count() != size_t(p.batch) * p.nheads * m_blocks) {
    return ffi::Error::InvalidArgument("dq_semaphore must have batch * nheads * " +
                                       std::to_string(m_blocks) + " elements");
  }
  if (p.batch == 0 || p.nheads == 0 || p.seqlen_k == 0 || p.seqlen_q == 0) {
    // Nothing attends: every gradient is zero.
    for (auto* g : {&dq, &dk, &dv}) {
      const cudaError_t err = cudaMemsetAsync((*g)->untyped_data(), 0, (*g)->size_bytes(), stream);
      if (err != cudaSuccess) return LaunchError("backward", err);
    }
    return ffi::Error::Success();
  }
  p.o_ptr = const_cast<void*>(out.untyped_data());
  p.lse_ptr = lse.typed_data();
  p.do_ptr = d_out.untyped_data();
  p.dq_ptr = dq->untyped_data();
  p.dk_ptr = dk->untyped_data();
  p.dv_ptr = dv->untyped_data();
  p.do_batch_stride = p.dq_batch_stride = p.q_batch_stride;
  p.do_row_stride = p.dq_row_stride = p.q_row_stride;
  p.do_head_stride = p.dq_head_stride = p.q_head_stride;
  p.dk_batch_stride = p.dv_batch_stride = p.k_batch_stride;
  p.dk_row_stride = p.dv_row_stride = p.k_row_stride;
  p.dk_head_stride = p.dv_head_stride = p.k_head_stride;
  p.dq_accum_ptr = dq_accum->typed_data();
  p.softmax_d_ptr = softmax_d->typed_data();
  p.dq_semaphore_ptr = dq_semaphore->typed_data();
  p.deterministic = deterministic;
  SetScoreOptions(softmax_scale, window_left, window_right, &p);
  const cudaError_t err = bwd::run_bwd(KernelDtype(q), p, stream);
  return err == cudaSuccess ? ffi::Error::Success() : LaunchError("backward", err);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnBwd, AttnBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()           // q
                                  .Arg<ffi::AnyBuffer>()           // k
                                  .Arg<ffi::AnyBuffer>()           // v
                                  .Arg<ffi::AnyBuffer>()           // out (forward output)
                                  .Arg<ffi::Buffer<ffi::F32>>()    // lse (forward)
                                  .Arg<ffi::AnyBuffer>()           // d_out
                                  .Ret<ffi::AnyBuffer>()           // dq, q's shape
                                  .Ret<ffi::AnyBuffer>()           // dk, k's shape
                                  .Ret<ffi::AnyBuffer>()           // dv, v's shape
                                  .Ret<ffi::Buffer<ffi::F32>>()    // scratch: dq_accum
                                  .Ret<ffi::Buffer<ffi::F32>>()    // scratch: softmax_d
                                  .Ret<ffi::Buffer<ffi::S32>>()    // scratch: dq_semaphore
                                  .Attr<float>("softmax_scale")
                                  .Attr<int32_t>("window_left")
                                  .Attr<int32_t>("window_right")
                                  .Attr<bool>("deterministic"),
                              {ffi::Traits::kCmdBufferCompatible});

int CompiledHeadDimFor(int head_dim) { return fwd::kernel_head_dim(head_dim); }

}  // namespace jax_flash
