"""FlashAttention-2's Python interface in JAX form.

Validation happens here, in Python, before anything is traced into a kernel:
bad input raises `TypeError`/`ValueError` naming the argument, what was
expected and what arrived.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash import _ffi, reference

_SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16)
MAX_HEAD_DIM = 256
_BWD_BLOCK_M = 64  # Q rows per backward tile (csrc/bwd/api.h kBwdBlockM)
_BWD_BLOCK_N_MIN = 64  # fewest keys per backward K/V tile (csrc/bwd/kernel_traits.h)


class _Static(NamedTuple):
    """Hashable static options of one attention call (custom_vjp nondiff)."""

    softmax_scale: float
    window_left: int
    window_right: int
    deterministic: bool = False
    packing: str = ""  # "", "kv" or "qkv": how the kernel inputs are packed
    softcap: float = 0.0
    dropout_p: float = 0.0


# ---- Validation -------------------------------------------------------------


def _shape_str(x) -> str:
    return str(tuple(x.shape))


def _check_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be a JAX array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 (batch, seqlen, nheads, headdim), "
                f"got shape {_shape_str(x)}"
            )
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16, got {x.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    batch, _, nheads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (batch, seqlen_k, nheads_k, headdim), "
            f"got k {_shape_str(k)} and v {_shape_str(v)}"
        )
    if k.shape[0] != batch:
        raise ValueError(f"k must have batch {batch} like q, got k {_shape_str(k)}")
    if k.shape[3] != head_dim:
        raise ValueError(
            f"k and v must have headdim {head_dim} like q {_shape_str(q)}, got k {_shape_str(k)}"
        )
    nheads_k = k.shape[2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(
            f"nheads of q ({nheads}) must be a multiple of nheads of k/v ({nheads_k})"
        )
    if head_dim > MAX_HEAD_DIM or head_dim < 1:
        raise ValueError(f"headdim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")


def _check_window(window_size, causal: bool) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise TypeError(
            f"window_size must be a pair of ints (left, right), got {window_size!r}"
        ) from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    if causal:
        right = 0  # causal is the window with nothing to the right of the diagonal
    return left, right


def _check_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be a finite number > 0, got {softmax_scale!r}")
    return scale


def _check_softcap(softcap) -> float:
    try:
        value = float(softcap)
    except (TypeError, ValueError):
        raise TypeError(f"softcap must be a float >= 0, got {softcap!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {softcap!r}")
    return value


def _check_alibi(alibi_slopes, batch: int, nheads: int):
    """float32 (batch, nheads) slopes, or None."""
    if alibi_slopes is None:
        return None
    if not hasattr(alibi_slopes, "shape") or not hasattr(alibi_slopes, "dtype"):
        raise TypeError(
            f"alibi_slopes must be a float32 array of shape ({nheads},) or ({batch}, {nheads}), "
            f"got {type(alibi_slopes).__name__}"
        )
    if alibi_slopes.dtype != jnp.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.shape not in ((nheads,), (batch, nheads)):
        raise ValueError(
            f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), "
            f"got {_shape_str(alibi_slopes)}"
        )
    return jnp.broadcast_to(alibi_slopes, (batch, nheads))


def _check_dropout(dropout_p, dropout_key, batch: int):
    """(dropout_p as float, the kernels' rng state (batch, 4) or None)."""
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if p == 0.0:
        return p, None  # a key without dropout is allowed (and unused)
    if dropout_key is None:
        raise ValueError(
            f"dropout_key: expected a JAX PRNG key (jax.random.key(...)) when dropout_p > 0, "
            f"got None (dropout_p={dropout_p!r})"
        )
    dtype = getattr(dropout_key, "dtype", None)
    shape = getattr(dropout_key, "shape", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype == jnp.uint32 and shape == (2,)
    if not (typed or raw):
        raise TypeError(
            "dropout_key must be one JAX PRNG key: a typed key of shape () from "
            f"jax.random.key, or a uint32 (2,) key from jax.random.PRNGKey; got dtype {dtype} "
            f"shape {shape}"
        )
    return p, reference.dropout_rng(dropout_key, batch)


# ---- Kernel path ------------------------------------------------------------


def _kernel_head_dim(head_dim: int) -> int:
    """Head dim the kernel sees: the next multiple of 8 (padded in Python)."""
    padded = -(-head_dim // 8) * 8
    compiled = _ffi.compiled_head_dims()
    if not any(c >= padded for c in compiled):
        raise ValueError(
            f"headdim {head_dim} has no compiled kernel in this build "
            f"(compiled head dims: {list(compiled)}; rebuild with JAX_FLASH_HEADDIMS)"
        )
    return padded


def _pad_head_dim(kernel_dim: int, *xs):
    """Zero-pads the last dim to kernel_dim: zero columns add nothing to q.k and
    give zero output/gradient columns, which are sliced off."""
    return tuple(
        jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, kernel_dim - x.shape[-1])])
        if kernel_dim != x.shape[-1] else x
        for x in xs
    )


