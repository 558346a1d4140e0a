// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// XLA FFI handlers: validate the buffers XLA hands over, fill AttnParams,
// launch. Nothing here allocates device memory, synchronises the stream or
// exits; every failure is an ffi::Error that JAX raises in Python.
#include "attention_ffi.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "../bwd/api.h"
#include "../dropout_mask.h"
#include "../fwd/api.h"
#include "../params.h"
#include "../varlen.h"
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

// One of q, k, v, out or a gradient as the kernels see it: a base pointer and
// element strides. A packed buffer (qkv or kv) gives one view per slot, so
// the kernels read and write the packed layout directly, with no slicing or
// concatenation copies around the custom call.
struct View {
  void* ptr = nullptr;
  ffi::DataType dtype = ffi::DataType::INVALID;
  int64_t batch = 1, seqlen = 0, heads = 0, head_dim = 0;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
  std::string shape;  // of the whole buffer, for error messages
};

// Unpacked (packs == 0): (batch..., seqlen, heads, head_dim). Packed:
// (batch..., seqlen, packs, heads, head_dim), viewed at index `slot` of the
// packs axis. Every leading dim folds into the batch, which is how vmap
// (vmap_method="broadcast_all") reaches the kernel.
ffi::Error ReadView(const char* name, const ffi::AnyBuffer& buf, int packs, int slot,
                    View* v) {
  const auto dims = buf.dimensions();
  const size_t tail = packs ? 4 : 3;  // dims after the batch dims
  v->shape = ShapeString(dims);
  if (dims.size() < tail + 1) {
    return ffi::Error::InvalidArgument(
        std::string(name) + " must have rank >= " + std::to_string(tail + 1) +
        (packs ? " (batch..., seqlen, " + std::to_string(packs) + ", heads, head_dim)"
               : std::string(" (batch..., seqlen, heads, head_dim)")) +
        ", got shape " + v->shape);
  }
  const size_t lead = dims.size() - tail;
  if (packs && dims[lead + 1] != packs) {
    return ffi::Error::InvalidArgument(std::string(name) + " must have " +
                                       std::to_string(packs) + " at axis " +
                                       std::to_string(lead + 1) + ", got shape " + v->shape);
  }
  v->batch = 1;
  for (size_t i = 0; i < lead; ++i) v->batch *= dims[i];
  v->seqlen = dims[lead];
  v->heads = dims[dims.size() - 2];
  v->head_dim = dims[dims.size() - 1];
  v->dtype = buf.element_type();
  v->head_stride = v->head_dim;
  v->row_stride = (packs ? packs : 1) * v->heads * v->head_dim;
  v->batch_stride = v->seqlen * v->row_stride;
  const int64_t elem_bytes = (v->dtype == ffi::F16 || v->dtype == ffi::BF16) ? 2 : 0;
  v->ptr = static_cast<char*>(buf.untyped_data()) + slot * v->heads * v->head_dim * elem_bytes;
  return ffi::Error::Success();
}

// `v` must have the logical shape and dtype of `like`.
ffi::Error SameView(const char* name, const View& v, const char* like_name, const View& like) {
  if (v.dtype != like.dtype || v.batch != like.batch || v.seqlen != like.seqlen ||
      v.heads != like.heads || v.head_dim != like.head_dim) {
    return ffi::Error::InvalidArgument(std::string(name) + " " + v.shape +
                                       " must match the shape and dtype of " + like_name + " " +
                                       like.shape);
  }
  return ffi::Error::Success();
}

// Copies a view's pointer and strides into the AttnParams fields of one operand.
template <typename Ptr>
void SetOperand(const View& v, Ptr* ptr, int64_t* batch_stride, int64_t* row_stride,
                int64_t* head_stride) {
  *ptr = v.ptr;
  *batch_stride = v.batch_stride;
  *row_stride = v.row_stride;
  *head_stride = v.head_stride;
}

