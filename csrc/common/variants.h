// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// Kernel variants: which features a compiled kernel handles, as template
// flags (kIsLocal, kHasMods, kHasDropout, kHasSegs). The list itself is
// generated (csrc/generate_kernels.py writes instantiations/variant_table.h);
// this header derives from it the Variant enum, each variant's flags and name,
// the rule that picks a variant for a call, and the switch that turns a
// run-time Variant into compile-time flags. Every kernel family compiles the
// same variants.
#pragma once

#include <type_traits>

#include "../instantiations/variant_table.h"

namespace jax_flash {

enum class Variant : int {
#define JAX_FLASH_VARIANT_ENUM(enumerator, name, local, mods, dropout, segs) enumerator,
  JAX_FLASH_VARIANTS(JAX_FLASH_VARIANT_ENUM)
#undef JAX_FLASH_VARIANT_ENUM
};

// What a kernel handles, or what a call needs.
struct Features {
  bool local = false;    // a window (causal is window_right = 0)
  bool mods = false;     // softcap or ALiBi
  bool dropout = false;  // dropout
  bool segs = false;     // segment ids (their window lives in the segment tables)
};

inline constexpr Features kVariantFeatures[] = {
#define JAX_FLASH_VARIANT_FEATURES(enumerator, name, local, mods, dropout, segs) \
  Features{local, mods, dropout, segs},
    JAX_FLASH_VARIANTS(JAX_FLASH_VARIANT_FEATURES)
#undef JAX_FLASH_VARIANT_FEATURES
};

inline constexpr const char* kVariantNames[] = {
#define JAX_FLASH_VARIANT_NAME(enumerator, name, local, mods, dropout, segs) name,
    JAX_FLASH_VARIANTS(JAX_FLASH_VARIANT_NAME)
#undef JAX_FLASH_VARIANT_NAME
};

inline constexpr int kNumVariants = sizeof(kVariantFeatures) / sizeof(kVariantFeatures[0]);

// Whether this build compiled each variant (JAX_FLASH_VARIANTS at configure
// time; only the kernel library's translation units see the definitions).
inline constexpr bool kVariantCompiled[] = {
#define JAX_FLASH_VARIANT_COMPILED(enumerator, name, local, mods, dropout, segs) \
  JAX_FLASH_COMPILED_##enumerator,
    JAX_FLASH_VARIANTS(JAX_FLASH_VARIANT_COMPILED)
#undef JAX_FLASH_VARIANT_COMPILED
};

constexpr Features features_of(Variant v) { return kVariantFeatures[static_cast<int>(v)]; }
constexpr const char* name_of(Variant v) { return kVariantNames[static_cast<int>(v)]; }

constexpr bool covers(Features have, Features need) {
  return (have.local || !need.local) && (have.mods || !need.mods) &&
         (have.dropout || !need.dropout) && (have.segs || !need.segs);
}

// The first (cheapest) compiled variant whose flags cover what the call
// needs; the last variant has every flag and is always compiled.
constexpr Variant choose_variant(Features need) {
  for (int i = 0; i < kNumVariants; ++i) {
    if (kVariantCompiled[i] && covers(kVariantFeatures[i], need)) {
      return static_cast<Variant>(i);
    }
  }
  return static_cast<Variant>(kNumVariants - 1);
}

// Deterministic backward without dQ slices orders the K/V tiles' dQ additions
// with per-tile counters (sm80/bwd_kernel.h). That needs every K/V tile to see
// every Q tile and no modifier: the variant with no flag. This is the one
// statement of that rule; the kernel compiles the ordered path only where it
// holds, and the plan (host/plan.h) asks for it only there.
constexpr bool orders_dq(Features f) { return !f.local && !f.mods && !f.dropout && !f.segs; }

template <bool kIsLocal, bool kHasMods, bool kHasDropout, bool kHasSegs>
inline constexpr bool kOrderable = orders_dq(Features{kIsLocal, kHasMods, kHasDropout, kHasSegs});

// Calls launch(local, mods, dropout, segs), each a std::bool_constant, with
// the flags of variant v; a variant this build did not compile gives
// not_compiled (no reference to its kernels).
template <typename Result, typename Launch>
Result with_variant(Variant v, Launch&& launch, Result not_compiled) {
  switch (v) {
#define JAX_FLASH_VARIANT_CASE(enumerator, name, local, mods, dropout, segs)     \
  case Variant::enumerator:                                                       \
    if constexpr (JAX_FLASH_COMPILED_##enumerator) {                              \
      return launch(std::bool_constant<local>{}, std::bool_constant<mods>{},      \
                    std::bool_constant<dropout>{}, std::bool_constant<segs>{});   \
    } else {                                                                      \
      return not_compiled;                                                        \
    }
    JAX_FLASH_VARIANTS(JAX_FLASH_VARIANT_CASE)
#undef JAX_FLASH_VARIANT_CASE
  }
  __builtin_unreachable();  // every enumerator has its case
}

}  // namespace jax_flash
