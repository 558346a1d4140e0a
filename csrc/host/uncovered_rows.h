// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Varlen outputs are whole buffers (total rows), but the attention kernels
// only write the rows some sequence covers (block_info.h: SeqRows). This
// kernel gives every other row a defined value: 0 in the 16-bit buffers
// (out, dk, dv) and +inf in the LSE, as for a query that sees no key. It
// runs after the attention kernel, so rows a sequence did write stay as
// they are. With consistent cu_seqlens (from 0 to total, lengths <=
// max_seqlen) it writes nothing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/params.h"

namespace jax_flash {

struct UncoveredRows {
  const int* cu_seqlens;  // (batch + 1,)
  int batch, max_len, total;
  // Up to two 16-bit buffers whose rows are zeroed: `row_elems` contiguous
  // elements at ptr + row * row_stride.
  uint16_t* ptr[2];
  int64_t row_stride[2];
  int row_elems;
  float* lse;  // (nheads, total) or nullptr
  int nheads;
};

// Launches one warp per row of the buffer (see above).
cudaError_t zero_uncovered_rows(const UncoveredRows& u, cudaStream_t stream);

}  // namespace jax_flash
