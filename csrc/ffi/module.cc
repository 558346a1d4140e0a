// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The Python extension `jax_flash._C`: FFI handler capsules for
// jax.ffi.register_ffi_target, what the build compiled, and the kernel plan
// (host/plan.h) that Python sizes the custom calls' outputs from.
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../host/device_info.h"
#include "../host/plan.h"
#include "attention_ffi.h"
#include "kvcache_ffi.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::tuple Shape(std::initializer_list<int64_t> dims) {
  nb::list l;
  for (int64_t d : dims) l.append(d);
  return nb::tuple(l);
}

nb::tuple Shape(const std::vector<int64_t>& dims) {
  nb::list l;
  for (int64_t d : dims) l.append(d);
  return nb::tuple(l);
}

nb::dict Plan(int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads,
              int64_t nheads_k, int64_t head_dim, int64_t total_q, bool local, bool softcap,
              bool alibi, bool dropout, bool segments, bool deterministic, int num_sms) {
  jax_flash::Problem pb;
  pb.batch = batch;
  pb.seqlen_q = seqlen_q;
  pb.seqlen_k = seqlen_k;
  pb.nheads = nheads;
  pb.nheads_k = nheads_k;
  pb.head_dim = head_dim;
  pb.total_q = total_q;
  pb.local = local;
  pb.softcap = softcap;
  pb.alibi = alibi;
  pb.dropout = dropout;
  pb.segments = segments;
  pb.deterministic = deterministic;
  jax_flash::Plan plan;
  const std::string err = jax_flash::make_plan(pb, &plan);
  if (!err.empty()) throw nb::value_error(err.c_str());
  const jax_flash::DqMode mode = jax_flash::plan_dq_mode(pb, plan, num_sms);
  nb::dict d;
  d["family"] = jax_flash::name_of(plan.family);
  d["variant"] = jax_flash::name_of(plan.variant);
  d["head_dim_padded"] = plan.head_dim_padded;
  d["kernel_head_dim"] = plan.kernel_head_dim;
  d["dq_accum_splits"] = mode.splits;
  d["dq_ordered"] = mode.ordered;
  d["dq_accum_shape"] =
      Shape({mode.splits, nheads, plan.dq_accum_rows, int64_t(plan.kernel_head_dim)});
  d["dq_semaphore_shape"] = Shape({mode.semaphore});
  return d;
}

nb::dict KVCachePlan(int64_t batch, int64_t seqlen_q, int64_t nheads, int64_t nheads_k,
                     int64_t head_dim, int64_t seqlen_cache, int64_t num_splits, int num_sms,
                     int smem_per_sm, int smem_per_block, int64_t page_size, int dram_gbps,
                     int cc_major) {
  jax_flash::KVCacheProblem pb;
  pb.batch = batch;
  pb.seqlen_q = seqlen_q;
  pb.nheads = nheads;
  pb.nheads_k = nheads_k;
  pb.head_dim = head_dim;
  pb.seqlen_cache = seqlen_cache;
  pb.num_splits = num_splits;
  pb.page_size = page_size;
  jax_flash::DeviceInfo device{num_sms, smem_per_sm, smem_per_block, dram_gbps, cc_major};
  if (num_sms <= 0) {
    // The tile needs the device's shared memory; the automatic split count
    // its multiprocessors too. Without a device an explicit split count
    // still plans (with the wide tile).
    const std::string err = jax_flash::current_device_info(&device);
    if (!err.empty() && num_splits == 0) throw std::runtime_error(err + " (pass num_sms)");
    if (!err.empty()) device = jax_flash::DeviceInfo{};
  }
  jax_flash::KVCachePlan plan;
  const std::string err = jax_flash::make_kvcache_plan(pb, device, &plan);
  if (!err.empty()) throw nb::value_error(err.c_str());
  nb::dict d;
  d["head_dim_padded"] = plan.head_dim_padded;
  d["kernel_head_dim"] = plan.kernel_head_dim;
  d["narrow"] = plan.narrow;
  d["block_m"] = plan.block_m;
  d["block_n"] = plan.block_n;
  d["stages"] = plan.stages;
  d["m_blocks"] = plan.m_blocks;
  d["num_splits"] = plan.num_splits;
  d["blocks_per_sm"] = plan.blocks_per_sm;
  d["copy_engine"] = plan.copy_engine;
  d["out_accum_shape"] = Shape(plan.out_accum_shape);
  d["lse_accum_shape"] = Shape(plan.lse_accum_shape);
  d["num_sms"] = device.num_sms;
  d["smem_per_sm"] = device.smem_per_sm;
  d["smem_per_block"] = device.smem_per_block;
  d["dram_gbps"] = device.dram_gbps;
  d["cc_major"] = device.cc_major;
  return d;
}

}  // namespace

