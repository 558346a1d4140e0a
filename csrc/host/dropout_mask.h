// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The attention kernels' dropout mask on its own, for return_attn_probs and
// tests: the same bits the kernels draw (score_mods.h), written out.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_flash {

// keep: (batch, nheads, seqlen_q, seqlen_k) uint8, 1 = kept. rng: (batch, 4)
// as AttnParams::rng_ptr.
cudaError_t run_dropout_mask(const uint32_t* rng, uint8_t* keep, int64_t batch, int nheads,
                             int seqlen_q, int seqlen_k, uint32_t threshold, cudaStream_t stream);

}  // namespace jax_flash
