// Copyright (c) 2026 jax_flash authors. BSD-3-Clause.
//
// The append kernel (csrc/host/kvcache_append_kernel.h) on the CPU: the
// kernel's own source with host stand-ins for the CUDA built-ins, each block
// run as kThreads threads that meet at a real barrier in __syncthreads_or,
// the blocks one after another from the last.
// Built as a shared library by tests/test_kvcache_append_emulation.py and
// called through ctypes (run_append below).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)

namespace emulation {

struct Index {
  unsigned x = 0;
};
thread_local Index thread_index, block_index;
std::barrier<>* block_barrier = nullptr;
std::atomic<int> any_vote{0};

// Every thread of the block arrives; the OR of the votes comes back.
int syncthreads_or(int vote) {
  block_barrier->arrive_and_wait();
  if (vote) any_vote.store(1);
  block_barrier->arrive_and_wait();
  const int result = any_vote.load();
  block_barrier->arrive_and_wait();
  if (thread_index.x == 0) any_vote.store(0);
  block_barrier->arrive_and_wait();
  return result;
}

// Rounded products and sums, never contracted into an FMA (volatile).
float mul_rn(float a, float b) { volatile float r = a * b; return r; }
float add_rn(float a, float b) { volatile float r = a + b; return r; }
float sub_rn(float a, float b) { volatile float r = a - b; return r; }

}  // namespace emulation

#define threadIdx emulation::thread_index
#define blockIdx emulation::block_index
#define __syncthreads_or emulation::syncthreads_or
#define __fmul_rn emulation::mul_rn
#define __fadd_rn emulation::add_rn
#define __fsub_rn emulation::sub_rn
using std::max;
using std::min;

#include "host/kvcache_append_kernel.h"

namespace {

template <typename T>
void run_blocks(const jax_flash::KVCacheAppendParams& a, int64_t blocks) {
  constexpr int kThreads = jax_flash::append_kernel::kThreads;
  // Last block first: a GPU runs blocks in no set order, and where rows share
  // a slot the result must not depend on it.
  for (int64_t b = blocks - 1; b >= 0; --b) {
    std::barrier<> barrier(kThreads);
    emulation::block_barrier = &barrier;
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&a, b, t] {
        emulation::thread_index.x = unsigned(t);
        emulation::block_index.x = unsigned(b);
        jax_flash::append_kernel::kvcache_append_kernel<T>(a);
      });
    }
    for (auto& thread : threads) thread.join();
  }
}

}  // namespace

// ptrs: q, q_out, k, v, k_cache, v_cache, rotary_cos, rotary_sin,
// cache_seqlens, cache_batch_idx, cache_leftpad, block_table (null: off).
// sizes: batch, seqlen_q, seqlen_new, nheads, nheads_k, head_dim,
// rotary_dim, seqlen_ro, seqlen_cache, batch_cache, page_size, max_blocks,
// bf16, interleaved, q_per_row, dedupe. The launch's blocks (num_blocks).
extern "C" int run_append(void* const* ptrs, const int* sizes) {
  jax_flash::KVCacheAppendParams a;
  a.q = ptrs[0];
  a.q_out = ptrs[1];
  a.k = ptrs[2];
  a.v = ptrs[3];
  a.k_cache = ptrs[4];
  a.v_cache = ptrs[5];
  a.rotary_cos = ptrs[6];
  a.rotary_sin = ptrs[7];
  a.cache_seqlens = static_cast<const int*>(ptrs[8]);
  a.cache_batch_idx = static_cast<const int*>(ptrs[9]);
  a.cache_leftpad = static_cast<const int*>(ptrs[10]);
  a.block_table = static_cast<const int*>(ptrs[11]);
  a.batch = sizes[0];
  a.seqlen_q = sizes[1];
  a.seqlen_new = sizes[2];
  a.nheads = sizes[3];
  a.nheads_k = sizes[4];
  a.head_dim = sizes[5];
  a.rotary_dim = sizes[6];
  a.seqlen_ro = sizes[7];
  a.seqlen_cache = sizes[8];
  a.batch_cache = sizes[9];
  a.page_size = sizes[10];
  a.max_blocks = sizes[11];
  a.bf16 = sizes[12] != 0;
  a.interleaved = sizes[13] != 0;
  a.q_per_row = sizes[14] != 0;
  a.dedupe = sizes[15] != 0;
  const int64_t blocks = jax_flash::append_kernel::num_blocks(a);
  if (a.bf16) {
    run_blocks<__nv_bfloat16>(a, blocks);
  } else {
    run_blocks<__half>(a, blocks);
  }
  return 0;
}
