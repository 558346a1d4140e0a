// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
#include "attention.h"

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "../common/params.h"
#include "dispatch.h"
#include "dropout_mask.h"
#include "plan.h"
#include "uncovered_rows.h"

namespace jax_flash {

int64_t Tensor::size() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + (dims.size() == 1 ? ",)" : ")");
}

namespace {

// One of q, k, v, out or a gradient as the kernels see it: a base pointer and
// element strides. A packed buffer (qkv or kv) gives one view per slot, so
// the kernels read and write the packed layout directly, with no slicing or
// concatenation copies around the custom call.
struct View {
  void* ptr = nullptr;
  ElementType type = ElementType::kOther;
  int64_t batch = 1, seqlen = 0, heads = 0, head_dim = 0;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
  std::string shape;  // of the whole buffer, for error messages
};

// Unpacked (packs == 0): (batch..., seqlen, heads, head_dim). Packed:
// (batch..., seqlen, packs, heads, head_dim), viewed at index `slot` of the
// packs axis. Every leading dim folds into the batch, which is how vmap
// (vmap_method="broadcast_all") reaches the kernel.
Status ReadView(const char* name, const Tensor& t, int packs, int slot, View* v) {
  const auto& dims = t.dims;
  const size_t tail = packs ? 4 : 3;  // dims after the batch dims
  v->shape = ShapeString(dims);
  if (dims.size() < tail + 1) {
    return Status::Invalid(
        std::string(name) + " must have rank >= " + std::to_string(tail + 1) +
        (packs ? " (batch..., seqlen, " + std::to_string(packs) + ", heads, head_dim)"
               : std::string(" (batch..., seqlen, heads, head_dim)")) +
        ", got shape " + v->shape);
  }
  const size_t lead = dims.size() - tail;
  if (packs && dims[lead + 1] != packs) {
    return Status::Invalid(std::string(name) + " must have " + std::to_string(packs) +
                           " at axis " + std::to_string(lead + 1) + ", got shape " + v->shape);
  }
  if (t.type != ElementType::kF16 && t.type != ElementType::kBF16) {
    return Status::Invalid(std::string(name) + " must be float16 or bfloat16");
  }
  v->batch = 1;
  for (size_t i = 0; i < lead; ++i) v->batch *= dims[i];
  v->seqlen = dims[lead];
  v->heads = dims[dims.size() - 2];
  v->head_dim = dims[dims.size() - 1];
  v->type = t.type;
  v->head_stride = v->head_dim;
  v->row_stride = (packs ? packs : 1) * v->heads * v->head_dim;
  v->batch_stride = v->seqlen * v->row_stride;
  v->ptr = static_cast<char*>(t.data) + slot * v->heads * v->head_dim * 2;  // 16-bit elements
  return {};
}

// q, k, v (or a gradient's three views) from one packing's buffers.
Status ReadQkv(Packing packing, const std::vector<Tensor>& in, const char* const names[3],
               View* q, View* k, View* v) {
  const size_t expected = packing == Packing::kQkv ? 1 : packing == Packing::kKv ? 2 : 3;
  if (in.size() != expected) {
    return Status::Invalid("expected " + std::to_string(expected) + " q/k/v buffers, got " +
                           std::to_string(in.size()));
  }
  Status s;
  switch (packing) {
    case Packing::kQkv:
      if (!(s = ReadView(names[0], in[0], 3, 0, q)).ok()) return s;
      if (!(s = ReadView(names[0], in[0], 3, 1, k)).ok()) return s;
      return ReadView(names[0], in[0], 3, 2, v);
    case Packing::kKv:
      if (!(s = ReadView(names[0], in[0], 0, 0, q)).ok()) return s;
      if (!(s = ReadView(names[1], in[1], 2, 0, k)).ok()) return s;
      return ReadView(names[1], in[1], 2, 1, v);
    case Packing::kNone:
      if (!(s = ReadView(names[0], in[0], 0, 0, q)).ok()) return s;
      if (!(s = ReadView(names[1], in[1], 0, 0, k)).ok()) return s;
      return ReadView(names[2], in[2], 0, 0, v);
  }
  return Status::Invalid("unknown packing");
}

const char* const kInputNames[3][3] = {{"q", "k", "v"}, {"q", "kv", ""}, {"qkv", "", ""}};
const char* const kGradNames[3][3] = {{"dq", "dk", "dv"}, {"dq", "dkv", ""}, {"dqkv", "", ""}};

// `v` must have the logical shape and dtype of `like`.
Status SameView(const char* name, const View& v, const char* like_name, const View& like) {
  if (v.type != like.type || v.batch != like.batch || v.seqlen != like.seqlen ||
      v.heads != like.heads || v.head_dim != like.head_dim) {
    return Status::Invalid(std::string(name) + " " + v.shape +
                           " must match the shape and dtype of " + like_name + " " + like.shape);
  }
  return {};
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

// An optional operand: empty, or of `type`.
Status CheckOptional(const char* name, const Tensor& t, ElementType type, const char* type_name) {
  if (t.size() != 0 && t.type != type) {
    return Status::Invalid(std::string(name) + " must be " + type_name + " (or empty), got shape " +
                           ShapeString(t.dims) + " of another dtype");
  }
  return {};
}

// Validates q, k, v (dtype, shapes, head ratio) and fills the sizes and
// strides of AttnParams. Every call starts here.
Status SetQkv(const View& q, const View& k, const View& v, AttnParams* p) {
  if (k.type != q.type || v.type != q.type) {
    return Status::Invalid("q, k and v must share one dtype");
  }
  if (k.batch != q.batch || v.batch != q.batch || k.seqlen != v.seqlen || k.heads != v.heads ||
      k.head_dim != q.head_dim || v.head_dim != q.head_dim) {
    return Status::Invalid(
        "expected k and v of shape (batch..., seqlen_k, nheads_k, head_dim) matching q " +
        q.shape + ", got k " + k.shape + " and v " + v.shape);
  }
  if (k.heads == 0 || q.heads % k.heads != 0) {
    return Status::Invalid("nheads (" + std::to_string(q.heads) +
                           ") must be a multiple of nheads_k (" + std::to_string(k.heads) + ")");
  }
  // Tiles are addressed with 32-bit offsets inside a tile.
  for (const View* x : {&q, &k, &v}) {
    if (x->row_stride >= (int64_t{1} << 24)) {
      return Status::Invalid(
          "the row stride of q/k/v (heads * head_dim, times 2 or 3 when packed) must be < "
          "2^24, got " + std::to_string(x->row_stride));
    }
  }
  for (const View* x : {&q, &k}) {
    if (x->batch > INT32_MAX || x->seqlen > INT32_MAX || x->heads > INT32_MAX) {
      return Status::Invalid("batch, seqlen and heads must be < 2^31, got q " + q.shape +
                             " and k " + k.shape);
    }
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
  return {};
}

// Switches p to the varlen layout (q, k, v as single (1, total, heads, d)
// views; sequences from the prefix sums) or installs the segment tables.
// Runs after SetQkv and before SetScoreOptions, which checks per-sequence
// operands against p->batch.
Status SetRowLayout(const Optional& o, const ScoreAttrs& a, AttnParams* p) {
  Status s;
  if (!(s = CheckOptional("cu_seqlens_q", o.cu_seqlens_q, ElementType::kS32, "int32")).ok() ||
      !(s = CheckOptional("cu_seqlens_k", o.cu_seqlens_k, ElementType::kS32, "int32")).ok() ||
      !(s = CheckOptional("seg_q", o.seg_q, ElementType::kS32, "int32")).ok() ||
      !(s = CheckOptional("seg_k", o.seg_k, ElementType::kS32, "int32")).ok()) {
    return s;
  }
  const int64_t cu_q = o.cu_seqlens_q.size(), cu_k = o.cu_seqlens_k.size();
  const int64_t seg_q = o.seg_q.size(), seg_k = o.seg_k.size();
  if (cu_q != cu_k) {
    return Status::Invalid(
        "cu_seqlens_q and cu_seqlens_k must have the same shape (batch + 1,), got " +
        ShapeString(o.cu_seqlens_q.dims) + " and " + ShapeString(o.cu_seqlens_k.dims));
  }
  if (cu_q != 0) {
    if (p->batch != 1 || seg_q != 0 || seg_k != 0) {
      return Status::Invalid(
          "varlen q/k/v must be single (total, nheads, head_dim) buffers without segment ids");
    }
    if (a.max_seqlen_q < 0 || a.max_seqlen_k < 0 || cu_q - 1 > INT32_MAX) {
      return Status::Invalid("varlen needs max_seqlen_q, max_seqlen_k >= 0, got " +
                             std::to_string(a.max_seqlen_q) + " and " +
                             std::to_string(a.max_seqlen_k));
    }
    p->total_q = p->seqlen_q;
    p->total_k = p->seqlen_k;
    p->batch = static_cast<int>(cu_q - 1);
    p->seqlen_q = a.max_seqlen_q;
    p->seqlen_k = a.max_seqlen_k;
    p->cu_seqlens_q = static_cast<const int*>(o.cu_seqlens_q.data);
    p->cu_seqlens_k = static_cast<const int*>(o.cu_seqlens_k.data);
    return {};
  }
  if ((seg_q != 0) != (seg_k != 0) ||
      (seg_q != 0 && (seg_q != int64_t(p->batch) * p->seqlen_q * 4 ||
                      seg_k != int64_t(p->batch) * p->seqlen_k * 4))) {
    return Status::Invalid(
        "seg_q and seg_k must have shapes (batch..., seqlen_q, 4) and (batch..., seqlen_k, 4) "
        "= " + std::to_string(p->batch) + " x " + std::to_string(p->seqlen_q) + " x 4 and " +
        std::to_string(p->batch) + " x " + std::to_string(p->seqlen_k) +
        " x 4 entries, or both be empty; got " + ShapeString(o.seg_q.dims) + " and " +
        ShapeString(o.seg_k.dims));
  }
  if (seg_q != 0) {
    p->seg_q = static_cast<const int4*>(o.seg_q.data);
    p->seg_k = static_cast<const int4*>(o.seg_k.data);
  }
  return {};
}

// Validates the options against the sizes already in p and fills the
// score-modifier fields (see params.h for the units).
Status SetScoreOptions(const Optional& o, const ScoreAttrs& a, AttnParams* p) {
  Status s;
  if (!(s = CheckOptional("alibi_slopes", o.alibi, ElementType::kF32, "float32")).ok() ||
      !(s = CheckOptional("rng", o.rng, ElementType::kU32, "uint32")).ok()) {
    return s;
  }
  if (p->seg_q != nullptr && (a.window_left != -1 || a.window_right != -1)) {
    return Status::Invalid(
        "with segment ids the window is part of the segment tables: window_left and "
        "window_right must be -1");
  }
  if (!(std::isfinite(a.softmax_scale) && a.softmax_scale > 0.f)) {
    return Status::Invalid("softmax_scale must be a finite float32 > 0, got " +
                           std::to_string(a.softmax_scale));
  }
  if (!(a.softcap >= 0.f) || !std::isfinite(a.softcap) ||
      (a.softcap > 0.f && !std::isfinite(a.softmax_scale / a.softcap))) {
    return Status::Invalid("softcap must be 0 or a float32 > 0 with softmax_scale / softcap "
                           "finite, got " + std::to_string(a.softcap));
  }
  if (!(a.dropout_p >= 0.f && a.dropout_p < 1.f) || a.dropout_threshold < 0 ||
      a.dropout_threshold > 65536) {
    return Status::Invalid("dropout_p must be in [0, 1), got " + std::to_string(a.dropout_p));
  }
  const int64_t alibi_count = o.alibi.size();
  if (alibi_count != 0 && alibi_count != int64_t(p->batch) * p->nheads) {
    return Status::Invalid("alibi_slopes must have shape (batch..., nheads) = " +
                           std::to_string(p->batch) + " x " + std::to_string(p->nheads) +
                           " entries or be empty, got " + ShapeString(o.alibi.dims));
  }
  const int64_t rng_count = o.rng.size();
  if ((a.dropout_p > 0.f) != (rng_count != 0) ||
      (rng_count != 0 && rng_count != int64_t(p->batch) * 4)) {
    return Status::Invalid(
        "rng must have shape (batch..., 4) when dropout_p > 0 and be empty otherwise; got "
        "dropout_p " + std::to_string(a.dropout_p) + " and rng " + ShapeString(o.rng.dims));
  }
  constexpr float kLog2e = 1.4426950408889634f;
  p->softmax_scale = a.softmax_scale;
  p->window_left = a.window_left;
  p->window_right = a.window_right;
  p->softcap_premul = a.softcap > 0.f ? a.softmax_scale / a.softcap : 0.f;
  p->softmax_lse_scale = a.softcap > 0.f ? a.softcap : a.softmax_scale;
  p->softmax_scale_log2 = p->softmax_lse_scale * kLog2e;
  p->alibi_slopes_ptr = alibi_count ? static_cast<const float*>(o.alibi.data) : nullptr;
  p->dropout_rescale = 1.f / (1.f - a.dropout_p);
  p->dropout_threshold = static_cast<uint32_t>(a.dropout_threshold);
  p->rng_ptr = rng_count ? static_cast<const uint32_t*>(o.rng.data) : nullptr;
  return {};
}

// q/k/v, the row layout and the options: the params every pass starts from.
Status SetInputs(Packing packing, const std::vector<Tensor>& in, const Optional& o,
                 const ScoreAttrs& a, View* q, View* k, View* v, AttnParams* p) {
  Status s;
  if (!(s = ReadQkv(packing, in, kInputNames[int(packing)], q, k, v)).ok()) return s;
  if (!(s = SetQkv(*q, *k, *v, p)).ok()) return s;
  if (!(s = SetRowLayout(o, a, p)).ok()) return s;
  return SetScoreOptions(o, a, p);
}

// The plan of the call p describes (host/plan.h).
Status PlanFor(const AttnParams& p, const ScoreAttrs& a, Problem* problem, Plan* plan) {
  problem->batch = p.batch;
  problem->seqlen_q = p.seqlen_q;
  problem->seqlen_k = p.seqlen_k;
  problem->nheads = p.nheads;
  problem->nheads_k = p.nheads_k;
  problem->head_dim = p.head_dim;
  problem->total_q = p.cu_seqlens_q != nullptr ? p.total_q : -1;
  problem->local = p.window_left >= 0 || p.window_right >= 0;
  problem->softcap = p.softcap_premul != 0.f;
  problem->alibi = p.alibi_slopes_ptr != nullptr;
  problem->dropout = p.rng_ptr != nullptr;
  problem->segments = p.seg_q != nullptr;
  problem->deterministic = a.deterministic;
  const std::string err = make_plan(*problem, plan);
  if (!err.empty()) return Status::Invalid(err);
  if (plan->head_dim_padded != p.head_dim) {
    return Status::Invalid("head_dim must be a multiple of 8 (jax_flash pads it to " +
                           std::to_string(plan->head_dim_padded) + "), got " +
                           std::to_string(p.head_dim));
  }
  return {};
}

// Rows of lse's layout: (batch..., nheads, seqlen_q), or (nheads, total_q).
int64_t StatRows(const AttnParams& p) {
  return p.cu_seqlens_q != nullptr ? int64_t(p.nheads) * p.total_q
                                   : int64_t(p.batch) * p.nheads * p.seqlen_q;
}

// Varlen: rows no sequence covers get 0 (and LSE +inf), see uncovered_rows.h.
// `b` is a second buffer with a's rows (dv next to dk), or nullptr.
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

Dtype KernelDtype(ElementType type) {
  return type == ElementType::kF16 ? Dtype::kFloat16 : Dtype::kBFloat16;
}

Status LaunchError(const char* what, cudaError_t err) {
  return {Status::kInternal,
          std::string("jax_flash ") + what + " kernel launch failed: " + cudaGetErrorString(err)};
}

}  // namespace

Status attention_fwd(Packing packing, const std::vector<Tensor>& inputs, const Optional& opt,
                     const ScoreAttrs& attrs, const Tensor& out, const Tensor& lse,
                     cudaStream_t stream) {
  AttnParams p;
  View q, k, v, o;
  Status s;
  if (!(s = SetInputs(packing, inputs, opt, attrs, &q, &k, &v, &p)).ok()) return s;
  Problem problem;
  Plan plan;
  if (!(s = PlanFor(p, attrs, &problem, &plan)).ok()) return s;
  if (!(s = ReadView("out", out, 0, 0, &o)).ok()) return s;
  if (!(s = SameView("out", o, "q", q)).ok()) return s;
  if (lse.type != ElementType::kF32 || lse.size() != StatRows(p)) {
    return Status::Invalid(
        "lse must be float32 of shape (batch..., nheads, seqlen_q), or (nheads, total_q) for "
        "varlen; got " + ShapeString(lse.dims));
  }
  SetOperand(o, &p.o_ptr, &p.o_batch_stride, &p.o_row_stride, &p.o_head_stride);
  p.lse_ptr = static_cast<float*>(lse.data);
  cudaError_t err = cudaSuccess;
  if (p.batch != 0 && p.seqlen_q != 0 && p.nheads != 0) {
    err = run_fwd(plan, KernelDtype(q.type), p, stream);
  }
  if (err == cudaSuccess) {
    err = ZeroUncoveredRows(p.cu_seqlens_q, p, p.seqlen_q, p.total_q, o, nullptr, p.lse_ptr,
                            stream);
  }
  return err == cudaSuccess ? Status{} : LaunchError("forward", err);
}

Status attention_bwd(Packing packing, const std::vector<Tensor>& inputs, const Tensor& out,
                     const Tensor& lse, const Tensor& d_out, const Optional& opt,
                     const ScoreAttrs& attrs, const std::vector<Tensor>& grads,
                     const Tensor& dq_accum, const Tensor& softmax_d,
                     const Tensor& dq_semaphore, cudaStream_t stream) {
  AttnBwdParams p;
  View q, k, v, o, d_o, dq, dk, dv;
  Status s;
  if (!(s = SetInputs(packing, inputs, opt, attrs, &q, &k, &v, &p)).ok()) return s;
  Problem problem;
  Plan plan;
  if (!(s = PlanFor(p, attrs, &problem, &plan)).ok()) return s;
  if (!(s = ReadQkv(packing, grads, kGradNames[int(packing)], &dq, &dk, &dv)).ok()) return s;
  if (!(s = ReadView("out", out, 0, 0, &o)).ok()) return s;
  if (!(s = ReadView("d_out", d_out, 0, 0, &d_o)).ok()) return s;
  if (!(s = SameView("out", o, "q", q)).ok()) return s;
  if (!(s = SameView("d_out", d_o, "q", q)).ok()) return s;
  if (!(s = SameView("dq", dq, "q", q)).ok()) return s;
  if (!(s = SameView("dk", dk, "k", k)).ok()) return s;
  if (!(s = SameView("dv", dv, "v", v)).ok()) return s;
  const int64_t rows = StatRows(p);
  if (lse.type != ElementType::kF32 || softmax_d.type != ElementType::kF32 ||
      lse.size() != rows || softmax_d.size() != rows) {
    return Status::Invalid(
        "lse and softmax_d must be float32 of shape (batch..., nheads, seqlen_q), or (nheads, "
        "total_q) for varlen; got " + ShapeString(lse.dims) + " and " +
        ShapeString(softmax_d.dims));
  }
  // dq_accum: (batch..., splits, nheads, rows, kernel head dim), varlen
  // without the batch dims (host/plan.h); the slices are what is left.
  const int64_t slice = (problem.varlen() ? 1 : int64_t(p.batch)) * p.nheads *
                        plan.dq_accum_rows * plan.kernel_head_dim;
  DqMode mode;
  mode.splits = slice ? static_cast<int>(dq_accum.size() / slice) : 1;
  mode.ordered = dq_semaphore.size() > 0;
  mode.semaphore = dq_semaphore.size();
  if (dq_accum.type != ElementType::kF32 || dq_semaphore.type != ElementType::kS32 ||
      (slice && int64_t(mode.splits) * slice != dq_accum.size())) {
    return Status::Invalid("dq_accum must be float32 of shape (batch..., splits, nheads, " +
                           std::to_string(plan.dq_accum_rows) + ", " +
                           std::to_string(plan.kernel_head_dim) +
                           ") and dq_semaphore int32; got dq_accum " +
                           ShapeString(dq_accum.dims));
  }
  const std::string mode_error = check_dq_mode(problem, plan, mode);
  if (!mode_error.empty()) return Status::Invalid(mode_error);
  if (p.batch == 0 || p.nheads == 0 || p.seqlen_k == 0 || p.seqlen_q == 0) {
    // Nothing attends: every gradient is zero.
    for (const Tensor& g : grads) {
      const cudaError_t err = cudaMemsetAsync(g.data, 0, g.size() * 2, stream);
      if (err != cudaSuccess) return LaunchError("backward", err);
    }
    return {};
  }
  SetOperand(o, &p.o_ptr, &p.o_batch_stride, &p.o_row_stride, &p.o_head_stride);
  p.lse_ptr = static_cast<float*>(lse.data);
  SetOperand(d_o, &p.do_ptr, &p.do_batch_stride, &p.do_row_stride, &p.do_head_stride);
  SetOperand(dq, &p.dq_ptr, &p.dq_batch_stride, &p.dq_row_stride, &p.dq_head_stride);
  SetOperand(dk, &p.dk_ptr, &p.dk_batch_stride, &p.dk_row_stride, &p.dk_head_stride);
  SetOperand(dv, &p.dv_ptr, &p.dv_batch_stride, &p.dv_row_stride, &p.dv_head_stride);
  p.dq_accum_ptr = static_cast<float*>(dq_accum.data);
  p.softmax_d_ptr = static_cast<float*>(softmax_d.data);
  p.dq_accum_splits = mode.splits;
  p.seqlen_q_rounded = static_cast<int>(plan.dq_accum_rows);
  p.deterministic = attrs.deterministic;
  if (mode.ordered) {
    p.dq_semaphore_ptr = static_cast<int*>(dq_semaphore.data);
    p.dq_semaphore_tiles = dq_tiles(problem, plan);
  }
  cudaError_t err = run_bwd(plan, KernelDtype(q.type), p, stream);
  if (err == cudaSuccess) {
    // dq's uncovered rows are zeroed by the convert kernel.
    err = ZeroUncoveredRows(p.cu_seqlens_k, p, p.seqlen_k, p.total_k, dk, &dv, nullptr, stream);
  }
  return err == cudaSuccess ? Status{} : LaunchError("backward", err);
}

Status dropout_mask(const Tensor& rng, int32_t dropout_threshold, const Tensor& keep,
                    cudaStream_t stream) {
  const auto& dims = keep.dims;
  if (rng.type != ElementType::kU32 || keep.type != ElementType::kU8 || dims.size() < 3 ||
      rng.dims.empty() || rng.dims.back() != 4) {
    return Status::Invalid(
        "expected rng uint32 (batch..., 4) and keep uint8 (batch..., nheads, seqlen_q, "
        "seqlen_k), got rng " + ShapeString(rng.dims) + " and keep " + ShapeString(dims));
  }
  const int64_t nheads = dims[dims.size() - 3], seqlen_q = dims[dims.size() - 2],
                seqlen_k = dims[dims.size() - 1];
  const int64_t batch = rng.size() / 4;
  if (keep.size() != batch * nheads * seqlen_q * seqlen_k) {
    return Status::Invalid("keep " + ShapeString(dims) + " must have the batch dims of rng " +
                           ShapeString(rng.dims));
  }
  const cudaError_t err = run_dropout_mask(
      static_cast<const uint32_t*>(rng.data), static_cast<uint8_t*>(keep.data), batch,
      int(nheads), int(seqlen_q), int(seqlen_k), static_cast<uint32_t>(dropout_threshold), stream);
  return err == cudaSuccess ? Status{} : LaunchError("dropout mask", err);
}

}  // namespace jax_flash
