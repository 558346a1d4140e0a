// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Host-side launch helpers every kernel family shares.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

namespace jax_flash {

// Beyond 48 KB a kernel must opt in to dynamic shared memory, once per device:
// setting the attribute on every launch would put a driver call (that can wait
// for the device) on the hot path. One flag array per kernel (the template
// argument); racing writers both store true.
template <auto kernel>
cudaError_t opt_in_shared_memory(int bytes) {
  if (bytes < 48 * 1024) return cudaSuccess;
  constexpr int kMaxDevices = 64;
  static bool opted_in[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && opted_in[device]) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && device < kMaxDevices) opted_in[device] = true;
  return err;
}

// A grid's y and z axes take at most 65535 blocks.
constexpr int kMaxGridYZ = 65535;

// Launches a (x, heads, batch) grid as one launch, or, past kMaxGridYZ heads
// or batch elements, as several whose origins go into params.grid_head0 /
// params.grid_batch0. launch(params, grid) launches one of them.
template <typename Params, typename Launch>
cudaError_t launch_grids(const Params& params, unsigned grid_x, int heads, int batch,
                         Launch&& launch) {
  for (int b0 = 0; b0 < batch; b0 += kMaxGridYZ) {
    for (int h0 = 0; h0 < heads; h0 += kMaxGridYZ) {
      Params part = params;
      part.grid_batch0 = b0;
      part.grid_head0 = h0;
      launch(part, dim3(grid_x, std::min(heads - h0, kMaxGridYZ), std::min(batch - b0, kMaxGridYZ)));
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace jax_flash
