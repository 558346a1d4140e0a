// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The FFI handler symbols of flash_attn_with_kvcache's kernels.
#pragma once

#include "xla/ffi/api/api.h"

namespace jax_flash {

// (q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad,
// block_table, alibi_slopes) -> (out, lse, out_accum, lse_accum).
XLA_FFI_DECLARE_HANDLER_SYMBOL(KVCacheFwd);

// (q, k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad,
// block_table, rotary_cos, rotary_sin) -> (q_out, k_cache, v_cache), the
// caches aliased: the append and rotary before the decode kernels.
XLA_FFI_DECLARE_HANDLER_SYMBOL(KVCacheAppend);

}  // namespace jax_flash
