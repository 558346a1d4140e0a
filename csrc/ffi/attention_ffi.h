// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The FFI handler symbols the nanobind module hands to JAX.
#pragma once

#include "xla/ffi/api/api.h"

namespace jax_flash {

// Forward attention: (q, k, v) -> (out, lse).
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttnFwd);

// Backward attention: (q, k, v, out, lse, d_out) -> (dq, dk, dv, scratch...).
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttnBwd);

// Smallest compiled forward head dim >= head_dim, or -1.
int CompiledHeadDimFor(int head_dim);

}  // namespace jax_flash
