// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The current CUDA device's multiprocessor count, shared memory (per
// multiprocessor, and per block with the opt-in), peak DRAM bandwidth and
// compute capability, for the decode plan's tile and splits (host/plan.h)
// and its launches, asked from the CUDA runtime once per device and cached.
#pragma once

#include <string>

#include "plan.h"

namespace jax_flash {

// Fills *info for the calling thread's current device; returns an error
// message (no device, or the runtime failed), or empty.
std::string current_device_info(DeviceInfo* info);

}  // namespace jax_flash
