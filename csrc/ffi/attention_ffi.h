// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The FFI handler symbols the nanobind module hands to JAX.
#pragma once

#include "xla/ffi/api/api.h"

namespace jax_flash {

// Forward attention: (q, k, v, optional operands) -> (out, lse); the packed
// variants take (q, kv) or (qkv) and read the packed buffers in place.
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttnFwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttnFwdKvpacked);
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttnFwdQkvpacked);

// Backward attention: (q, k, v, out, lse, d_out, optional operands) ->
// (dq, dk, dv, scratch...); the packed variants write dkv or dqkv in the
// packed layout directly.
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttnBwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttnBwdKvpacked);
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttnBwdQkvpacked);

// The dropout mask the attention kernels draw: rng -> keep (uint8).
XLA_FFI_DECLARE_HANDLER_SYMBOL(DropoutMask);

}  // namespace jax_flash
