// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
#include "kvcache_append.h"

#include "kvcache_append_kernel.h"

namespace jax_flash {

cudaError_t launch_kvcache_append(const KVCacheAppendParams& a, cudaStream_t stream) {
  using append_kernel::kThreads;
  using append_kernel::kvcache_append_kernel;
  const int64_t blocks = append_kernel::num_blocks(a);
  if (blocks == 0) return cudaSuccess;
  if (blocks >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  if (a.bf16) {
    kvcache_append_kernel<__nv_bfloat16><<<unsigned(blocks), kThreads, 0, stream>>>(a);
  } else {
    kvcache_append_kernel<__half><<<unsigned(blocks), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace jax_flash