// Validates q, k, v (dtype, shapes, head ratio, head dim) and fills the
// sizes and strides of AttnParams. Every handler starts here.
ffi::Error SetQkv(const View& q, const View& k, const View& v, AttnParams* p) {
  const auto dtype = q.dtype;
  if (dtype != ffi::F16 && dtype != ffi::BF16) {
    return ffi::Error::InvalidArgument("q must be float16 or bfloat16");
  }
  if (k.dtype != dtype || v.dtype != dtype) {
    return ffi::Error::InvalidArgument("q, k and v must share one dtype");
  }
  if (k.batch != q.batch || v.batch != q.batch || k.seqlen != v.seqlen || k.heads != v.heads ||
      k.head_dim != q.head_dim || v.head_dim != q.head_dim) {
    return ffi::Error::InvalidArgument(
        "expected k and v of shape (batch..., seqlen_k, nheads_k, head_dim) matching q " +
        q.shape + ", got k " + k.shape + " and v " + v.shape);
  }
  if (k.heads == 0 || q.heads % k.heads != 0) {
    return ffi::Error::InvalidArgument("nheads (" + std::to_string(q.heads) +
                                       ") must be a multiple of nheads_k (" +
                                       std::to_string(k.heads) + ")");
  }
  if (q.head_dim % 8 != 0 || fwd::kernel_head_dim(q.head_dim) < 0) {
    return ffi::Error::InvalidArgument(
        "head_dim " + std::to_string(q.head_dim) +
        " has no compiled kernel (needs a multiple of 8 up to the largest compiled head dim)");
  }
  // Tiles are addressed with 32-bit offsets inside a tile.
  for (const View* x : {&q, &k, &v}) {
    if (x->row_stride >= (int64_t{1} << 24)) {
      return ffi::Error::InvalidArgument(
          "the row stride of q/k/v (heads * head_dim, times 2 or 3 when packed) must be < "
          "2^24, got " + std::to_string(x->row_stride));
    }
  }
  // Grid y/z limits.
  if (q.batch > 65535 || q.heads > 65535) {
    return ffi::Error::InvalidArgument("batch and nheads must be <= 65535, got batch " +
                                       std::to_string(q.batch) + " and nheads " +
                                       std::to_string(q.heads));
  }
  SetOperand(q, &p->q_ptr, &p->q_batch_stride, &p->q_row_stride, &p->q_head_stride);
  SetOperand(k, &p->k_ptr, &p->k_batch_stride, &p->k_row_stride, &p->k_head_stride);
  SetOperand(v, &p->v_ptr, &p->v_batch_stride, &p->v_row_stride, &p->v_head_stride);
  p->batch = static_cast<int>(q.batch);
  p->seqlen_q = static_cast<int>(q.seqlen);
  p->seqlen_k = static_cast<int>(k.seqlen);
  p->nheads = static_cast<int>(q.heads);
  p->nheads_k = static_cast<int>(k.heads);
  p->head_dim = static_cast<int>(q.head_dim);
  p->h_per_hk = p->nheads / p->nheads_k;
  return ffi::Error::Success();
}

// Everything between S = Q K^T and the softmax: the attributes every handler
// takes, and the optional alibi_slopes / rng operands (empty when off).
struct ScoreOptions {
  float softmax_scale;
  int32_t window_left, window_right;  // -1: unbounded; causal: right = 0
  float softcap;                      // 0: off
  float dropout_p;                    // 0: off
  int32_t dropout_threshold;          // round(dropout_p * 65536), computed in Python
  const ffi::Buffer<ffi::F32>* alibi;  // (batch..., nheads) or empty
  const ffi::Buffer<ffi::U32>* rng;    // (batch..., 4) or empty
};

// How rows are laid out beyond (batch, seqlen): varlen prefix sums, or
// segment-id tables (params.h). Every operand is empty when off.
struct RowLayout {
  const ffi::Buffer<ffi::S32>* cu_seqlens_q;  // (batch + 1,)
  const ffi::Buffer<ffi::S32>* cu_seqlens_k;  // (batch + 1,)
  const ffi::Buffer<ffi::S32>* seg_q;         // (batch..., seqlen_q, 4)
  const ffi::Buffer<ffi::S32>* seg_k;         // (batch..., seqlen_k, 4)
  int32_t max_seqlen_q, max_seqlen_k;         // varlen only
};

