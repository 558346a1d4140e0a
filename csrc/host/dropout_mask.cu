// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
#include "dropout_mask.h"

#include <algorithm>

#include "../common/dropout.h"

namespace jax_flash {
namespace {

// One thread per entry, grid-stride.
__global__ void dropout_mask_kernel(const uint32_t* rng, uint8_t* keep, int64_t total,
                                    int nheads, int seqlen_q, int seqlen_k, uint32_t threshold) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int col = int(i % seqlen_k);
    const int row = int((i / seqlen_k) % seqlen_q);
    const int head = int((i / (int64_t(seqlen_k) * seqlen_q)) % nheads);
    const int64_t b = i / (int64_t(seqlen_k) * seqlen_q * nheads);
    const uint4 r = reinterpret_cast<const uint4*>(rng)[b];
    // r.w: the first global head of a head-sharded call (0 otherwise).
    keep[i] = dropout_keep(make_uint2(r.x, r.y), r.z, r.w + head, row, col, threshold);
  }
}

}  // namespace

cudaError_t run_dropout_mask(const uint32_t* rng, uint8_t* keep, int64_t batch, int nheads,
                             int seqlen_q, int seqlen_k, uint32_t threshold, cudaStream_t stream) {
  const int64_t total = batch * nheads * int64_t(seqlen_q) * seqlen_k;
  if (total == 0) return cudaSuccess;
  const int blocks = int(std::min<int64_t>((total + 255) / 256, 65536));
  dropout_mask_kernel<<<blocks, 256, 0, stream>>>(rng, keep, total, nheads, seqlen_q, seqlen_k,
                                                  threshold);
  return cudaGetLastError();
}

}  // namespace jax_flash
