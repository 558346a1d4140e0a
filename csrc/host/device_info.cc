// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
#include "device_info.h"

#include <cuda_runtime_api.h>

#include <map>
#include <mutex>

namespace jax_flash {

std::string current_device_info(DeviceInfo* info) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    static std::mutex mutex;
    static std::map<int, DeviceInfo> cache;
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache.find(device);
    if (found != cache.end()) {
      *info = found->second;
      return "";
    }
    DeviceInfo d;
    err = cudaDeviceGetAttribute(&d.num_sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                   device);
    }
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&d.smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                   device);
    }
    if (err == cudaSuccess) {
      // Peak DRAM bandwidth: two transfers a memory clock over the bus
      // (an H100 SXM: 2.62 GHz x 5120 bits, 3.35 TB/s). Unknown (0) when
      // the runtime does not say.
      int clock_khz = 0, bus_bits = 0;
      if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device) == cudaSuccess &&
          cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device) ==
              cudaSuccess) {
        d.dram_gbps = static_cast<int>(2.0 * clock_khz * 1e3 * (bus_bits / 8) / 1e9);
      }
      if (cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device) !=
          cudaSuccess) {
        d.cc_major = 0;
      }
      cudaGetLastError();
      cache[device] = d;
      *info = d;
      return "";
    }
  }
  // The failed query must not linger as the runtime's sticky "last error",
  // where a later kernel launch check would find it.
  cudaGetLastError();
  return std::string("could not query the CUDA device's multiprocessor count and shared memory: ") +
         cudaGetErrorString(err);
}

}  // namespace jax_flash