// Switches p to the varlen layout (q, k, v as single (1, total, heads, d)
// views; sequences from the prefix sums) or installs the segment tables.
// Runs after SetQkv and before SetScoreOptions, which checks per-sequence
// operands against p->batch.
ffi::Error SetRowLayout(const RowLayout& l, AttnParams* p) {
  const size_t cu_q = l.cu_seqlens_q->element_count(), cu_k = l.cu_seqlens_k->element_count();
  const size_t seg_q = l.seg_q->element_count(), seg_k = l.seg_k->element_count();
  if (cu_q != cu_k) {
    return ffi::Error::InvalidArgument(
        "cu_seqlens_q and cu_seqlens_k must have the same shape (batch + 1,), got " +
        ShapeString(l.cu_seqlens_q->dimensions()) + " and " +
        ShapeString(l.cu_seqlens_k->dimensions()));
  }
  if (cu_q != 0) {
    if (p->batch != 1 || seg_q != 0 || seg_k != 0) {
      return ffi::Error::InvalidArgument(
          "varlen q/k/v must be single (total, nheads, head_dim) buffers without segment ids");
    }
    if (l.max_seqlen_q < 0 || l.max_seqlen_k < 0 || cu_q - 1 > 65535) {
      return ffi::Error::InvalidArgument(
          "varlen needs max_seqlen_q, max_seqlen_k >= 0 and at most 65535 sequences, got " +
          std::to_string(l.max_seqlen_q) + ", " + std::to_string(l.max_seqlen_k) + " and " +
          std::to_string(cu_q - 1));
    }
    p->total_q = p->seqlen_q;
    p->total_k = p->seqlen_k;
    p->batch = static_cast<int>(cu_q - 1);
    p->seqlen_q = l.max_seqlen_q;
    p->seqlen_k = l.max_seqlen_k;
    p->cu_seqlens_q = l.cu_seqlens_q->typed_data();
    p->cu_seqlens_k = l.cu_seqlens_k->typed_data();
    return ffi::Error::Success();
  }
  if ((seg_q != 0) != (seg_k != 0) ||
      (seg_q != 0 && (seg_q != size_t(p->batch) * p->seqlen_q * 4 ||
                      seg_k != size_t(p->batch) * p->seqlen_k * 4))) {
    return ffi::Error::InvalidArgument(
        "seg_q and seg_k must have shapes (batch..., seqlen_q, 4) and (batch..., seqlen_k, 4) "
        "= " + std::to_string(p->batch) + " x " + std::to_string(p->seqlen_q) + " x 4 and " +
        std::to_string(p->batch) + " x " + std::to_string(p->seqlen_k) +
        " x 4 entries, or both be empty; got " + ShapeString(l.seg_q->dimensions()) + " and " +
        ShapeString(l.seg_k->dimensions()));
  }
  if (seg_q != 0) {
    p->seg_q = reinterpret_cast<const int4*>(l.seg_q->typed_data());
    p->seg_k = reinterpret_cast<const int4*>(l.seg_k->typed_data());
  }
  return ffi::Error::Success();
}

// Rows of lse's layout: (batch..., nheads, seqlen_q), or (nheads, total_q).
size_t StatRows(const AttnParams& p) {
  return p.cu_seqlens_q != nullptr ? size_t(p.nheads) * p.total_q
                                   : size_t(p.batch) * p.nheads * p.seqlen_q;
}

// Varlen: rows no sequence covers get 0 (and LSE +inf), see varlen.h. `b`
// is a second buffer with a's rows (dv next to dk), or nullptr.
cudaError_t ZeroUncoveredRows(const int* cu_seqlens, const AttnParams& p, int max_len, int total,
                              const View& a, const View* b, float* lse, cudaStream_t stream) {
  if (cu_seqlens == nullptr) return cudaSuccess;
  UncoveredRows u;
  u.cu_seqlens = cu_seqlens;
  u.batch = p.batch;
  u.max_len = max_len;
  u.total = total;
  u.ptr[0] = static_cast<uint16_t*>(a.ptr);
  u.row_stride[0] = a.row_stride;
  u.ptr[1] = b != nullptr ? static_cast<uint16_t*>(b->ptr) : nullptr;
  u.row_stride[1] = b != nullptr ? b->row_stride : 0;
  u.row_elems = static_cast<int>(a.heads * a.head_dim);
  u.lse = lse;
  u.nheads = p.nheads;
  return zero_uncovered_rows(u, stream);
}

// Validates the options against the sizes already in p and fills the
// score-modifier fields (see params.h for the units).
ffi::Error SetScoreOptions(const ScoreOptions& o, AttnParams* p) {
  if (p->seg_q != nullptr && (o.window_left != -1 || o.window_right != -1)) {
    return ffi::Error::InvalidArgument(
        "with segment ids the window is part of the segment tables: window_left and "
        "window_right must be -1");
  }
  if (!(o.softcap >= 0.f)) {
    return ffi::Error::InvalidArgument("softcap must be >= 0, got " + std::to_string(o.softcap));
  }
  if (!(o.dropout_p >= 0.f && o.dropout_p < 1.f) || o.dropout_threshold < 0 ||
      o.dropout_threshold > 65536) {
    return ffi::Error::InvalidArgument("dropout_p must be in [0, 1), got " +
                                       std::to_string(o.dropout_p));
  }
  const size_t alibi_count = o.alibi->element_count();
  if (alibi_count != 0 && alibi_count != size_t(p->batch) * p->nheads) {
    return ffi::Error::InvalidArgument(
        "alibi_slopes must have shape (batch..., nheads) = " + std::to_string(p->batch) + " x " +
        std::to_string(p->nheads) + " entries or be empty, got " +
        ShapeString(o.alibi->dimensions()));
  }
  const size_t rng_count = o.rng->element_count();
  if ((o.dropout_p > 0.f) != (rng_count != 0) ||
      (rng_count != 0 && rng_count != size_t(p->batch) * 4)) {
    return ffi::Error::InvalidArgument(
        "rng must have shape (batch..., 4) when dropout_p > 0 and be empty otherwise; got "
        "dropout_p " + std::to_string(o.dropout_p) + " and rng " +
        ShapeString(o.rng->dimensions()));
  }
  constexpr float kLog2e = 1.4426950408889634f;
  p->softmax_scale = o.softmax_scale;
  p->window_left = o.window_left;
  p->window_right = o.window_right;
  p->softcap_premul = o.softcap > 0.f ? o.softmax_scale / o.softcap : 0.f;
  p->softmax_lse_scale = o.softcap > 0.f ? o.softcap : o.softmax_scale;
  p->softmax_scale_log2 = p->softmax_lse_scale * kLog2e;
  p->alibi_slopes_ptr = alibi_count ? o.alibi->typed_data() : nullptr;
  p->dropout_rescale = 1.f / (1.f - o.dropout_p);
  p->dropout_threshold = static_cast<uint32_t>(o.dropout_threshold);
  p->rng_ptr = rng_count ? o.rng->typed_data() : nullptr;
  return ffi::Error::Success();
}

