// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The only place that launches the backward kernels: preprocess (D and the
// zeroed dQ accumulator), main, convert (csrc/bwd/kernel.h).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "../common/launch.h"
#include "../common/params.h"
#include "../common/variants.h"
#include "api.h"
#include "bwd_kernel.h"
#include "bwd_traits.h"

namespace jax_flash::bwd {

template <typename Element, int kHeadDim, bool kIsLocal, bool kHasMods, bool kHasDropout,
          bool kHasSegs>
cudaError_t launch_bwd(const AttnBwdParams& params, cudaStream_t stream) {
  using Traits = typename BwdConfig<Element, kHeadDim>::Traits;
  static_assert(Traits::kBlockM == kBwdBlockM, "the plan sizes the dQ accumulator");
  static_assert(Traits::kBlockN >= kBwdBlockNMin, "the plan counts K/V tiles");
  // Ordered dQ additions exist in the orderable variant only (bwd_kernel.h),
  // with one grid (its tickets number the blocks of one launch). The plan
  // asks for them only then; this refuses anything else.
  if (params.dq_semaphore_ptr != nullptr &&
      (!kOrderable<kIsLocal, kHasMods, kHasDropout, kHasSegs> || params.batch > kMaxGridYZ ||
       params.nheads_k > kMaxGridYZ)) {
    return cudaErrorInvalidValue;
  }
  // Rows of lse's layout: (batch, nheads, seqlen_q), or (nheads, total_q).
  const bool varlen = params.cu_seqlens_q != nullptr;
  const int64_t rows = int64_t(varlen ? 1 : params.batch) * params.nheads *
                       (varlen ? params.total_q : params.seqlen_q);
  const int64_t dq_accum_floats = int64_t(varlen ? 1 : params.batch) * params.dq_accum_splits *
                                  params.nheads * params.seqlen_q_rounded * kHeadDim;
  cudaError_t err = cudaSuccess;
  constexpr int kRowsPerBlock = 256 / kSoftmaxDLanesPerRow;
  // rows is 0 for an empty varlen buffer (total_q = 0, max_seqlen_q > 0): the
  // side kernels have nothing to do and a zero-block launch is an error.
  if (rows > 0) {
    // D, and the zeroed dQ accumulator.
    softmax_d_kernel<Element><<<(rows + kRowsPerBlock - 1) / kRowsPerBlock, 256, 0, stream>>>(
        params, dq_accum_floats / 4);
  } else {
    err = cudaMemsetAsync(params.dq_accum_ptr, 0, dq_accum_floats * sizeof(float), stream);
    if (err != cudaSuccess) return err;
    if (params.dq_semaphore_ptr != nullptr) {  // the ticket counter is still read
      err = cudaMemsetAsync(params.dq_semaphore_ptr, 0,
                            (params.dq_semaphore_tiles + 1) * sizeof(int), stream);
      if (err != cudaSuccess) return err;
    }
  }

  const int num_n_blocks = (params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  // Deterministic with slices: one block per accumulator split, each looping
  // over K/V tiles; ordered (dq_semaphore_ptr set): one block per K/V tile.
  const bool slices = params.deterministic && params.dq_semaphore_ptr == nullptr;
  const int grid_x = slices ? params.dq_accum_splits : num_n_blocks;
  constexpr int kSmem = Traits::kSmemBytes;
  constexpr auto kernel = &attn_bwd_kernel<Traits, kIsLocal, kHasMods, kHasDropout, kHasSegs>;
  err = opt_in_shared_memory<kernel>(kSmem);
  if (err != cudaSuccess) return err;
  err = launch_grids(params, grid_x, params.nheads_k, params.batch,
                     [&](const AttnBwdParams& part, dim3 grid) {
                       kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(part);
                     });
  if (err != cudaSuccess) return err;

  const int64_t dq_chunks = rows * (params.head_dim / 8);
  const int convert_blocks = int(std::min<int64_t>((dq_chunks + 255) / 256, 65536));
  if (convert_blocks > 0) {
    convert_dq_kernel<Traits><<<convert_blocks, 256, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace jax_flash::bwd
