// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The kv-cache handlers (decode, append): typed buffers and a dictionary of
// attributes into host/kvcache.h's plain structs, the status back as an
// ffi::Error.
#include "kvcache_ffi.h"

#include <cuda_runtime.h>

#include "../host/kvcache.h"
#include "buffers.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash {
namespace {

namespace ffi = xla::ffi;

// softmax_scale f32, window_left / window_right i32 (-1: unbounded),
// softcap f32 (0: off), seqlen_new i32, paged bool.
ffi::Error ReadKVCacheAttrs(const ffi::Dictionary& d, KVCacheAttrs* a) {
  ffi::Error e = ffi::Error::Success();
  if ((e = GetAttr(d, "softmax_scale", &a->softmax_scale)).failure() ||
      (e = GetAttr(d, "window_left", &a->window_left)).failure() ||
      (e = GetAttr(d, "window_right", &a->window_right)).failure() ||
      (e = GetAttr(d, "softcap", &a->softcap)).failure() ||
      (e = GetAttr(d, "seqlen_new", &a->seqlen_new)).failure()) {
    return e;
  }
  return GetAttr(d, "paged", &a->paged);
}

ffi::Error KVCacheFwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                          ffi::AnyBuffer v_cache, ffi::AnyBuffer cache_seqlens,
                          ffi::AnyBuffer cache_batch_idx, ffi::AnyBuffer cache_leftpad,
                          ffi::AnyBuffer block_table, ffi::AnyBuffer alibi,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                          ffi::Result<ffi::AnyBuffer> out_accum,
                          ffi::Result<ffi::AnyBuffer> lse_accum, ffi::Dictionary attrs) {
  KVCacheAttrs a;
  if (auto e = ReadKVCacheAttrs(attrs, &a); e.failure()) return e;
  const KVCacheInputs in{TensorOf(q),           TensorOf(k_cache),       TensorOf(v_cache),
                         TensorOf(cache_seqlens), TensorOf(cache_batch_idx),
                         TensorOf(cache_leftpad), TensorOf(block_table), TensorOf(alibi)};
  return ToError(kvcache_fwd(in, a, TensorOf(*out), TensorOf(*lse), TensorOf(*out_accum),
                             TensorOf(*lse_accum), stream));
}

// paged, rotary_interleaved, rotary_q_per_row: bools.
ffi::Error KVCacheAppendImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                             ffi::AnyBuffer v, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                             ffi::AnyBuffer cache_seqlens, ffi::AnyBuffer cache_batch_idx,
                             ffi::AnyBuffer cache_leftpad, ffi::AnyBuffer block_table,
                             ffi::AnyBuffer rotary_cos, ffi::AnyBuffer rotary_sin,
                             ffi::Result<ffi::AnyBuffer> q_out,
                             ffi::Result<ffi::AnyBuffer> k_cache_out,
                             ffi::Result<ffi::AnyBuffer> v_cache_out, ffi::Dictionary attrs) {
  KVCacheAppendAttrs a;
  ffi::Error e = ffi::Error::Success();
  if ((e = GetAttr(attrs, "paged", &a.paged)).failure() ||
      (e = GetAttr(attrs, "rotary_interleaved", &a.rotary_interleaved)).failure() ||
      (e = GetAttr(attrs, "rotary_q_per_row", &a.rotary_q_per_row)).failure()) {
    return e;
  }
  const KVCacheAppendInputs in{
      TensorOf(q),           TensorOf(k),           TensorOf(v),
      TensorOf(k_cache),     TensorOf(v_cache),     TensorOf(cache_seqlens),
      TensorOf(cache_batch_idx), TensorOf(cache_leftpad), TensorOf(block_table),
      TensorOf(rotary_cos),  TensorOf(rotary_sin)};
  return ToError(kvcache_append(in, a, TensorOf(*q_out), TensorOf(*k_cache_out),
                                TensorOf(*v_cache_out), stream));
}

}  // namespace

// Operands: q (batch, seqlen_q, nheads, d); k_cache, v_cache contiguous
// (batch_cache, seqlen_cache, nheads_k, d) or paged (num_blocks, page_size,
// nheads_k, d); cache_seqlens int32 (batch,); cache_batch_idx,
// cache_leftpad int32 (batch,) or empty; block_table int32 (batch,
// max_blocks) or empty; alibi_slopes float32 (batch, nheads) or empty.
// Results: out (q's shape), lse float32 (batch, nheads, seqlen_q), then the
// split scratch out_accum, lse_accum (host/plan.h; empty for one split).
XLA_FFI_DEFINE_HANDLER_SYMBOL(KVCacheFwd, KVCacheFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k_cache
                                  .Arg<ffi::AnyBuffer>()  // v_cache
                                  .Arg<ffi::AnyBuffer>()  // cache_seqlens
                                  .Arg<ffi::AnyBuffer>()  // cache_batch_idx
                                  .Arg<ffi::AnyBuffer>()  // cache_leftpad
                                  .Arg<ffi::AnyBuffer>()  // block_table
                                  .Arg<ffi::AnyBuffer>()  // alibi_slopes
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Ret<ffi::AnyBuffer>()  // out_accum
                                  .Ret<ffi::AnyBuffer>()  // lse_accum
                                  .Attrs<ffi::Dictionary>(),
                              {ffi::Traits::kCmdBufferCompatible});

// Operands: q, k, v (batch, seqlen_new, nheads_k, d), k_cache, v_cache and
// the tables as above, rotary_cos, rotary_sin (seqlen_ro, rotary_dim / 2) or
// empty. Results: q_out (q rotated; empty without rotary), then k_cache and
// v_cache, which the call aliases to the cache operands (written in place).
XLA_FFI_DEFINE_HANDLER_SYMBOL(KVCacheAppend, KVCacheAppendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // k_cache
                                  .Arg<ffi::AnyBuffer>()  // v_cache
                                  .Arg<ffi::AnyBuffer>()  // cache_seqlens
                                  .Arg<ffi::AnyBuffer>()  // cache_batch_idx
                                  .Arg<ffi::AnyBuffer>()  // cache_leftpad
                                  .Arg<ffi::AnyBuffer>()  // block_table
                                  .Arg<ffi::AnyBuffer>()  // rotary_cos
                                  .Arg<ffi::AnyBuffer>()  // rotary_sin
                                  .Ret<ffi::AnyBuffer>()  // q_out
                                  .Ret<ffi::AnyBuffer>()  // k_cache (aliased)
                                  .Ret<ffi::AnyBuffer>()  // v_cache (aliased)
                                  .Attrs<ffi::Dictionary>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_flash