fwd::Dtype KernelDtype(ffi::DataType dtype) {
  return dtype == ffi::F16 ? fwd::Dtype::kFloat16 : fwd::Dtype::kBFloat16;
}

ffi::Error LaunchError(const char* what, cudaError_t err) {
  return ffi::Error::Internal(std::string("jax_flash ") + what +
                              " kernel launch failed: " + cudaGetErrorString(err));
}

// The packed q/k/v layouts a handler can be bound to.
enum class Packing { kNone, kKv, kQkv };

ffi::Error ReadQkv(Packing packing, const ffi::AnyBuffer& a, const ffi::AnyBuffer* b,
                   const ffi::AnyBuffer* c, View* q, View* k, View* v) {
  switch (packing) {
    case Packing::kQkv:
      if (auto e = ReadView("qkv", a, 3, 0, q); e.failure()) return e;
      if (auto e = ReadView("qkv", a, 3, 1, k); e.failure()) return e;
      return ReadView("qkv", a, 3, 2, v);
    case Packing::kKv:
      if (auto e = ReadView("q", a, 0, 0, q); e.failure()) return e;
      if (auto e = ReadView("kv", *b, 2, 0, k); e.failure()) return e;
      return ReadView("kv", *b, 2, 1, v);
    case Packing::kNone:
    default:
      if (auto e = ReadView("q", a, 0, 0, q); e.failure()) return e;
      if (auto e = ReadView("k", *b, 0, 0, k); e.failure()) return e;
      return ReadView("v", *c, 0, 0, v);
  }
}

ffi::Error RunFwd(cudaStream_t stream, const View& q, const View& k, const View& v,
                  const ffi::AnyBuffer& out, ffi::Buffer<ffi::F32>& lse,
                  const ScoreOptions& opt, const RowLayout& layout) {
  AttnParams p;
  if (auto e = SetQkv(q, k, v, &p); e.failure()) return e;
  if (auto e = SetRowLayout(layout, &p); e.failure()) return e;
  if (auto e = SetScoreOptions(opt, &p); e.failure()) return e;
  View o;
  if (auto e = ReadView("out", out, 0, 0, &o); e.failure()) return e;
  if (auto e = SameView("out", o, "q", q); e.failure()) return e;
  if (lse.element_count() != StatRows(p)) {
    return ffi::Error::InvalidArgument(
        "lse must have shape (batch..., nheads, seqlen_q), or (nheads, total_q) for varlen");
  }
  SetOperand(o, &p.o_ptr, &p.o_batch_stride, &p.o_row_stride, &p.o_head_stride);
  p.lse_ptr = lse.typed_data();
  cudaError_t err = cudaSuccess;
  if (p.batch != 0 && p.seqlen_q != 0 && p.nheads != 0) {
    err = fwd::run_fwd(KernelDtype(q.dtype), p, stream);
  }
  if (err == cudaSuccess) {
    err = ZeroUncoveredRows(p.cu_seqlens_q, p, p.seqlen_q, p.total_q, o, nullptr, p.lse_ptr,
                            stream);
  }
  return err == cudaSuccess ? ffi::Error::Success() : LaunchError("forward", err);
}

// The attributes and optional operands of ScoreOptions and RowLayout, as
// handler arguments (ScoreArgs below binds them in this order).
#define JAX_FLASH_SCORE_ARGS                                                                  \
  ffi::Buffer<ffi::F32> alibi, ffi::Buffer<ffi::U32> rng, ffi::Buffer<ffi::S32> cu_seqlens_q, \
      ffi::Buffer<ffi::S32> cu_seqlens_k, ffi::Buffer<ffi::S32> seg_q,                        \
      ffi::Buffer<ffi::S32> seg_k, float softmax_scale, int32_t window_left,                  \
      int32_t window_right, float softcap, float dropout_p, int32_t dropout_threshold,        \
      int32_t max_seqlen_q, int32_t max_seqlen_k