NB_MODULE(_C, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["jax_flash_fwd"] = Capsule(jax_flash::AttnFwd);
    targets["jax_flash_fwd_kvpacked"] = Capsule(jax_flash::AttnFwdKvpacked);
    targets["jax_flash_fwd_qkvpacked"] = Capsule(jax_flash::AttnFwdQkvpacked);
    targets["jax_flash_bwd"] = Capsule(jax_flash::AttnBwd);
    targets["jax_flash_bwd_kvpacked"] = Capsule(jax_flash::AttnBwdKvpacked);
    targets["jax_flash_bwd_qkvpacked"] = Capsule(jax_flash::AttnBwdQkvpacked);
    targets["jax_flash_dropout_mask"] = Capsule(jax_flash::DropoutMask);
    targets["jax_flash_kvcache_fwd"] = Capsule(jax_flash::KVCacheFwd);
    targets["jax_flash_kvcache_append"] = Capsule(jax_flash::KVCacheAppend);
    return targets;
  }, "FFI target name -> handler capsule, for platform CUDA.");
  m.def("compiled_head_dims", []() {
    nb::list dims;
    for (int d : jax_flash::compiled_head_dims()) dims.append(d);
    return dims;
  }, "Head dims with compiled kernels; smaller ones run on the next larger one.");
  m.def("build_info", []() {
    nb::dict d;
    nb::list archs, dims, variants;
    for (int arch : {JAX_FLASH_CUDA_ARCH_LIST}) archs.append(arch);
    for (int dim : jax_flash::compiled_head_dims()) dims.append(dim);
    for (const char* name : jax_flash::compiled_variants()) variants.append(name);
    d["cuda_archs"] = archs;
    d["head_dims"] = dims;
    d["variants"] = variants;
    d["families"] = nb::make_tuple(jax_flash::name_of(jax_flash::Family::kSm80));
    d["cuda_version"] = CUDART_VERSION;  // the toolkit the kernels were built with
    return d;
  }, "What this build compiled: CUDA architectures, head dims, variants, kernel families "
     "and the CUDA toolkit version (e.g. 13000 for 13.0).");
  m.def("plan", &Plan, nb::arg("batch"), nb::arg("seqlen_q"), nb::arg("seqlen_k"),
        nb::arg("nheads"), nb::arg("nheads_k"), nb::arg("head_dim"), nb::arg("total_q"),
        nb::arg("local"), nb::arg("softcap"), nb::arg("alibi"), nb::arg("dropout"),
        nb::arg("segments"), nb::arg("deterministic"), nb::arg("num_sms"),
        "The kernel plan of one attention call (csrc/host/plan.h): family, variant, "
        "padded and compiled head dim, and the backward's dQ scratch shapes (per batch "
        "element for the fixed layout, whole for varlen, total_q >= 0).");
  m.def("kvcache_plan", &KVCachePlan, nb::arg("batch"), nb::arg("seqlen_q"), nb::arg("nheads"),
        nb::arg("nheads_k"), nb::arg("head_dim"), nb::arg("seqlen_cache"),
        nb::arg("num_splits"), nb::arg("num_sms") = 0, nb::arg("smem_per_sm") = 0,
        nb::arg("smem_per_block") = 0, nb::arg("page_size") = 0, nb::arg("dram_gbps") = 0,
        nb::arg("cc_major") = 0,
        "The plan of one flash_attn_with_kvcache kernel call (csrc/host/plan.h): padded and "
        "compiled head dim, tile (narrow or wide) and row blocks, the number of splits "
        "(num_splits 0: automatic) and the split scratch shapes, for a device of num_sms "
        "multiprocessors with smem_per_sm / smem_per_block bytes of shared memory "
        "(smem_per_block 0: unknown, the wide tile) and dram_gbps GB/s of DRAM bandwidth "
        "(0: unknown) and compute capability cc_major (0: unknown; the copy engine needs 9), "
        "or for the current CUDA device when num_sms is 0; page_size: keys per page of a "
        "paged cache, 0 contiguous.");
}
