// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The Python extension `jax_flash._C`: FFI handler capsules for
// jax.ffi.register_ffi_target, and what the build compiled.
#include <nanobind/nanobind.h>

#include <type_traits>

#include "attention_ffi.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_C, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["jax_flash_fwd"] = Capsule(jax_flash::AttnFwd);
    targets["jax_flash_fwd_kvpacked"] = Capsule(jax_flash::AttnFwdKvpacked);
    targets["jax_flash_fwd_qkvpacked"] = Capsule(jax_flash::AttnFwdQkvpacked);
    targets["jax_flash_bwd"] = Capsule(jax_flash::AttnBwd);
    targets["jax_flash_bwd_kvpacked"] = Capsule(jax_flash::AttnBwdKvpacked);
    targets["jax_flash_bwd_qkvpacked"] = Capsule(jax_flash::AttnBwdQkvpacked);
    targets["jax_flash_dropout_mask"] = Capsule(jax_flash::DropoutMask);
    return targets;
  }, "FFI target name -> handler capsule, for platform CUDA.");
  m.def("compiled_head_dims", []() {
    nb::list dims;
    int last = 0;
    for (int d = 8; d <= 256; d += 8) {
      const int k = jax_flash::CompiledHeadDimFor(d);
      if (k > 0 && k != last) dims.append(k), last = k;
    }
    return dims;
  }, "Head dims with a compiled forward kernel; others run on the next larger one.");
}