# Kernel inputs per packing, and the FFI target suffix that reads them in place:
#   ""    (q, k, v)  q (..., seqlen_q, nheads, d), k/v (..., seqlen_k, nheads_k, d)
#   "kv"  (q, kv)    kv (..., seqlen_k, 2, nheads_k, d)
#   "qkv" (qkv,)     qkv (..., seqlen, 3, nheads, d)
_TARGET_SUFFIX = {"": "", "kv": "_kvpacked", "qkv": "_qkvpacked"}


def _unpack(xs, packing: str):
    """(q, k, v) views of one packing's inputs (slices: copies under XLA)."""
    if packing == "qkv":
        (qkv,) = xs
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    if packing == "kv":
        q, kv = xs
        return q, kv[..., 0, :, :], kv[..., 1, :, :]
    return tuple(xs)


def _q_shape(xs, packing: str):
    """q's logical shape, seqlen_k and nheads_k, without slicing."""
    if packing == "qkv":
        *lead, seqlen, _, nheads, head_dim = xs[0].shape
        return (*lead, seqlen, nheads, head_dim), seqlen, nheads
    kv_shape = xs[1].shape
    return xs[0].shape, kv_shape[-4 if packing == "kv" else -3], kv_shape[-2]


def _score_attrs(static: _Static) -> dict:
    return dict(
        softmax_scale=np.float32(static.softmax_scale),
        window_left=np.int32(static.window_left),
        window_right=np.int32(static.window_right),
        softcap=np.float32(static.softcap),
        dropout_p=np.float32(static.dropout_p),
        dropout_threshold=np.int32(reference.dropout_threshold(static.dropout_p)),
    )


class _Mods(NamedTuple):
    """Array operands of the score modifiers; empty arrays when off (the
    handlers take them either way)."""

    alibi: jax.Array  # float32 (batch, nheads) or (0,)
    rng: jax.Array  # uint32 (batch, 4) or (0,)

    @staticmethod
    def of(alibi, rng) -> "_Mods":
        return _Mods(
            jnp.zeros((0,), jnp.float32) if alibi is None else alibi,
            jnp.zeros((0,), jnp.uint32) if rng is None else rng,
        )


def _fwd_kernel(xs, mods: _Mods, static: _Static):
    """(out, lse) from our CUDA kernel, reading the packed inputs in place."""
    head_dim = xs[0].shape[-1]
    xs = _pad_head_dim(_kernel_head_dim(head_dim), *xs)
    q_shape, _, _ = _q_shape(xs, static.packing)
    *lead, seqlen_q, nheads, _ = q_shape
    out_types = (
        jax.ShapeDtypeStruct(q_shape, xs[0].dtype),
        jax.ShapeDtypeStruct((*lead, nheads, seqlen_q), jnp.float32),
    )
    # Extra leading (vmapped) dims fold into the kernel's batch.
    target = "jax_flash_fwd" + _TARGET_SUFFIX[static.packing]
    out, lse = jax.ffi.ffi_call(target, out_types, vmap_method="broadcast_all")(
        *xs, *mods, **_score_attrs(static)
    )
    return out[..., :head_dim], lse


