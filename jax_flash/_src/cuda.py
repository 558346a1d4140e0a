"""The CUDA backend: jax_flash's forward and backward kernels through XLA
FFI custom calls (`backend.py` makes them one differentiable, partitioned
call).

The FFI contract (targets, operand order, attribute names and types) is
csrc's: jax_flash_fwd{,_kvpacked,_qkvpacked}(*xs, alibi, rng, cu_seqlens_q,
cu_seqlens_k, seg_q, seg_k) and jax_flash_bwd{...}(*xs, out, lse, d_out,
same operands), attributes softmax_scale f32, window_left/right i32, softcap
f32, dropout_p f32, dropout_threshold i32, max_seqlen_q/k i32 (+
deterministic bool for the backward); jax_flash_dropout_mask(rng,
dropout_threshold). Sizes come from the kernel plan (`plan.py`). The
kv-cache layout has its own target and module (`cuda_kvcache.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._src import cuda_kvcache, extension
from jax_flash._src import plan as plan_lib
from jax_flash._src.dropout import dropout_threshold
from jax_flash._src.segments import dense_ranks, segment_tables
from jax_flash._src.spec import AttentionSpec, Operands

# Kernel inputs per packing, and the FFI target suffix that reads them in place:
#   ""    (q, k, v)  q (..., seqlen_q, nheads, d), k/v (..., seqlen_k, nheads_k, d)
#   "kv"  (q, kv)    kv (..., seqlen_k, 2, nheads_k, d)
#   "qkv" (qkv,)     qkv (..., seqlen, 3, nheads, d)
_TARGET_SUFFIX = {"": "", "kv": "_kvpacked", "qkv": "_qkvpacked"}


def _pad_head_dim(kernel_dim: int, *xs):
    """Zero-pads the last dim to kernel_dim: zero columns add nothing to q.k and
    give zero output/gradient columns, which are sliced off."""
    return tuple(
        jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, kernel_dim - x.shape[-1])])
        if kernel_dim != x.shape[-1] else x
        for x in xs
    )


def _q_shape(xs, packing: str):
    """q's logical shape, seqlen_k and nheads_k, without slicing."""
    if packing == "qkv":
        *lead, seqlen, _, nheads, head_dim = xs[0].shape
        return (*lead, seqlen, nheads, head_dim), seqlen, nheads
    kv_shape = xs[1].shape
    return xs[0].shape, kv_shape[-4 if packing == "kv" else -3], kv_shape[-2]


def _score_attrs(spec: AttentionSpec) -> dict:
    # With segment ids the window is folded into the segment tables.
    left, right = (-1, -1) if spec.segments else spec.window
    return dict(
        softmax_scale=np.float32(spec.softmax_scale),
        window_left=np.int32(left),
        window_right=np.int32(right),
        softcap=np.float32(spec.softcap),
        dropout_p=np.float32(spec.dropout_p),
        dropout_threshold=np.int32(dropout_threshold(spec.dropout_p)),
        max_seqlen_q=np.int32(max(spec.max_seqlen_q, 0)),
        max_seqlen_k=np.int32(max(spec.max_seqlen_k, 0)),
    )


def _fwd_kernel(spec: AttentionSpec, xs, operands: Operands):
    """(out, lse) from our CUDA kernel, reading the packed inputs in place."""
    xs = _pad_head_dim(plan_lib.plan(spec).head_dim_padded, *xs)
    q_shape, _, _ = _q_shape(xs, spec.packing)
    *lead, seqlen_q, nheads, _ = q_shape
    out_types = (
        jax.ShapeDtypeStruct(q_shape, xs[0].dtype),
        jax.ShapeDtypeStruct((*lead, nheads, seqlen_q), jnp.float32),
    )
    target = "jax_flash_fwd" + _TARGET_SUFFIX[spec.packing]
    out, lse = jax.ffi.ffi_call(target, out_types)(
        *xs, *operands, **_score_attrs(spec)
    )
    return out[..., :spec.head_dim], lse


