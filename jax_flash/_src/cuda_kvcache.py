"""`flash_attn_with_kvcache` on our CUDA decode kernels (csrc/decode/).

The kernels only read the cache. The append and the rotary embedding run
here in JAX first, with the reference's own code (`kvcache_ref.update`): the
new rows are one scatter into the caches, which XLA performs in place when
the caches are donated under `jax.jit` (the cache outputs then alias the
inputs), so an appending decode step moves only the new rows besides the
kernel's read. The kernel then reads the updated caches.

FFI contract (csrc/ffi/kvcache_ffi.cc): jax_flash_kvcache_fwd(q, k_cache,
v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
alibi_slopes) -> (out, lse, out_accum, lse_accum), attributes softmax_scale
f32, window_left/right i32, softcap f32, seqlen_new i32, paged bool. The
split scratch out_accum/lse_accum is sized by `_C.kvcache_plan` (plan.py).

Which backend serves kv-cache calls on GPUs: the environment variable
JAX_FLASH_KVCACHE_KERNELS="1" selects these kernels, "0" the plain-JAX
reference, and unset means DEFAULT, on: the kernels pass the GPU tests and
compute-sanitizer's memcheck and racecheck on adversarial tables, and
initcheck on the shared-memory layout before entry 38's
(notes/kernel_experiments.md, entries 36-38).
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


def enabled() -> bool:
    """Whether kv-cache calls may run on the decode kernels: ENV_VAR "1" yes,
    "0" no, unset DEFAULT."""
    value = os.environ.get(ENV_VAR, "")
    return DEFAULT if value == "" else value == "1"


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