def _compiled_head_dim(kernel_dim: int) -> int:
    """The compiled kernel that serves kernel_dim (csrc/dispatch.cu's rule)."""
    return min(c for c in _ffi.compiled_head_dims() if c >= kernel_dim)


def _dq_accum_splits(batch: int, nheads_k: int, seqlen_k: int) -> int:
    """Accumulator slices of the deterministic backward: one thread block per
    (slice, K/V head, batch element), so enough slices to fill the GPU once,
    and never more than there are K/V tiles."""
    n_blocks = -(-seqlen_k // _BWD_BLOCK_N_MIN)
    return max(1, min(n_blocks, _ffi.num_sms() // max(1, batch * nheads_k)))


def _bwd_kernel(xs, mods: _Mods, out, lse, d_out, static: _Static):
    """Gradients of the inputs xs, in their (packed) layout, from our kernels."""
    head_dim = xs[0].shape[-1]
    kernel_dim = _kernel_head_dim(head_dim)
    *xs, out, d_out = _pad_head_dim(kernel_dim, *xs, out, d_out)
    q_shape, seqlen_k, nheads_k = _q_shape(xs, static.packing)
    *lead, seqlen_q, nheads, _ = q_shape
    seqlen_q_rounded = -(-seqlen_q // _BWD_BLOCK_M) * _BWD_BLOCK_M
    splits = _dq_accum_splits(math.prod(lead), nheads_k, seqlen_k) if static.deterministic else 1
    out_types = (
        *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs),
        # Scratch the kernels need, allocated by XLA and dropped here.
        jax.ShapeDtypeStruct(  # dq_accum
            (*lead, splits, nheads, seqlen_q_rounded, _compiled_head_dim(kernel_dim)), jnp.float32
        ),
        jax.ShapeDtypeStruct((*lead, nheads, seqlen_q), jnp.float32),  # softmax_d
    )
    target = "jax_flash_bwd" + _TARGET_SUFFIX[static.packing]
    grads = jax.ffi.ffi_call(target, out_types, vmap_method="broadcast_all")(
        *xs, out, lse, d_out, *mods, deterministic=bool(static.deterministic),
        **_score_attrs(static)
    )
    return tuple(g[..., :head_dim] for g in grads[: len(xs)])


def _dropout_mask(q_shape, seqlen_k: int, rng, static: _Static):
    """The kernels' keep-mask (batch, nheads, seqlen_q, seqlen_k), bool."""
    batch, seqlen_q, nheads, _ = q_shape
    if _ffi.on_gpu():
        keep = jax.ffi.ffi_call(
            "jax_flash_dropout_mask",
            jax.ShapeDtypeStruct((batch, nheads, seqlen_q, seqlen_k), jnp.uint8),
            vmap_method="broadcast_all",
        )(rng, dropout_threshold=np.int32(reference.dropout_threshold(static.dropout_p)))
        return keep != 0
    return reference.dropout_keep_mask(rng, nheads, seqlen_q, seqlen_k, static.dropout_p)


def _reference(xs, mods: _Mods, static: _Static):
    q, k, v = _unpack(xs, static.packing)
    batch, seqlen_q, nheads, _ = q.shape
    keep = None
    if static.dropout_p > 0:
        keep = reference.dropout_keep_mask(mods.rng, nheads, seqlen_q, k.shape[1],
                                           static.dropout_p)
    return reference.attention_ref(
        q,
        k,
        v,
        softmax_scale=static.softmax_scale,
        window_size=(static.window_left, static.window_right),
        softcap=static.softcap,
        alibi_slopes=mods.alibi if mods.alibi.size else None,
        dropout_p=static.dropout_p,
        dropout_mask=keep,
        upcast=True,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_gpu(static: _Static, xs, mods: _Mods):
    return _fwd_kernel(xs, mods, static)


def _attention_gpu_fwd(static, xs, mods):
    out, lse = _fwd_kernel(xs, mods, static)
    return (out, lse), (xs, mods, out, lse)


def _attention_gpu_bwd(static, residuals, cotangents):
    # The LSE output is not differentiable: its cotangent is ignored. So are
    # the ALiBi slopes and the dropout RNG state (zero / float0 cotangents).
    xs, mods, out, lse = residuals
    d_out, _ = cotangents
    grads = _bwd_kernel(xs, mods, out, lse, d_out.astype(xs[0].dtype), static)
    no_grad = _Mods(jnp.zeros_like(mods.alibi), np.zeros(mods.rng.shape, jax.dtypes.float0))
    return grads, no_grad


_attention_gpu.defvjp(_attention_gpu_fwd, _attention_gpu_bwd)


def _attention(xs, packing, dropout_p, softmax_scale, causal, window_size, softcap,
               alibi_slopes, deterministic, return_attn_probs, dropout_key):
    """Option validation and dispatch shared by the public functions (which
    check their array arguments first)."""
    q_shape, seqlen_k, _ = _q_shape(xs, packing)
    batch, _, nheads, head_dim = q_shape
    left, right = _check_window(window_size, causal)
    scale = _check_scale(softmax_scale, head_dim)
    softcap = _check_softcap(softcap)
    alibi = _check_alibi(alibi_slopes, batch, nheads)
    dropout_p, rng = _check_dropout(dropout_p, dropout_key, batch)
    static = _Static(scale, left, right, bool(deterministic), packing, softcap, dropout_p)
    mods = _Mods.of(alibi, rng)

    if _ffi.on_gpu():
        _ffi.kernels_or_raise()
        out, lse = _attention_gpu(static, tuple(xs), mods)
    else:
        out, lse = _reference(xs, mods, static)
    if not return_attn_probs:
        return out
    lse = jax.lax.stop_gradient(lse)
    q, k, _ = _unpack(xs, packing)
    probs = reference.attention_probs(
        jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), lse, softmax_scale=scale,
        window_size=(left, right), softcap=softcap, alibi_slopes=alibi)
    if dropout_p > 0:
        keep = _dropout_mask(q_shape, seqlen_k, rng, static)
        probs = jnp.where(keep, probs, -probs)
    return out, lse, probs


# ---- Public API -------------------------------------------------------------


def flash_attn_func(
    q,
    k,
    v,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes=None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    dropout_key=None,
):
    """Exact attention softmax(q k^T * scale) v, FlashAttention-2 style.

    On a CUDA GPU this runs jax_flash's own kernels through an XLA FFI custom
    call (forward and backward kernels); on any other backend it runs
    `jax_flash.reference.attention_ref`. Works under `jax.jit`, `jax.grad`,
    `jax.checkpoint` and `jax.vmap` (extra leading dims fold into the
    kernel's batch).

    Args:
      q: (batch, seqlen_q, nheads, headdim), float16 or bfloat16.
      k: (batch, seqlen_k, nheads_k, headdim), q's dtype; nheads % nheads_k == 0
        (MQA/GQA: query head h reads K/V head h // (nheads // nheads_k)).
      v: (batch, seqlen_k, nheads_k, headdim), q's dtype.
      dropout_p: dropout probability in [0, 1) applied to the attention
        probabilities (kept ones scaled by 1 / (1 - dropout_p)); needs
        dropout_key. Honoured to 2^-17 (16-bit random numbers).
      softmax_scale: scale of q.k; default 1 / sqrt(headdim).
      causal: mask keys after the query, aligned to the bottom-right corner of
        the (seqlen_q, seqlen_k) score matrix when the lengths differ (query i
        sees keys j <= i + seqlen_k - seqlen_q).
      window_size: (left, right) local window around that same diagonal; -1 is
        unbounded. causal=True sets right to 0.
      softcap: if > 0, scores s = scale * q.k become softcap * tanh(s / softcap)
        before masking and softmax (Gemma-2 style); 0 is off.
      alibi_slopes: float32 (nheads,) or (batch, nheads); adds
        -slope * |i + seqlen_k - seqlen_q - j| to the score of query i and key
        j. Not differentiable (treated as a constant).
      deterministic: make the backward pass bit-reproducible. Each thread
        block adds its dQ contributions into its own float32 slice, and the
        slices are summed in a fixed order. There are about
        num_SMs / (batch * nheads_k) slices, each the size of dq in float32
        (at least one), so this mode needs that much extra scratch memory. The
        forward pass is always deterministic.
      return_attn_probs: also return the softmax LSE and the attention
        probabilities (for testing, small sizes: they are materialised).
      dropout_key: a JAX PRNG key (`jax.random.key` or `jax.random.PRNGKey`),
        required when dropout_p > 0. Its bits seed the kernels' counter-based
        RNG (`jax_flash.reference.dropout_keep_mask` is the same mask in plain
        JAX); the forward and backward pass draw the same mask, the same key
        gives bit-identical results and the batch elements get independent
        masks. Under `vmap`, per-example keys give independent masks and an
        unbatched key gives each example the mask it would get alone.

    Returns:
      out: (batch, seqlen_q, nheads, headdim) in q's dtype; or, with
      return_attn_probs=True, `(out, softmax_lse, attn_probs)`: softmax_lse is
      (batch, nheads, seqlen_q) float32 (natural log; +inf for a query that
      sees no key, whose output is 0); attn_probs is (batch, nheads,
      seqlen_q, seqlen_k) float32, exp(score - softmax_lse) computed by XLA
      from q, k and the kernel's LSE, before dropout's rescaling, with the
      entries the kernel dropped negated (FlashAttention's convention). Neither
      is differentiable: gradients flow through `out` only.

    Raises:
      TypeError, ValueError: bad shapes, dtypes or options, before any kernel.
    """
    _check_qkv(q, k, v)
    return _attention((q, k, v), "", dropout_p, softmax_scale, causal, window_size, softcap,
                      alibi_slopes, deterministic, return_attn_probs, dropout_key)


def _check_packed(name: str, x, packs: int, layout: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be a JAX array, got {type(x).__name__}")
    if x.ndim != 5 or x.shape[2] != packs:
        raise ValueError(f"{name} must have shape {layout}, got {_shape_str(x)}")


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes=None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    dropout_key=None,
):
    """`flash_attn_func` with q, k, v packed in one array.

    Args:
      qkv: (batch, seqlen, 3, nheads, headdim).
      Other arguments and the return value: as `flash_attn_func`. The gradient
      is (batch, seqlen, 3, nheads, headdim). On a GPU the kernels read qkv in
      place and write the gradient straight into the packed layout: no
      slicing or concatenation copies.
    """
    _check_packed("qkv", qkv, 3, "(batch, seqlen, 3, nheads, headdim)")
    slot = jax.ShapeDtypeStruct(qkv.shape[:2] + qkv.shape[3:], qkv.dtype)
    _check_qkv(slot, slot, slot)
    return _attention((qkv,), "qkv", dropout_p, softmax_scale, causal, window_size, softcap,
                      alibi_slopes, deterministic, return_attn_probs, dropout_key)


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes=None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    dropout_key=None,
):
    """`flash_attn_func` with k and v packed in one array.

    Args:
      q: (batch, seqlen_q, nheads, headdim).
      kv: (batch, seqlen_k, 2, nheads_k, headdim).
      Other arguments and the return value: as `flash_attn_func`. On a GPU
      kv is read in place and its gradient written in the packed layout.
    """
    _check_packed("kv", kv, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    slot = jax.ShapeDtypeStruct(kv.shape[:2] + kv.shape[3:], kv.dtype)
    _check_qkv(q, slot, slot)
    return _attention((q, kv), "kv", dropout_p, softmax_scale, causal, window_size, softcap,
                      alibi_slopes, deterministic, return_attn_probs, dropout_key)