def _bwd_kernel(spec: AttentionSpec, xs, operands: Operands, out, lse, d_out):
    """Gradients of the inputs xs, in their (packed) layout, from our kernels."""
    plan = plan_lib.plan(spec)
    *xs, out, d_out = _pad_head_dim(plan.head_dim_padded, *xs, out, d_out)
    q_shape, _, _ = _q_shape(xs, spec.packing)
    *lead, seqlen_q, nheads, _ = q_shape
    # The plan's scratch shapes are per leading batch element for the fixed
    # layout; a varlen call is one (1, total, ...) buffer with whole shapes.
    accum_lead = () if spec.varlen else tuple(lead)
    out_types = (
        *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs),
        # Scratch the kernels need, allocated by XLA and dropped here.
        jax.ShapeDtypeStruct((*accum_lead, *plan.dq_accum_shape), jnp.float32),  # dq_accum
        jax.ShapeDtypeStruct((*lead, nheads, seqlen_q), jnp.float32),  # softmax_d (lse's layout)
        jax.ShapeDtypeStruct((*accum_lead, *plan.dq_semaphore_shape), jnp.int32),  # dq_semaphore
    )
    target = "jax_flash_bwd" + _TARGET_SUFFIX[spec.packing]
    grads = jax.ffi.ffi_call(target, out_types)(
        *xs, out, lse, d_out, *operands, deterministic=bool(spec.deterministic),
        **_score_attrs(spec)
    )
    return tuple(g[..., :spec.head_dim] for g in grads[: len(xs)])


class CudaBackend:
    """FlashAttention-2 kernels for sm80+ (the "sm80" family of `_C.plan`)."""

    name = "cuda-sm80"

    def supports(self, spec: AttentionSpec, platform: str) -> bool:
        """Every spec on a GPU: a missing extension is an error there
        (kernels_or_raise), never a silent fallback to the reference. The
        kv-cache layout runs on the decode kernels when
        `cuda_kvcache.enabled()` (JAX_FLASH_KVCACHE_KERNELS), else on the
        reference."""
        if spec.layout == "kvcache":
            return platform == "gpu" and cuda_kvcache.enabled()
        return platform == "gpu"

    def prepare(self, spec: AttentionSpec, operands: Operands) -> Operands:
        if not spec.segments:
            return operands
        ids = operands.seg_q, operands.seg_k
        if max(jnp.dtype(x.dtype).itemsize for x in ids) > 4:
            # int32 cannot hold 64-bit ids; their ranks compare the same.
            ids = dense_ranks(*ids)
        # Up to 32 bits the cast to int32 is one-to-one: ids stay exact.
        tables = segment_tables(*(x.astype(jnp.int32) for x in ids), *spec.window)
        return operands._replace(seg_q=tables[0], seg_k=tables[1])

    def forward(self, spec: AttentionSpec, xs, operands: Operands):
        extension.kernels_or_raise()
        return _fwd_kernel(spec, xs, operands)

    def kvcache_forward(self, spec, xs, operands, switches):
        extension.kernels_or_raise()
        return cuda_kvcache.forward(spec, xs, operands, switches)

    def backward(self, spec: AttentionSpec, xs, operands: Operands, out, lse, d_out):
        extension.kernels_or_raise()
        return _bwd_kernel(spec, xs, operands, out, lse, d_out)

    def dropout_mask(self, spec: AttentionSpec, q_shape, seqlen_k: int, rng):
        """The kernels' keep-mask (batch, nheads, seqlen_q, seqlen_k), bool."""
        batch, seqlen_q, nheads, _ = q_shape
        keep = jax.ffi.ffi_call(
            "jax_flash_dropout_mask",
            jax.ShapeDtypeStruct((batch, nheads, seqlen_q, seqlen_k), jnp.uint8),
            vmap_method="broadcast_all",
        )(rng, dropout_threshold=np.int32(dropout_threshold(spec.dropout_p)))
        return keep != 0