#define JAX_FLASH_SCORE_OPTIONS                                                            \
  ScoreOptions{softmax_scale, window_left, window_right, softcap, dropout_p,              \
               dropout_threshold, &alibi, &rng},                                           \
      RowLayout {                                                                          \
    &cu_seqlens_q, &cu_seqlens_k, &seg_q, &seg_k, max_seqlen_q, max_seqlen_k               \
  }

ffi::Error AttnFwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                       ffi::AnyBuffer v, JAX_FLASH_SCORE_ARGS,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse) {
  View qv, kv, vv;
  if (auto e = ReadQkv(Packing::kNone, q, &k, &v, &qv, &kv, &vv); e.failure()) return e;
  return RunFwd(stream, qv, kv, vv, *out, *lse, JAX_FLASH_SCORE_OPTIONS);
}

ffi::Error AttnFwdKvpackedImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                               JAX_FLASH_SCORE_ARGS, ffi::Result<ffi::AnyBuffer> out,
                               ffi::Result<ffi::Buffer<ffi::F32>> lse) {
  View qv, kv_k, kv_v;
  if (auto e = ReadQkv(Packing::kKv, q, &kv, nullptr, &qv, &kv_k, &kv_v); e.failure()) return e;
  return RunFwd(stream, qv, kv_k, kv_v, *out, *lse, JAX_FLASH_SCORE_OPTIONS);
}

ffi::Error AttnFwdQkvpackedImpl(cudaStream_t stream, ffi::AnyBuffer qkv, JAX_FLASH_SCORE_ARGS,
                                ffi::Result<ffi::AnyBuffer> out,
                                ffi::Result<ffi::Buffer<ffi::F32>> lse) {
  View qv, kv, vv;
  if (auto e = ReadQkv(Packing::kQkv, qkv, nullptr, nullptr, &qv, &kv, &vv); e.failure()) {
    return e;
  }
  return RunFwd(stream, qv, kv, vv, *out, *lse, JAX_FLASH_SCORE_OPTIONS);
}

