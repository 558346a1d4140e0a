// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Runtime value -> template parameter, in one place.
#pragma once

// BOOL_SWITCH(cond, kName, ...) runs the body with `constexpr bool kName`.
#define BOOL_SWITCH(COND, NAME, ...)      \
  [&] {                                   \
    if (COND) {                           \
      constexpr static bool NAME = true;  \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr static bool NAME = false; \
      return __VA_ARGS__();               \
    }                                     \
  }()
