// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
#include "kvcache.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../decode/params.h"
#include "../decode/tile.h"
#include "device_info.h"
#include "dispatch.h"
#include "kvcache_append.h"
#include "plan.h"

namespace jax_flash {
namespace {

using Dims = std::vector<int64_t>;

// Offsets computed in int in the kernels stay below 2^31 with sizes under
// this; the window arithmetic adds up to three of them.
constexpr int64_t kMaxSize = int64_t{1} << 29;
constexpr int64_t kMaxBlocks = int64_t{1} << 31;  // of the append launch

Status Invalid(const std::string& name, const std::string& expected, const Tensor& got) {
  return Status::Invalid(name + " must be " + expected + ", got shape " + ShapeString(got.dims) +
                         (got.type == ElementType::kOther ? " of an unsupported dtype" : ""));
}

// An optional int32 table's data, null when empty (off).
const int* TableOrNull(const Tensor& t) {
  return t.size() != 0 ? static_cast<const int*>(t.data) : nullptr;
}

bool Is16Bit(ElementType t) { return t == ElementType::kF16 || t == ElementType::kBF16; }

// An int32 table of exactly `dims`, or (optional) empty.
Status CheckTable(const char* name, const Tensor& t, const Dims& dims, bool optional) {
  if (optional && t.size() == 0) return {};
  if (t.type != ElementType::kS32 || t.dims != dims) {
    return Invalid(name, std::string("int32 of shape ") + ShapeString(dims) +
                             (optional ? " (or empty)" : ""), t);
  }
  return {};
}

// The sizes of a call, read from its operands' shapes.
struct Sizes {
  int64_t batch = 0, seqlen_q = 0, nheads = 0, head_dim = 0, nheads_k = 0;
  int64_t num_pages = 0, page_size = 0, max_blocks = 1, seqlen_cache = 0;
};

// q, the caches and the tables: shapes, dtypes and the layout rules of
// jax_flash/_src/kvcache.py (which raises the same errors in Python first).
Status CheckInputs(const KVCacheInputs& in, const KVCacheAttrs& a, Sizes* z) {
  const Tensor& q = in.q;
  if (q.dims.size() != 4 || !Is16Bit(q.type)) {
    return Invalid("q", "float16 or bfloat16 of rank 4 (batch, seqlen_q, nheads, head_dim)", q);
  }
  z->batch = q.dims[0];
  z->seqlen_q = q.dims[1];
  z->nheads = q.dims[2];
  z->head_dim = q.dims[3];
  if (z->head_dim < 8 || z->head_dim > 256 || z->head_dim % 8 != 0) {
    return Invalid("q", "of head_dim a multiple of 8 in [8, 256] (jax_flash pads it to 8)", q);
  }
  const char* cache_layout = a.paged ? "(num_blocks, page_size, nheads_k, head_dim)"
                                     : "(batch_cache, seqlen_cache, nheads_k, head_dim)";
  for (const auto& [name, c] : {std::pair<const char*, const Tensor&>{"k_cache", in.k_cache},
                                {"v_cache", in.v_cache}}) {
    if (c.type != q.type || c.dims.size() != 4 || c.dims[3] != z->head_dim) {
      return Invalid(name, std::string("of q's dtype and rank 4 ") + cache_layout +
                               " with q's head_dim " + std::to_string(z->head_dim), c);
    }
  }
  if (in.v_cache.dims != in.k_cache.dims) {
    return Invalid("v_cache", "of k_cache's shape " + ShapeString(in.k_cache.dims), in.v_cache);
  }
  z->nheads_k = in.k_cache.dims[2];
  if (z->nheads_k < 1 || z->nheads % z->nheads_k != 0) {
    return Status::Invalid("nheads of q (" + std::to_string(z->nheads) +
                           ") must be a multiple of nheads_k of the caches (" +
                           std::to_string(z->nheads_k) + ")");
  }
  z->num_pages = in.k_cache.dims[0];
  Status s;
  if (a.paged) {
    const Tensor& bt = in.block_table;
    if (bt.type != ElementType::kS32 || bt.dims.size() != 2 || bt.dims[0] != z->batch) {
      return Invalid("block_table", "int32 (batch, max_blocks_per_seq) with batch " +
                                        std::to_string(z->batch), bt);
    }
    if (in.cache_batch_idx.size() != 0 || in.cache_leftpad.size() != 0) {
      return Status::Invalid("cache_batch_idx and cache_leftpad must be empty with a paged "
                             "cache (block_table)");
    }
    z->page_size = in.k_cache.dims[1];
    z->max_blocks = bt.dims[1];
    z->seqlen_cache = z->max_blocks * z->page_size;
    if (z->num_pages < 1 || z->page_size < 1) {
      return Invalid("k_cache", "paged (num_blocks, page_size, nheads_k, head_dim) with "
                                "num_blocks >= 1 and page_size >= 1", in.k_cache);
    }
  } else {
    if (in.block_table.size() != 0) {
      return Invalid("block_table", "empty for a contiguous cache (attribute paged=False)",
                     in.block_table);
    }
    z->seqlen_cache = in.k_cache.dims[1];
    z->page_size = z->seqlen_cache;
    if (!(s = CheckTable("cache_batch_idx", in.cache_batch_idx, {z->batch}, true)).ok() ||
        !(s = CheckTable("cache_leftpad", in.cache_leftpad, {z->batch}, true)).ok()) {
      return s;
    }
    const bool indexed = in.cache_batch_idx.size() != 0;
    if (indexed ? z->num_pages < 1 : z->num_pages != z->batch) {
      return Invalid("k_cache", indexed ? std::string("of batch_cache >= 1")
                                        : "of q's batch " + std::to_string(z->batch) +
                                              " without cache_batch_idx",
                     in.k_cache);
    }
  }
  if (!(s = CheckTable("cache_seqlens", in.cache_seqlens, {z->batch}, false)).ok()) return s;
  if (in.alibi.size() != 0 &&
      (in.alibi.type != ElementType::kF32 || in.alibi.size() != z->batch * z->nheads)) {
    return Invalid("alibi_slopes", "float32 (batch, nheads) = (" + std::to_string(z->batch) +
                                       ", " + std::to_string(z->nheads) + ") or empty", in.alibi);
  }
  for (int64_t n : {z->batch, z->seqlen_q, z->nheads, z->num_pages, z->page_size, z->max_blocks,
                    z->seqlen_cache, z->nheads * z->seqlen_q}) {
    if (n >= kMaxSize) {
      return Status::Invalid("kv-cache sizes (batch, seqlen_q, nheads * seqlen_q, pages, rows "
                             "per sequence) must be < 2^29, got q " + ShapeString(q.dims) +
                             ", k_cache " + ShapeString(in.k_cache.dims) + ", block_table " +
                             ShapeString(in.block_table.dims));
    }
  }
  return {};
}

Status CheckAttrs(const KVCacheAttrs& a, const Sizes& z) {
  if (!(std::isfinite(a.softmax_scale) && a.softmax_scale > 0.f)) {
    return Status::Invalid("softmax_scale must be a finite float32 > 0, got " +
                           std::to_string(a.softmax_scale));
  }
  if (!(a.softcap >= 0.f) || !std::isfinite(a.softcap) ||
      (a.softcap > 0.f && !std::isfinite(a.softmax_scale / a.softcap))) {
    return Status::Invalid("softcap must be 0 or a float32 > 0 with softmax_scale / softcap "
                           "finite, got " + std::to_string(a.softcap));
  }
  if (a.window_left < -1 || a.window_right < -1) {
    return Status::Invalid("window_left and window_right must be >= -1 (-1: unbounded), got " +
                           std::to_string(a.window_left) + " and " +
                           std::to_string(a.window_right));
  }
  if (a.seqlen_new < 0 || a.seqlen_new > z.seqlen_cache) {
    return Status::Invalid("seqlen_new must be in [0, seqlen_cache = " +
                           std::to_string(z.seqlen_cache) + "], got " +
                           std::to_string(a.seqlen_new));
  }
  return {};
}

// out, lse and the split scratch; *splits from the scratch's shape.
Status CheckResults(const Tensor& q, const Sizes& z, const Tensor& out, const Tensor& lse,
                    const Tensor& out_accum, const Tensor& lse_accum, int* splits) {
  if (out.type != q.type || out.dims != q.dims) {
    return Invalid("out", "of q's shape " + ShapeString(q.dims) + " and dtype", out);
  }
  const Dims rows = {z.batch, z.nheads, z.seqlen_q};
  if (lse.type != ElementType::kF32 || lse.dims != rows) {
    return Invalid("lse", "float32 (batch, nheads, seqlen_q) " + ShapeString(rows), lse);
  }
  if (lse_accum.size() == 0 && out_accum.size() == 0) {
    *splits = 1;
    return {};
  }
  const int64_t n = lse_accum.dims.empty() ? 0 : lse_accum.dims[0];
  const Dims lse_shape = {n, z.batch, z.nheads, z.seqlen_q};
  const Dims out_shape = {n, z.batch, z.nheads, z.seqlen_q, z.head_dim};
  if (n < 2 || n > decode::kMaxSplits || lse_accum.type != ElementType::kF32 ||
      out_accum.type != ElementType::kF32 || lse_accum.dims != lse_shape ||
      out_accum.dims != out_shape) {
    return Status::Invalid(
        "the split scratch must be float32 out_accum (splits, batch, nheads, seqlen_q, "
        "head_dim) and lse_accum (splits, batch, nheads, seqlen_q) with 2 <= splits <= " +
        std::to_string(decode::kMaxSplits) + ", or both empty (one split); got out_accum " +
        ShapeString(out_accum.dims) + " and lse_accum " + ShapeString(lse_accum.dims));
  }
  *splits = static_cast<int>(n);
  return {};
}

}  // namespace

Status kvcache_fwd(const KVCacheInputs& in, const KVCacheAttrs& attrs, const Tensor& out,
                   const Tensor& lse, const Tensor& out_accum, const Tensor& lse_accum,
                   cudaStream_t stream) {
  Sizes z;
  Status s;
  int splits = 1;
  if (!(s = CheckInputs(in, attrs, &z)).ok()) return s;
  if (!(s = CheckAttrs(attrs, z)).ok()) return s;
  if (!(s = CheckResults(in.q, z, out, lse, out_accum, lse_accum, &splits)).ok()) return s;

  // The compiled head dim, tile and row blocks; the splits are the
  // scratch's. The tile depends on the device's shared memory per block
  // (unknown if the query fails: the plan then takes the wide tile).
  KVCacheProblem problem;
  problem.batch = z.batch;
  problem.seqlen_q = z.seqlen_q;
  problem.nheads = z.nheads;
  problem.nheads_k = z.nheads_k;
  problem.head_dim = z.head_dim;
  problem.seqlen_cache = z.seqlen_cache;
  problem.num_splits = splits;
  problem.page_size = attrs.paged ? z.page_size : 0;
  DeviceInfo device;
  if (!current_device_info(&device).empty()) device = DeviceInfo{};
  KVCachePlan plan;
  const std::string err = make_kvcache_plan(problem, device, &plan);
  if (!err.empty()) return Status::Invalid(err);
  if (z.batch == 0 || z.seqlen_q == 0 || z.nheads == 0) return {};  // nothing to write

  DecodeParams p;
  p.q_ptr = in.q.data;
  p.k_ptr = in.k_cache.data;
  p.v_ptr = in.v_cache.data;
  p.o_ptr = out.data;
  p.lse_ptr = static_cast<float*>(lse.data);
  p.o_accum_ptr = splits > 1 ? static_cast<float*>(out_accum.data) : nullptr;
  p.lse_accum_ptr = splits > 1 ? static_cast<float*>(lse_accum.data) : nullptr;
  p.cache_seqlens = static_cast<const int*>(in.cache_seqlens.data);
  p.cache_batch_idx = TableOrNull(in.cache_batch_idx);
  p.cache_leftpad = TableOrNull(in.cache_leftpad);
  p.block_table = attrs.paged ? TableOrNull(in.block_table) : nullptr;
  p.alibi_slopes = in.alibi.size() != 0 ? static_cast<const float*>(in.alibi.data) : nullptr;
  p.batch = static_cast<int>(z.batch);
  p.seqlen_q = static_cast<int>(z.seqlen_q);
  p.nheads = static_cast<int>(z.nheads);
  p.nheads_k = static_cast<int>(z.nheads_k);
  p.group = p.nheads / p.nheads_k;
  p.head_dim = static_cast<int>(z.head_dim);
  p.seqlen_cache = static_cast<int>(z.seqlen_cache);
  p.seqlen_new = attrs.seqlen_new;
  p.num_pages = static_cast<int>(z.num_pages);
  p.page_size = static_cast<int>(z.page_size);
  p.max_blocks = static_cast<int>(z.max_blocks);
  p.cache_row_stride = z.nheads_k * z.head_dim;
  // The units of common/params.h: exp(score) = exp2(x), x in scale_log2 units.
  constexpr float kLog2e = 1.4426950408889634f;
  p.softcap_premul = attrs.softcap > 0.f ? attrs.softmax_scale / attrs.softcap : 0.f;
  p.scale_log2 = (attrs.softcap > 0.f ? attrs.softcap : attrs.softmax_scale) * kLog2e;
  // A left window >= seqlen_cache or a right one >= seqlen_q never binds
  // (_src/kvcache.py): clamping there keeps the kernel's int arithmetic small.
  const int64_t never_binds = z.seqlen_cache + z.seqlen_q;
  p.window_left = static_cast<int>(std::min<int64_t>(attrs.window_left, never_binds));
  p.window_right = static_cast<int>(std::min<int64_t>(attrs.window_right, never_binds));
  p.num_splits = splits;
  p.narrow = plan.narrow;
  p.copy_engine = plan.copy_engine;
  p.box_rows = static_cast<int>(attrs.paged ? std::min<int64_t>(z.page_size, plan.block_n)
                                            : plan.block_n);
  p.m_blocks = static_cast<int>(plan.m_blocks);
  p.dependent_combine = device.cc_major >= 9;
  const cudaError_t launch =
      run_decode(plan, in.q.type == ElementType::kF16 ? Dtype::kFloat16 : Dtype::kBFloat16, p,
                 stream);
  if (launch != cudaSuccess) {
    return {Status::kInternal,
            std::string("jax_flash kv-cache kernel launch failed: ") + cudaGetErrorString(launch)};
  }
  return {};
}

namespace {

// k, v, the rotary tables and the results of an append; *z from CheckInputs.
Status CheckAppend(const KVCacheAppendInputs& in, const Sizes& z, const Tensor& q_out,
                   const Tensor& k_cache_out, const Tensor& v_cache_out, int64_t* rotary_dim) {
  const Dims rows = {z.batch, in.k.dims.size() == 4 ? in.k.dims[1] : -1, z.nheads_k, z.head_dim};
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"k", in.k}, {"v", in.v}}) {
    if (t.type != in.q.type || t.dims != rows || rows[1] < 0 || rows[1] > z.seqlen_cache) {
      return Invalid(name, "of q's dtype (batch, seqlen_new, nheads_k, head_dim) with batch " +
                               std::to_string(z.batch) + ", nheads_k " +
                               std::to_string(z.nheads_k) + ", head_dim " +
                               std::to_string(z.head_dim) + ", seqlen_new <= seqlen_cache " +
                               std::to_string(z.seqlen_cache), t);
    }
  }
  const Tensor &cos = in.rotary_cos, &sin = in.rotary_sin;
  *rotary_dim = 0;
  if (cos.size() != 0 || sin.size() != 0) {
    if (cos.type != in.q.type || cos.dims.size() != 2 || sin.dims != cos.dims ||
        sin.type != cos.type || cos.dims[0] < 1 || cos.dims[1] < 1 ||
        2 * cos.dims[1] > z.head_dim) {
      return Invalid("rotary_cos/rotary_sin", "of q's dtype, both (seqlen_ro, rotary_dim / 2) "
                     "with seqlen_ro >= 1 and 2 <= rotary_dim <= head_dim " +
                     std::to_string(z.head_dim) + "; rotary_sin " + ShapeString(sin.dims), cos);
    }
    *rotary_dim = 2 * cos.dims[1];
  }
  if (*rotary_dim ? q_out.type != in.q.type || q_out.dims != in.q.dims : q_out.size() != 0) {
    return Invalid("q_out", *rotary_dim ? "of q's shape " + ShapeString(in.q.dims) + " and dtype"
                                        : std::string("empty without rotary"), q_out);
  }
  for (const auto& [name, out, cache] :
       {std::tuple<const char*, const Tensor&, const Tensor&>{"k_cache result", k_cache_out,
                                                              in.k_cache},
        {"v_cache result", v_cache_out, in.v_cache}}) {
    if (out.data != cache.data || out.dims != cache.dims || out.type != cache.type) {
      return Invalid(name, "the cache operand's own buffer (aliased) of shape " +
                               ShapeString(cache.dims), out);
    }
  }
  // Rows (one block each) and row widths (int offsets in the kernel).
  for (int64_t n : {z.batch * rows[1], z.batch * z.seqlen_q, z.nheads * z.head_dim}) {
    if (n >= kMaxSize) {
      return Status::Invalid("batch * seqlen_new, batch * seqlen_q and nheads * head_dim must "
                             "be < 2^29, got q " + ShapeString(in.q.dims) + ", k " +
                             ShapeString(in.k.dims));
    }
  }
  // A block per (new row, K/V head) and per (q row, head) with rotary.
  const int64_t blocks = z.batch * rows[1] * z.nheads_k +
                         (*rotary_dim ? z.batch * z.seqlen_q * z.nheads : 0);
  if (blocks >= kMaxBlocks) {
    return Status::Invalid("batch * (seqlen_new * nheads_k + seqlen_q * nheads) must be < 2^31, "
                           "got q " + ShapeString(in.q.dims) + ", k " + ShapeString(in.k.dims));
  }
  return {};
}

}  // namespace

