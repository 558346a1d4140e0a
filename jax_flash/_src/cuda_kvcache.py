"""`flash_attn_with_kvcache` on our CUDA decode kernels (csrc/decode/).

The decode kernels only read the caches. An append (and the rotary
embedding) runs before them, one of two ways:

* the append kernel (csrc/host/kvcache_append.h): one launch rotates q and
  the new keys and writes the new rows into the caches, which the call
  aliases in and out;
* JAX, with the reference's own code (`kvcache_ref.update`): the rotary as
  XLA fusions, the new rows one scatter per cache.

Either way XLA updates the caches in place when they are donated under
`jax.jit`, so an appending decode step moves only the new rows besides the
decode kernel's read.

FFI contracts (csrc/ffi/kvcache_ffi.cc): jax_flash_kvcache_fwd(q, k_cache,
v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
alibi_slopes) -> (out, lse, out_accum, lse_accum), attributes softmax_scale
f32, window_left/right i32, softcap f32, seqlen_new i32, paged bool; the
split scratch out_accum/lse_accum is sized by `_C.kvcache_plan` (plan.py).
jax_flash_kvcache_append(q, k, v, k_cache, v_cache, cache_seqlens,
cache_batch_idx, cache_leftpad, block_table, rotary_cos, rotary_sin) ->
(q_out, k_cache, v_cache), attributes paged, rotary_interleaved,
rotary_q_per_row (bools); q_out is empty without rotary.

Switches (environment variables, read when a call is traced):
JAX_FLASH_KVCACHE_KERNELS="1" selects the decode kernels, "0" the plain-JAX
reference, unset DEFAULT (on: the kernels pass the GPU tests and
compute-sanitizer's memcheck and racecheck on adversarial tables, and
initcheck on the shared-memory layout before entry 38's;
notes/kernel_experiments.md, entries 36-38). JAX_FLASH_KVCACHE_APPEND="1"
runs appends on the append kernel, "0" in JAX, unset APPEND_DEFAULT (off
until the kernel has passed the GPU tests; notes entry 39).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._src import kvcache_ref
from jax_flash._src import plan as plan_lib
from jax_flash._src.kvcache import KVCacheOperands, KVCacheSpec

ENV_VAR = "JAX_FLASH_KVCACHE_KERNELS"
DEFAULT = True  # whether the kernels serve kv-cache calls with ENV_VAR unset
APPEND_ENV_VAR = "JAX_FLASH_KVCACHE_APPEND"
APPEND_DEFAULT = False  # whether appends run on the append kernel with APPEND_ENV_VAR unset
# Where two new rows may share a slot (cache_batch_idx, block_table), each
# of the append kernel's rows compares its slot with every later row's: up
# to this many rows in all; beyond, the append runs in JAX (a sort).
APPEND_KERNEL_MAX_CHECKED_ROWS = 1024
# The append kernel's rows and row widths stay below this (csrc/host/kvcache.cc).
_APPEND_KERNEL_MAX_SIZE = 1 << 29
# Its launch: a block per (new row, K/V head) and per (q row, head) with rotary.
_APPEND_KERNEL_MAX_BLOCKS = 1 << 31


def _switch(name: str, default: bool) -> bool:
    value = os.environ.get(name, "")
    return default if value == "" else value == "1"


def enabled() -> bool:
    """Whether kv-cache calls may run on the decode kernels: ENV_VAR "1" yes,
    "0" no, unset DEFAULT."""
    return _switch(ENV_VAR, DEFAULT)


def append_enabled() -> bool:
    """Whether appends may run on the append kernel: APPEND_ENV_VAR "1" yes,
    "0" no, unset APPEND_DEFAULT."""
    return _switch(APPEND_ENV_VAR, APPEND_DEFAULT)


def append_in_kernel(spec: KVCacheSpec) -> bool:
    """Whether spec's append runs on the append kernel (else in JAX): the
    switch is on, there is something to write, the head dim needs no padding
    (padded caches are copies anyway), the sizes fit the kernel's int
    offsets and grid, and the duplicate-slot check is small."""
    if not (spec.append and spec.batch and append_enabled()):
        return False
    rows = spec.batch * spec.seqlen_new
    if spec.head_dim % 8 or max(rows, spec.batch * spec.seqlen_q,
                                spec.nheads * spec.head_dim) >= _APPEND_KERNEL_MAX_SIZE:
        return False
    blocks = rows * spec.nheads_k + (spec.batch * spec.seqlen_q * spec.nheads
                                     if spec.rotary_dim else 0)
    if blocks >= _APPEND_KERNEL_MAX_BLOCKS:
        return False
    return not (spec.paged or spec.has_batch_idx) or rows <= APPEND_KERNEL_MAX_CHECKED_ROWS


def _append_kernel(spec: KVCacheSpec, xs, operands: KVCacheOperands):
    """(q, k_cache, v_cache) after the append kernel: q rotated, the caches
    written in place (aliased through the call)."""
    q, k_cache, v_cache, k, v = xs
    rotary = spec.rotary_dim > 0
    out_types = (
        jax.ShapeDtypeStruct(q.shape if rotary else (0,), q.dtype),
        jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
        jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
    )
    q_out, k_cache, v_cache = jax.ffi.ffi_call(
        "jax_flash_kvcache_append", out_types, input_output_aliases={3: 1, 4: 2})(
        q, k, v, k_cache, v_cache, operands.cache_seqlens, operands.cache_batch_idx,
        operands.cache_leftpad, operands.block_table, operands.rotary_cos,
        operands.rotary_sin, paged=bool(spec.paged),
        rotary_interleaved=bool(spec.rotary_interleaved),
        rotary_q_per_row=bool(spec.rotary_q_per_row))
    return (q_out if rotary else q), k_cache, v_cache


def _pad_head_dim(kernel_dim: int, *xs):
    """Zero-pads the last dim to kernel_dim (a multiple of 8): zero columns
    add nothing to q.k and give zero output columns. For the caches this is
    a copy of the whole cache: head dims that are not a multiple of 8 work,
    but slowly."""
    return tuple(
        jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, kernel_dim - x.shape[-1])])
        if kernel_dim != x.shape[-1] else x
        for x in xs
    )


def forward(spec: KVCacheSpec, xs, operands: KVCacheOperands):
    """(out, lse, k_cache, v_cache) of one shard, like the reference backend:
    xs = (q, k_cache, v_cache, k, v), k/v None without an append."""
    if append_in_kernel(spec):
        q, k_cache, v_cache = _append_kernel(spec, tuple(jnp.asarray(x) for x in xs), operands)
    else:
        q, k_cache, v_cache = kvcache_ref.update(spec, xs, operands)
    plan = plan_lib.kvcache_plan(spec)
    q_in, k_in, v_in = _pad_head_dim(plan.head_dim_padded, q, k_cache, v_cache)
    out_types = (
        jax.ShapeDtypeStruct(q_in.shape, q_in.dtype),  # out
        jax.ShapeDtypeStruct((spec.batch, spec.nheads, spec.seqlen_q), jnp.float32),  # lse
        # Split scratch, allocated by XLA and dropped here.
        jax.ShapeDtypeStruct(plan.out_accum_shape, jnp.float32),
        jax.ShapeDtypeStruct(plan.lse_accum_shape, jnp.float32),
    )
    out, lse, _, _ = jax.ffi.ffi_call("jax_flash_kvcache_fwd", out_types)(
        q_in, k_in, v_in, operands.cache_seqlens, operands.cache_batch_idx,
        operands.cache_leftpad, operands.block_table, operands.alibi,
        softmax_scale=np.float32(spec.softmax_scale),
        window_left=np.int32(spec.window_left),
        window_right=np.int32(spec.window_right),
        softcap=np.float32(spec.softcap),
        seqlen_new=np.int32(spec.seqlen_new),
        paged=bool(spec.paged),
    )
    return out[..., :spec.head_dim], lse, k_cache, v_cache