// The backward pass for any packing: q/k/v and dq/dk/dv arrive as views;
// `grads` are the distinct gradient buffers (zeroed when nothing attends).
ffi::Error RunBwd(cudaStream_t stream, const View& q, const View& k, const View& v,
                  const ffi::AnyBuffer& out, ffi::Buffer<ffi::F32>& lse,
                  const ffi::AnyBuffer& d_out, const View& dq, const View& dk, const View& dv,
                  std::initializer_list<const ffi::AnyBuffer*> grads,
                  ffi::Buffer<ffi::F32>& dq_accum, ffi::Buffer<ffi::F32>& softmax_d,
                  ffi::Buffer<ffi::S32>& dq_semaphore, const ScoreOptions& opt,
                  const RowLayout& layout, bool deterministic) {
  AttnBwdParams p;
  if (auto e = SetQkv(q, k, v, &p); e.failure()) return e;
  if (auto e = SetRowLayout(layout, &p); e.failure()) return e;
  if (auto e = SetScoreOptions(opt, &p); e.failure()) return e;
  View o, d_o;
  if (auto e = ReadView("out", out, 0, 0, &o); e.failure()) return e;
  if (auto e = ReadView("d_out", d_out, 0, 0, &d_o); e.failure()) return e;
  if (auto e = SameView("out", o, "q", q); e.failure()) return e;
  if (auto e = SameView("d_out", d_o, "q", q); e.failure()) return e;
  if (auto e = SameView("dq", dq, "q", q); e.failure()) return e;
  if (auto e = SameView("dk", dk, "k", k); e.failure()) return e;
  if (auto e = SameView("dv", dv, "v", v); e.failure()) return e;
  const size_t rows = StatRows(p);
  const bool varlen = p.cu_seqlens_q != nullptr;
  // Varlen: room for every sequence to start on a tile boundary (params.h).
  const int64_t accum_rows = varlen ? int64_t(p.total_q) + int64_t(p.batch) * bwd::kBwdBlockM
                                    : p.seqlen_q;
  const int64_t seqlen_q_rounded =
      (accum_rows + bwd::kBwdBlockM - 1) / bwd::kBwdBlockM * bwd::kBwdBlockM;
  if (lse.element_count() != rows || softmax_d.element_count() != rows) {
    return ffi::Error::InvalidArgument(
        "lse and softmax_d must have shape (batch..., nheads, seqlen_q), or (nheads, total_q) "
        "for varlen");
  }
  if (seqlen_q_rounded > INT32_MAX) {
    return ffi::Error::InvalidArgument("too many query rows for the dq accumulator");
  }
  // dq_accum: (batch..., splits, nheads, seqlen_q_rounded, kernel head dim);
  // varlen: (splits, nheads, seqlen_q_rounded, kernel head dim).
  const size_t split_elems = size_t(varlen ? 1 : p.batch) * p.nheads * seqlen_q_rounded *
                             fwd::kernel_head_dim(p.head_dim);
  const size_t splits = split_elems ? dq_accum.element_count() / split_elems : 1;
  if (split_elems && (splits < 1 || splits * split_elems != dq_accum.element_count() ||
                      (!deterministic && splits != 1) || splits > 65535)) {
    return ffi::Error::InvalidArgument(
        "dq_accum must have shape (batch..., splits, nheads, " +
        std::to_string(seqlen_q_rounded) + ", " +
        std::to_string(fwd::kernel_head_dim(p.head_dim)) +
        ") with splits == 1 unless deterministic, got " + ShapeString(dq_accum.dimensions()));
  }
  // dq_semaphore: empty, or (batch...) * nheads * seqlen_q_rounded / kBlockM
  // dQ tile counters and a ticket: deterministic mode's ordered variant, which
  // needs one accumulator and the plain kernel (no window, softcap, ALiBi,
  // dropout or segment ids: csrc/dispatch.cu runs those in other variants).
  const int64_t dq_tiles = int64_t(varlen ? 1 : p.batch) * p.nheads *
                           (seqlen_q_rounded / bwd::kBwdBlockM);
  const bool ordered = dq_semaphore.element_count() > 0;
  if (ordered && (!deterministic || splits != 1 || !bwd::orders_dq(p) ||
                  dq_semaphore.element_count() < size_t(dq_tiles) + 1)) {
    return ffi::Error::InvalidArgument(
        "a non-empty dq_semaphore needs deterministic=True, one dq_accum split, no window, "
        "softcap, ALiBi, dropout or segment ids, and at least " + std::to_string(dq_tiles + 1) +
        " elements; got " + std::to_string(dq_semaphore.element_count()) + " elements");
  }
  if (p.batch == 0 || p.nheads == 0 || p.seqlen_k == 0 || p.seqlen_q == 0) {
    // Nothing attends: every gradient is zero.
    for (const ffi::AnyBuffer* g : grads) {
      const cudaError_t err = cudaMemsetAsync(g->untyped_data(), 0, g->size_bytes(), stream);
      if (err != cudaSuccess) return LaunchError("backward", err);
    }
    return ffi::Error::Success();
  }
  SetOperand(o, &p.o_ptr, &p.o_batch_stride, &p.o_row_stride,
             &p.o_head_stride);
  p.lse_ptr = lse.typed_data();
  SetOperand(d_o, &p.do_ptr, &p.do_batch_stride, &p.do_row_stride,
             &p.do_head_stride);
  SetOperand(dq, &p.dq_ptr, &p.dq_batch_stride, &p.dq_row_stride,
             &p.dq_head_stride);
  SetOperand(dk, &p.dk_ptr, &p.dk_batch_stride, &p.dk_row_stride,
             &p.dk_head_stride);
  SetOperand(dv, &p.dv_ptr, &p.dv_batch_stride, &p.dv_row_stride,
             &p.dv_head_stride);
  p.dq_accum_ptr = dq_accum.typed_data();
  p.softmax_d_ptr = softmax_d.typed_data();
  p.dq_accum_splits = static_cast<int>(splits);
  p.seqlen_q_rounded = static_cast<int>(seqlen_q_rounded);
  p.deterministic = deterministic;
  if (ordered) {
    p.dq_semaphore_ptr = dq_semaphore.typed_data();
    p.dq_semaphore_tiles = dq_tiles;
  }
  cudaError_t err = bwd::run_bwd(KernelDtype(q.dtype), p, stream);
  if (err == cudaSuccess) {
    // dq's uncovered rows are zeroed by the convert kernel.
    err = ZeroUncoveredRows(p.cu_seqlens_k, p, p.seqlen_k, p.total_k, dk, &dv, nullptr, stream);
  }
  return err == cudaSuccess ? ffi::Error::Success() : LaunchError("backward", err);
}

