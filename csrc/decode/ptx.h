// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The instructions the decode kernels use, one wrapper each: cp.async
// (global -> shared, 16 B, zero-filling), sm_90's copy engine (bulk tensor
// copies on mbarriers), ldmatrix, mma.sync m16n8k16 with
// float32 accumulators, the fast exp2/tanh, and sm_90's grid dependency
// control (no-ops on earlier devices). Register layouts are those of
// the PTX ISA ("Matrix Fragments for mma.m16n8k16"); with g = lane / 4 and
// t = lane % 4 a thread holds
//   A (16 x 16, row-major) a0 = A[g][2t..2t+1]   a1 = A[g+8][2t..2t+1]
//                          a2 = A[g][2t+8..+9]   a3 = A[g+8][2t+8..+9]
//   B (16 x 8, column)     b0 = B[2t..2t+1][g]   b1 = B[2t+8..2t+9][g]
//   C (16 x 8, float32)    c0, c1 = C[g][2t..2t+1]   c2, c3 = C[g+8][2t..2t+1]
// where a register's low 16 bits hold the element of the lower index.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace jax_flash::decode {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- Global -> shared --------------------------------------------------------
// 16 bytes from src to the shared address dst, bypassing L1 (.cg: K/V bytes
// are read once). With valid false nothing is read (src-size 0, src may be
// any mapped address) and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_size)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most kPending of this thread's committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---- The copy engine (sm_90): bulk tensor copies completing on an mbarrier ----
// Used by the kernels of decode/tma.h only, which the host launches on
// sm_90 and later; earlier targets compile them to a trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define JAX_FLASH_DECODE_COPY_ENGINE 1
#endif

__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
#ifdef JAX_FLASH_DECODE_COPY_ENGINE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
  // The copy engine (the async proxy) sees the initialised barrier.
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One arrival that also expects `bytes` more of the barrier's current phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, int bytes) {
#ifdef JAX_FLASH_DECODE_COPY_ENGINE
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#endif
}

// Returns once the barrier's phase of parity `phase` has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, int phase) {
#ifdef JAX_FLASH_DECODE_COPY_ENGINE
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(phase)
        : "memory");
  } while (!done);
#endif
}

// The box of a 2-D tensor map at (column c0, row c1) into shared memory at
// dst (1024-byte aligned for the 128-byte swizzle); its bytes complete on
// `bar`. Boxes past the tensor's edge are zero-filled.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* map, uint32_t bar, int c0,
                                            int c1) {
#ifdef JAX_FLASH_DECODE_COPY_ENGINE
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
#endif
}

__device__ __forceinline__ void prefetch_tensor_map(const void* map) {
#ifdef JAX_FLASH_DECODE_COPY_ENGINE
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}

// Orders this thread's ordinary shared-memory writes before later copy
// engine writes to the same bytes (after a barrier between them).
__device__ __forceinline__ void fence_proxy_async_shared() {
#ifdef JAX_FLASH_DECODE_COPY_ENGINE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// ---- Programmatic dependent launch (sm_90; no-ops before) ----------------------
// A grid launched with programmatic stream serialization (launch.h) may
// start while the grid before it on the stream still runs: it must wait
// before reading what that grid writes, and wait_prerequisites() returns
// once that grid has exited and its writes are visible. The grid before
// lets it start early with launch_dependents(), from every block (or when
// blocks exit); where that is said only sets how soon the dependent's
// blocks take SM slots, never what the wait guarantees.
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// ---- Shared -> registers -------------------------------------------------------
// Four 8x8 16-bit matrices; lane l gives the address of row l % 8 of matrix
// l / 8, and r[j] receives matrix j's elements (row g, columns 2t, 2t+1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// The same, transposed: r[j] receives matrix j's (rows 2t, 2t+1, column g).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// ---- Tensor cores ------------------------------------------------------------------
// C += A B for one m16n8k16 tile, 16-bit inputs, float32 accumulators.
template <typename Element>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<Element, __half>, "float16 or bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to Element and packed: lo in the low 16 bits.
template <typename Element>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// ---- Special functions ------------------------------------------------------------
// 2^x with one MUFU op; exp2(-inf) = +0, which is what masked scores rely on.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The softcap's tanh, as in the attention kernels (common/score_mods.h).
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace jax_flash::decode
