// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The kv-cache decode kernels as the host sees them: the launch template the
// generated files in csrc/instantiations/ (decode_hdim*_*.cu) define, for
// float16 (__half) and bfloat16 (__nv_bfloat16) and each compiled head dim.
// Tile facts are in decode/tile.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "params.h"
#include "tile.h"

namespace jax_flash::decode {

// Split kernel, then the combine kernel when params.num_splits > 1.
template <typename Element, int kHeadDim>
cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream);

}  // namespace jax_flash::decode