ffi::Error AttnBwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                       ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::Buffer<ffi::F32> lse,
                       ffi::AnyBuffer d_out, JAX_FLASH_SCORE_ARGS, bool deterministic,
                       ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                       ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::Buffer<ffi::F32>> dq_accum,
                       ffi::Result<ffi::Buffer<ffi::F32>> softmax_d,
                       ffi::Result<ffi::Buffer<ffi::S32>> dq_semaphore) {
  View qv, kv, vv, dqv, dkv, dvv;
  if (auto e = ReadQkv(Packing::kNone, q, &k, &v, &qv, &kv, &vv); e.failure()) return e;
  if (auto e = ReadView("dq", *dq, 0, 0, &dqv); e.failure()) return e;
  if (auto e = ReadView("dk", *dk, 0, 0, &dkv); e.failure()) return e;
  if (auto e = ReadView("dv", *dv, 0, 0, &dvv); e.failure()) return e;
  return RunBwd(stream, qv, kv, vv, out, lse, d_out, dqv, dkv, dvv, {&*dq, &*dk, &*dv},
                *dq_accum, *softmax_d, *dq_semaphore, JAX_FLASH_SCORE_OPTIONS, deterministic);
}

ffi::Error AttnBwdKvpackedImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                               ffi::AnyBuffer out, ffi::Buffer<ffi::F32> lse,
                               ffi::AnyBuffer d_out, JAX_FLASH_SCORE_ARGS, bool deterministic,
                               ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dkv,
                               ffi::Result<ffi::Buffer<ffi::F32>> dq_accum,
                               ffi::Result<ffi::Buffer<ffi::F32>> softmax_d,
                               ffi::Result<ffi::Buffer<ffi::S32>> dq_semaphore) {
  View qv, kv_k, kv_v, dqv, dkv_k, dkv_v;
  if (auto e = ReadQkv(Packing::kKv, q, &kv, nullptr, &qv, &kv_k, &kv_v); e.failure()) return e;
  if (auto e = ReadView("dq", *dq, 0, 0, &dqv); e.failure()) return e;
  if (auto e = ReadView("dkv", *dkv, 2, 0, &dkv_k); e.failure()) return e;
  if (auto e = ReadView("dkv", *dkv, 2, 1, &dkv_v); e.failure()) return e;
  return RunBwd(stream, qv, kv_k, kv_v, out, lse, d_out, dqv, dkv_k, dkv_v, {&*dq, &*dkv},
                *dq_accum, *softmax_d, *dq_semaphore, JAX_FLASH_SCORE_OPTIONS, deterministic);
}

ffi::Error AttnBwdQkvpackedImpl(cudaStream_t stream, ffi::AnyBuffer qkv, ffi::AnyBuffer out,
                                ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer d_out,
                                JAX_FLASH_SCORE_ARGS, bool deterministic,
                                ffi::Result<ffi::AnyBuffer> dqkv,
                                ffi::Result<ffi::Buffer<ffi::F32>> dq_accum,
                                ffi::Result<ffi::Buffer<ffi::F32>> softmax_d,
                                ffi::Result<ffi::Buffer<ffi::S32>> dq_semaphore) {
  View qv, kv, vv, dqv, dkv, dvv;
  if (auto e = ReadQkv(Packing::kQkv, qkv, nullptr, nullptr, &qv, &kv, &vv); e.failure()) {
    return e;
  }
  if (auto e = ReadQkv(Packing::kQkv, *dqkv, nullptr, nullptr, &dqv, &dkv, &dvv); e.failure()) {
    return e;
  }
  return RunBwd(stream, qv, kv, vv, out, lse, d_out, dqv, dkv, dvv, {&*dqkv}, *dq_accum,
                *softmax_d, *dq_semaphore, JAX_FLASH_SCORE_OPTIONS, deterministic);
}

#undef JAX_FLASH_SCORE_ARGS
#undef JAX_FLASH_SCORE_OPTIONS

ffi::Error DropoutMaskImpl(cudaStream_t stream, ffi::Buffer<ffi::U32> rng,
                           int32_t dropout_threshold, ffi::Result<ffi::Buffer<ffi::U8>> keep) {
  const auto dims = keep->dimensions();
  const auto rng_dims = rng.dimensions();
  if (dims.size() < 3 || rng_dims.size() < 1 || rng_dims.back() != 4) {
    return ffi::Error::InvalidArgument(
        "expected rng (batch..., 4) and keep (batch..., nheads, seqlen_q, seqlen_k), got rng " +
        ShapeString(rng_dims) + " and keep " + ShapeString(dims));
  }
  const int64_t nheads = dims[dims.size() - 3], seqlen_q = dims[dims.size() - 2],
                seqlen_k = dims[dims.size() - 1];
  const int64_t batch = rng.element_count() / 4;
  if (int64_t(keep->element_count()) != batch * nheads * seqlen_q * seqlen_k) {
    return ffi::Error::InvalidArgument("keep " + ShapeString(dims) +
                                       " must have the batch dims of rng " +
                                       ShapeString(rng_dims));
  }
  const cudaError_t err =
      run_dropout_mask(rng.typed_data(), keep->typed_data(), batch, int(nheads), int(seqlen_q),
                       int(seqlen_k), static_cast<uint32_t>(dropout_threshold), stream);
  return err == cudaSuccess ? ffi::Error::Success() : LaunchError("dropout mask", err);
}

}  // namespace