Status kvcache_append(const KVCacheAppendInputs& in, const KVCacheAppendAttrs& attrs,
                      const Tensor& q_out, const Tensor& k_cache_out, const Tensor& v_cache_out,
                      cudaStream_t stream) {
  const Tensor no_alibi{nullptr, ElementType::kF32, {0}};
  const KVCacheInputs tables{in.q,           in.k_cache,         in.v_cache,
                             in.cache_seqlens, in.cache_batch_idx, in.cache_leftpad,
                             in.block_table, no_alibi};
  KVCacheAttrs layout;
  layout.paged = attrs.paged;
  Sizes z;
  Status s;
  int64_t rotary_dim = 0;
  if (!(s = CheckInputs(tables, layout, &z)).ok()) return s;
  if (!(s = CheckAppend(in, z, q_out, k_cache_out, v_cache_out, &rotary_dim)).ok()) return s;

  KVCacheAppendParams a;
  a.q = rotary_dim ? in.q.data : nullptr;
  a.q_out = rotary_dim ? q_out.data : nullptr;
  a.k = in.k.data;
  a.v = in.v.data;
  a.k_cache = k_cache_out.data;
  a.v_cache = v_cache_out.data;
  a.rotary_cos = rotary_dim ? in.rotary_cos.data : nullptr;
  a.rotary_sin = rotary_dim ? in.rotary_sin.data : nullptr;
  a.cache_seqlens = static_cast<const int*>(in.cache_seqlens.data);
  a.cache_batch_idx = TableOrNull(in.cache_batch_idx);
  a.cache_leftpad = TableOrNull(in.cache_leftpad);
  a.block_table = attrs.paged ? TableOrNull(in.block_table) : nullptr;
  a.batch = static_cast<int>(z.batch);
  a.seqlen_q = static_cast<int>(z.seqlen_q);
  a.seqlen_new = static_cast<int>(in.k.dims[1]);
  a.nheads = static_cast<int>(z.nheads);
  a.nheads_k = static_cast<int>(z.nheads_k);
  a.head_dim = static_cast<int>(z.head_dim);
  a.rotary_dim = static_cast<int>(rotary_dim);
  a.seqlen_ro = rotary_dim ? static_cast<int>(std::min<int64_t>(in.rotary_cos.dims[0], kMaxSize))
                           : 0;
  a.seqlen_cache = static_cast<int>(z.seqlen_cache);
  a.batch_cache = static_cast<int>(z.num_pages);
  a.page_size = static_cast<int>(z.page_size);
  a.max_blocks = static_cast<int>(z.max_blocks);
  a.bf16 = in.q.type == ElementType::kBF16;
  a.interleaved = attrs.rotary_interleaved;
  a.q_per_row = attrs.rotary_q_per_row;
  // Distinct slots by construction without a batch index or a block table.
  a.dedupe = a.cache_batch_idx != nullptr || a.block_table != nullptr;
  const cudaError_t launch = launch_kvcache_append(a, stream);
  if (launch != cudaSuccess) {
    return {Status::kInternal, std::string("jax_flash kv-cache append launch failed: ") +
                                   cudaGetErrorString(launch)};
  }
  return {};
}

}  // namespace jax_flash
