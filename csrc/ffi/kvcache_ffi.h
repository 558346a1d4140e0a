// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The FFI handler symbol of flash_attn_with_kvcache's kernels.
#pragma once

#include "xla/ffi/api/api.h"

namespace jax_flash {

// (q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad,
// block_table, alibi_slopes) -> (out, lse, out_accum, lse_accum).
XLA_FFI_DECLARE_HANDLER_SYMBOL(KVCacheFwd);

}  // namespace jax_flash
