// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// What every FFI handler does with XLA's buffers and attributes: the host
// layer's plain Tensor from a buffer, its Status as an ffi::Error, one named
// attribute from the call's dictionary.
#pragma once

#include <string>

#include "../host/attention.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash {

inline ElementType TypeOf(xla::ffi::DataType dtype) {
  namespace ffi = xla::ffi;
  switch (dtype) {
    case ffi::F16: return ElementType::kF16;
    case ffi::BF16: return ElementType::kBF16;
    case ffi::F32: return ElementType::kF32;
    case ffi::U32: return ElementType::kU32;
    case ffi::S32: return ElementType::kS32;
    case ffi::U8: return ElementType::kU8;
    default: return ElementType::kOther;
  }
}

template <typename Buffer>
Tensor TensorOf(const Buffer& buf) {
  Tensor t;
  t.data = buf.untyped_data();
  t.type = TypeOf(buf.element_type());
  const auto dims = buf.dimensions();
  t.dims.assign(dims.begin(), dims.end());
  return t;
}

inline xla::ffi::Error ToError(const Status& s) {
  switch (s.code) {
    case Status::kOk: return xla::ffi::Error::Success();
    case Status::kInvalidArgument: return xla::ffi::Error::InvalidArgument(s.message);
    case Status::kInternal: break;
  }
  return xla::ffi::Error::Internal(s.message);
}

template <typename T>
xla::ffi::Error GetAttr(const xla::ffi::Dictionary& attrs, const char* name, T* value) {
  auto v = attrs.get<T>(name);
  if (v.has_error()) {
    return xla::ffi::Error::InvalidArgument(std::string("attribute ") + name + ": " +
                                            v.error().message());
  }
  *value = *v;
  return xla::ffi::Error::Success();
}

}  // namespace jax_flash