namespace {

// The optional operands and the attributes every attention handler takes
// (JAX_FLASH_SCORE_ARGS, in that order).
template <typename Binding>
auto ScoreArgs(Binding&& binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::F32>>()  // alibi_slopes (batch..., nheads) or empty
      .template Arg<ffi::Buffer<ffi::U32>>()  // rng (batch..., 4) or empty
      .template Arg<ffi::Buffer<ffi::S32>>()  // cu_seqlens_q (batch + 1,) or empty
      .template Arg<ffi::Buffer<ffi::S32>>()  // cu_seqlens_k (batch + 1,) or empty
      .template Arg<ffi::Buffer<ffi::S32>>()  // seg_q (batch..., seqlen_q, 4) or empty
      .template Arg<ffi::Buffer<ffi::S32>>()  // seg_k (batch..., seqlen_k, 4) or empty
      .template Attr<float>("softmax_scale")
      .template Attr<int32_t>("window_left")   // -1: unbounded
      .template Attr<int32_t>("window_right")  // -1: unbounded; causal: 0
      .template Attr<float>("softcap")
      .template Attr<float>("dropout_p")
      .template Attr<int32_t>("dropout_threshold")
      .template Attr<int32_t>("max_seqlen_q")   // varlen only
      .template Attr<int32_t>("max_seqlen_k");  // varlen only
}

// Forward: returns out (q's logical shape) and lse (batch..., nheads, seqlen_q).
template <typename Binding>
auto FwdRets(Binding binding) {
  return ScoreArgs(std::move(binding))
      .template Ret<ffi::AnyBuffer>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

// Backward: (q, k, v in the handler's packing), out, lse, d_out, then the
// score arguments; returns the gradients in the inputs' layout, then the
// scratch dq_accum, softmax_d and dq_semaphore.
template <typename Binding>
auto BwdArgs(Binding binding) {
  return ScoreArgs(std::move(binding)
                       .template Arg<ffi::AnyBuffer>()          // out
                       .template Arg<ffi::Buffer<ffi::F32>>()   // lse
                       .template Arg<ffi::AnyBuffer>())         // d_out
      .template Attr<bool>("deterministic");
}
template <typename Binding>
auto BwdScratch(Binding binding) {
  return std::move(binding)
      .template Ret<ffi::Buffer<ffi::F32>>()   // dq_accum
      .template Ret<ffi::Buffer<ffi::F32>>()   // softmax_d
      .template Ret<ffi::Buffer<ffi::S32>>();  // dq_semaphore
}

auto Stream() { return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>(); }

}  // namespace

// q (batch..., seqlen_q, nheads, d), k/v (batch..., seqlen_k, nheads_k, d),
// kv (batch..., seqlen_k, 2, nheads_k, d), qkv (batch..., seqlen, 3, nheads, d).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AttnFwd, AttnFwdImpl,
    FwdRets(Stream().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()),
    {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnFwdKvpacked, AttnFwdKvpackedImpl,
                              FwdRets(Stream().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnFwdQkvpacked, AttnFwdQkvpackedImpl,
                              FwdRets(Stream().Arg<ffi::AnyBuffer>()),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AttnBwd, AttnBwdImpl,
    BwdScratch(BwdArgs(Stream().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>())
                   .Ret<ffi::AnyBuffer>()    // dq
                   .Ret<ffi::AnyBuffer>()    // dk
                   .Ret<ffi::AnyBuffer>()),  // dv
    {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AttnBwdKvpacked, AttnBwdKvpackedImpl,
    BwdScratch(BwdArgs(Stream().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>())
                   .Ret<ffi::AnyBuffer>()    // dq
                   .Ret<ffi::AnyBuffer>()),  // dkv
    {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnBwdQkvpacked, AttnBwdQkvpackedImpl,
                              BwdScratch(BwdArgs(Stream().Arg<ffi::AnyBuffer>())
                                             .Ret<ffi::AnyBuffer>()),  // dqkv
                              {ffi::Traits::kCmdBufferCompatible});

// rng (batch..., 4) -> keep (batch..., nheads, seqlen_q, seqlen_k) uint8.
XLA_FFI_DEFINE_HANDLER_SYMBOL(DropoutMask, DropoutMaskImpl,
                              Stream()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Attr<int32_t>("dropout_threshold")
                                  .Ret<ffi::Buffer<ffi::U8>>(),
                              {ffi::Traits::kCmdBufferCompatible});

int CompiledHeadDimFor(int head_dim) { return fwd::kernel_head_dim(head_dim); }

}  // namespace jax_flash
