// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
#include "uncovered_rows.h"

#include "../common/block_info.h"

namespace jax_flash {

// One warp per row.
namespace {

__global__ void zero_uncovered_rows_kernel(const UncoveredRows u) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= u.total) return;
  if (sequence_of_row(u.cu_seqlens, u.batch, u.max_len, u.total, int(row)) >= 0) return;
  for (int b = 0; b < 2; ++b) {
    if (u.ptr[b] == nullptr) continue;
    uint16_t* dst = u.ptr[b] + row * u.row_stride[b];
    for (int i = lane; i < u.row_elems; i += 32) dst[i] = 0;
  }
  if (u.lse != nullptr) {
    for (int h = lane; h < u.nheads; h += 32) u.lse[int64_t(h) * u.total + row] = INFINITY;
  }
}

}  // namespace

cudaError_t zero_uncovered_rows(const UncoveredRows& u, cudaStream_t stream) {
  if (u.total == 0) return cudaSuccess;
  constexpr int kWarps = 8;
  const int64_t blocks = (int64_t(u.total) + kWarps - 1) / kWarps;
  zero_uncovered_rows_kernel<<<unsigned(blocks), 32 * kWarps, 0, stream>>>(u);
  return cudaGetLastError();
}

}  // namespace jax_flash
