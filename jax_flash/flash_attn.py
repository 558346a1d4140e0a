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
    # Varlen: the static maximum sequence lengths (> 0 or 0 with cu_seqlens);
    # -1: the fixed-length layout.
    max_seqlen_q: int = -1
    max_seqlen_k: int = -1
    segments: bool = False  # segment ids: the window lives in the segment tables

    @property
    def varlen(self) -> bool:
        return self.max_seqlen_q >= 0


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


def _segment_layout(segment_ids, batch: int, seqlen_q: int, seqlen_k: int) -> "_Layout":
    """The layout of a fixed-shape call with optional segment ids."""
    if segment_ids is None:
        return _Layout()
    if not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
        raise TypeError(
            "segment_ids must be a pair (q_segment_ids, kv_segment_ids), "
            f"got {type(segment_ids).__name__}"
        )
    out = []
    for name, ids, seqlen in (("q_segment_ids", segment_ids[0], seqlen_q),
                              ("kv_segment_ids", segment_ids[1], seqlen_k)):
        if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
            raise TypeError(f"{name} must be an integer array, got {type(ids).__name__}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array (int32), got dtype {ids.dtype}")
        if ids.shape != (batch, seqlen):
            raise ValueError(
                f"{name} must have shape (batch, seqlen) = {(batch, seqlen)}, "
                f"got {_shape_str(ids)}"
            )
        out.append(jnp.asarray(ids, jnp.int32))
    return _Layout(q_segment_ids=out[0], kv_segment_ids=out[1])


def _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k):
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not hasattr(cu, "shape") or not hasattr(cu, "dtype"):
            raise TypeError(f"{name} must be an int32 array, got {type(cu).__name__}")
        if cu.dtype != jnp.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.ndim != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must have shape (batch + 1,), got {_shape_str(cu)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same shape (batch + 1,), got "
            f"{_shape_str(cu_seqlens_q)} and {_shape_str(cu_seqlens_k)}"
        )


def _check_max_seqlen(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a static Python int (not traced), got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


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
    # With segment ids the window is folded into the segment tables.
    left, right = (-1, -1) if static.segments else (static.window_left, static.window_right)
    return dict(
        softmax_scale=np.float32(static.softmax_scale),
        window_left=np.int32(left),
        window_right=np.int32(right),
        softcap=np.float32(static.softcap),
        dropout_p=np.float32(static.dropout_p),
        dropout_threshold=np.int32(reference.dropout_threshold(static.dropout_p)),
        max_seqlen_q=np.int32(max(static.max_seqlen_q, 0)),
        max_seqlen_k=np.int32(max(static.max_seqlen_k, 0)),
    )


class _Mods(NamedTuple):
    """Non-differentiable array operands of the kernels, in the handlers'
    order; empty arrays when off (the handlers take them either way)."""

    alibi: jax.Array  # float32 (batch, nheads)
    rng: jax.Array  # uint32 (batch, 4)
    cu_seqlens_q: jax.Array  # int32 (batch + 1,), varlen
    cu_seqlens_k: jax.Array  # int32 (batch + 1,), varlen
    seg_q: jax.Array  # int32 (batch, seqlen_q, 4), segment ids (_segment_tables)
    seg_k: jax.Array  # int32 (batch, seqlen_k, 4)

    @staticmethod
    def of(alibi=None, rng=None, cu_seqlens_q=None, cu_seqlens_k=None, seg_q=None,
           seg_k=None) -> "_Mods":
        def operand(x, dtype):
            return jnp.zeros((0,), dtype) if x is None else x

        return _Mods(
            operand(alibi, jnp.float32), operand(rng, jnp.uint32),
            operand(cu_seqlens_q, jnp.int32), operand(cu_seqlens_k, jnp.int32),
            operand(seg_q, jnp.int32), operand(seg_k, jnp.int32),
        )

    def zero_cotangents(self) -> "_Mods":
        """The cotangent of these operands: nothing flows into them."""
        return _Mods(*(
            jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating)
            else np.zeros(x.shape, jax.dtypes.float0)
            for x in self
        ))


def _vmap_method(static: _Static) -> str:
    # Extra leading (vmapped) dims fold into the kernel's batch; varlen
    # buffers carry their sequences in cu_seqlens instead, so a vmapped
    # varlen call runs once per element.
    return "sequential" if static.varlen else "broadcast_all"


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
    target = "jax_flash_fwd" + _TARGET_SUFFIX[static.packing]
    out, lse = jax.ffi.ffi_call(target, out_types, vmap_method=_vmap_method(static))(
        *xs, *mods, **_score_attrs(static)
    )
    return out[..., :head_dim], lse


def _compiled_head_dim(kernel_dim: int) -> int:
    """The compiled kernel that serves kernel_dim (csrc/dispatch.cu's rule)."""
    return min(c for c in _ffi.compiled_head_dims() if c >= kernel_dim)


def _dq_accum_plan(batch: int, nheads_k: int, seqlen_k: int, static: _Static,
                   mods: "_Mods") -> tuple[int, bool]:
    """(accumulator slices, ordered) of the backward (csrc/bwd/kernel.h).

    The atomics path has one slice. Deterministic mode either gives each
    thread block its own slice, one block per (slice, K/V head, batch
    element): enough slices to fill the GPU once, never more than there are
    K/V tiles; or, in the plain kernel (no window, softcap, ALiBi, dropout or
    segment ids), keeps one accumulator and orders the K/V tiles' additions
    with counters. Ordering costs a wait per step, slices cost memory and, at
    more than two per head, L2 misses: fwd+bwd d=128 on an H200 took 1.07 /
    1.08 / 1.17 / 1.21x the atomics path's time with slices and 1.17 / 1.13 /
    1.12 / 1.13x ordered at seqlen 2048 / 4096 / 8192 / 16384 (1 / 2 / 4 / 8
    slices; notes/kernel_experiments.md, entry 27)."""
    if not static.deterministic:
        return 1, False
    n_blocks = -(-seqlen_k // _BWD_BLOCK_N_MIN)
    splits = max(1, min(n_blocks, _ffi.num_sms() // max(1, batch * nheads_k)))
    plain = ((static.window_left, static.window_right) == (-1, -1) and not static.segments
             and static.softcap <= 0 and mods.alibi.size == 0 and mods.rng.size == 0)
    if splits > 2 and plain:
        return 1, True
    return splits, False


def _bwd_kernel(xs, mods: _Mods, out, lse, d_out, static: _Static):
    """Gradients of the inputs xs, in their (packed) layout, from our kernels."""
    head_dim = xs[0].shape[-1]
    kernel_dim = _kernel_head_dim(head_dim)
    *xs, out, d_out = _pad_head_dim(kernel_dim, *xs, out, d_out)
    q_shape, seqlen_k, nheads_k = _q_shape(xs, static.packing)
    *lead, seqlen_q, nheads, _ = q_shape
    if static.varlen:
        # One (1, total_q, ...) buffer; every sequence's dQ tiles start on a
        # tile boundary of the accumulator (csrc/params.h).
        batch = mods.cu_seqlens_q.shape[0] - 1
        accum_rows = seqlen_q + batch * _BWD_BLOCK_M
        accum_lead, splits_seqlen_k = (), static.max_seqlen_k
    else:
        batch, accum_rows = math.prod(lead), seqlen_q
        accum_lead, splits_seqlen_k = tuple(lead), seqlen_k
    seqlen_q_rounded = -(-accum_rows // _BWD_BLOCK_M) * _BWD_BLOCK_M
    splits, ordered = _dq_accum_plan(batch, nheads_k, splits_seqlen_k, static, mods)
    # Ordered mode's counters: one per dQ tile, then a ticket (csrc/params.h).
    counters = nheads * (seqlen_q_rounded // _BWD_BLOCK_M) + 1 if ordered else 0
    out_types = (
        *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs),
        # Scratch the kernels need, allocated by XLA and dropped here.
        jax.ShapeDtypeStruct(  # dq_accum
            (*accum_lead, splits, nheads, seqlen_q_rounded, _compiled_head_dim(kernel_dim)),
            jnp.float32,
        ),
        jax.ShapeDtypeStruct((*lead, nheads, seqlen_q), jnp.float32),  # softmax_d
        jax.ShapeDtypeStruct((*accum_lead, counters), jnp.int32),  # dq_semaphore
    )
    target = "jax_flash_bwd" + _TARGET_SUFFIX[static.packing]
    grads = jax.ffi.ffi_call(target, out_types, vmap_method=_vmap_method(static))(
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


def _segment_tables(q_seg, kv_seg, left: int, right: int):
    """The kernels' segment tables (csrc/params.h: seg_q, seg_k) from segment
    ids (batch..., seqlen_q) / (batch..., seqlen_k) and the window.

    Row i of segment s may see keys [lo, hi]: the first to the last key of s,
    cut to the window around its diagonal i + shift, shift = k_last(s) -
    q_last(s) (reference.segment_positions). Key j of segment t is seen by
    rows [qlo, qhi], the inverse. Empty ranges are (2^30, -1). `exact` says
    whether every id's keys form one run (then [lo, hi] alone decides).
    O(seqlen log seqlen) per row: sorts, no seqlen^2 mask.
    """
    empty_lo = jnp.int32(2**30)

    def sorted_ids(ids):
        order = jnp.argsort(ids, stable=True).astype(jnp.int32)
        return order, ids[order]

    def occurrences(sorted_, queries):
        """first/last index of each query value in the sorted ids, and
        whether it is present (last = -1 when not, as
        reference.segment_positions)."""
        order, ids_sorted = sorted_
        # "scan_unrolled": a fixed number of vector steps; the default scan is
        # a while loop, whose every trip costs a device-to-host sync on GPUs.
        lo = jnp.searchsorted(ids_sorted, queries, side="left", method="scan_unrolled")
        hi = jnp.searchsorted(ids_sorted, queries, side="right", method="scan_unrolled") - 1
        present = hi >= lo
        n = order.shape[0]
        if n == 0:
            return present, jnp.zeros_like(queries), jnp.full_like(queries, -1)
        first = order[jnp.clip(lo, 0, n - 1)]
        last = jnp.where(present, order[jnp.clip(hi, 0, n - 1)], -1)
        return present, first, last

    def one(qs, ks):
        sq, sk = qs.shape[0], ks.shape[0]
        q_sorted, k_sorted = sorted_ids(qs), sorted_ids(ks)
        k_has, k_first, k_last = occurrences(k_sorted, qs)
        _, _, q_last_own = occurrences(q_sorted, qs)
        shift = k_last - q_last_own
        rows = jnp.arange(sq, dtype=jnp.int32)
        lo, hi = k_first, k_last
        if left >= 0:
            lo = jnp.maximum(lo, rows + shift - left)
        if right >= 0:
            hi = jnp.minimum(hi, rows + shift + right)
        lo = jnp.where(k_has, lo, empty_lo)
        hi = jnp.where(k_has, hi, -1)

        q_has, q_first, q_last = occurrences(q_sorted, ks)
        _, _, k_last_own = occurrences(k_sorted, ks)
        key_shift = k_last_own - q_last
        keys = jnp.arange(sk, dtype=jnp.int32)
        qlo, qhi = q_first, q_last
        if right >= 0:
            qlo = jnp.maximum(qlo, keys - key_shift - right)
        if left >= 0:
            qhi = jnp.minimum(qhi, keys - key_shift + left)
        qlo = jnp.where(q_has, qlo, empty_lo)
        qhi = jnp.where(q_has, qhi, -1)

        ks_sorted = k_sorted[1]
        runs = jnp.sum(ks[1:] != ks[:-1])
        distinct = jnp.sum(ks_sorted[1:] != ks_sorted[:-1])
        exact = jnp.broadcast_to((runs == distinct).astype(jnp.int32), (sk,))
        seg_q = jnp.stack([lo, hi, qs, shift], axis=-1).astype(jnp.int32)
        seg_k = jnp.stack([qlo, qhi, ks, exact], axis=-1).astype(jnp.int32)
        return seg_q, seg_k

    fn = one
    for _ in range(q_seg.ndim - 1):
        fn = jax.vmap(fn)
    return fn(q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))


class _Layout(NamedTuple):
    """How rows are laid out beyond (batch, seqlen): varlen or segment ids.
    Arrays here are the user's (not the kernels' tables)."""

    cu_seqlens_q: jax.Array | None = None
    cu_seqlens_k: jax.Array | None = None
    max_seqlen_q: int = -1
    max_seqlen_k: int = -1
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None


def _reference(xs, mods: _Mods, static: _Static, layout: _Layout):
    q, k, v = _unpack(xs, static.packing)
    nheads = q.shape[-2]
    alibi = mods.alibi if mods.alibi.size else None
    window = (static.window_left, static.window_right)
    if static.varlen:
        keep = None
        if static.dropout_p > 0:
            keep = reference.dropout_keep_mask(mods.rng, nheads, static.max_seqlen_q,
                                               static.max_seqlen_k, static.dropout_p)
        out, lse = reference.attention_varlen_padded(
            q[0], k[0], v[0], layout.cu_seqlens_q, layout.cu_seqlens_k, static.max_seqlen_q,
            static.max_seqlen_k, softmax_scale=static.softmax_scale, window_size=window,
            softcap=static.softcap, alibi_slopes=alibi, dropout_p=static.dropout_p,
            dropout_mask=keep, upcast=True)
        return out[None], lse[None]
    keep = None
    if static.dropout_p > 0:
        keep = reference.dropout_keep_mask(mods.rng, nheads, q.shape[1], k.shape[1],
                                           static.dropout_p)
    return reference.attention_ref(
        q, k, v, softmax_scale=static.softmax_scale, window_size=window,
        softcap=static.softcap, alibi_slopes=alibi, dropout_p=static.dropout_p,
        dropout_mask=keep, q_segment_ids=layout.q_segment_ids,
        kv_segment_ids=layout.kv_segment_ids, upcast=True)


def _attn_probs(xs, lse, mods: _Mods, static: _Static, layout: _Layout):
    """return_attn_probs' probabilities from q, k and the LSE (XLA, small
    sizes), dropped entries negated. Varlen: (batch, nheads, max_seqlen_q,
    max_seqlen_k), each sequence padded."""
    q, k, _ = (jax.lax.stop_gradient(x) for x in _unpack(xs, static.packing))
    lse = jax.lax.stop_gradient(lse)
    alibi = mods.alibi if mods.alibi.size else None
    opts = dict(softmax_scale=static.softmax_scale, softcap=static.softcap, alibi_slopes=alibi,
                window_size=(static.window_left, static.window_right))
    if static.varlen:
        index_q, valid_q, len_q = reference.varlen_rows(
            layout.cu_seqlens_q, static.max_seqlen_q, q.shape[1])
        index_k, valid_k, len_k = reference.varlen_rows(
            layout.cu_seqlens_k, static.max_seqlen_k, k.shape[1])
        q_pad = reference.varlen_gather(q[0], index_q, valid_q)
        k_pad = reference.varlen_gather(k[0], index_k, valid_k)
        # (nheads, total_q) -> (batch, nheads, max_seqlen_q); padding: +inf.
        lse_rows = reference.varlen_gather(lse[0].T, index_q, valid_q)
        lse_pad = jnp.where(valid_q[:, None, :], jnp.moveaxis(lse_rows, -1, 1), jnp.inf)
        probs = reference.attention_probs(q_pad, k_pad, lse_pad, key_lengths=len_k,
                                          query_lengths=len_q, **opts)
        q_shape, seqlen_k = q_pad.shape, static.max_seqlen_k
    else:
        probs = reference.attention_probs(q, k, lse, q_segment_ids=layout.q_segment_ids,
                                          kv_segment_ids=layout.kv_segment_ids, **opts)
        q_shape, seqlen_k = q.shape, k.shape[1]
    if static.dropout_p > 0:
        keep = _dropout_mask(q_shape, seqlen_k, mods.rng, static)
        probs = jnp.where(keep, probs, -probs)
    return probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_gpu(static: _Static, xs, mods: _Mods):
    return _fwd_kernel(xs, mods, static)


def _attention_gpu_fwd(static, xs, mods):
    out, lse = _fwd_kernel(xs, mods, static)
    return (out, lse), (xs, mods, out, lse)


def _attention_gpu_bwd(static, residuals, cotangents):
    # The LSE output is not differentiable: its cotangent is ignored. So are
    # the integer and RNG operands and the ALiBi slopes.
    xs, mods, out, lse = residuals
    d_out, _ = cotangents
    grads = _bwd_kernel(xs, mods, out, lse, d_out.astype(xs[0].dtype), static)
    return grads, mods.zero_cotangents()


_attention_gpu.defvjp(_attention_gpu_fwd, _attention_gpu_bwd)


def _attention(xs, packing, dropout_p, softmax_scale, causal, window_size, softcap,
               alibi_slopes, deterministic, return_attn_probs, dropout_key,
               layout: _Layout = _Layout()):
    """Option validation and dispatch shared by the public functions (which
    check their array arguments and the layout first). Varlen inputs arrive
    as (1, total, ...) buffers and the outputs leave with that leading 1."""
    q_shape, _, _ = _q_shape(xs, packing)
    batch, _, nheads, head_dim = q_shape
    varlen = layout.cu_seqlens_q is not None
    if varlen:
        batch = layout.cu_seqlens_q.shape[0] - 1  # sequences
    left, right = _check_window(window_size, causal)
    scale = _check_scale(softmax_scale, head_dim)
    softcap = _check_softcap(softcap)
    alibi = _check_alibi(alibi_slopes, batch, nheads)
    dropout_p, rng = _check_dropout(dropout_p, dropout_key, batch)
    segments = layout.q_segment_ids is not None
    static = _Static(scale, left, right, bool(deterministic), packing, softcap, dropout_p,
                     layout.max_seqlen_q, layout.max_seqlen_k, segments)

    if _ffi.on_gpu():
        _ffi.kernels_or_raise()
        seg_q = seg_k = None
        if segments:
            seg_q, seg_k = _segment_tables(layout.q_segment_ids, layout.kv_segment_ids, left,
                                           right)
        mods = _Mods.of(alibi, rng, layout.cu_seqlens_q, layout.cu_seqlens_k, seg_q, seg_k)
        out, lse = _attention_gpu(static, tuple(xs), mods)
    else:
        mods = _Mods.of(alibi, rng)
        out, lse = _reference(xs, mods, static, layout)
    if not return_attn_probs:
        return out
    return out, jax.lax.stop_gradient(lse), _attn_probs(xs, lse, mods, static, layout)


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
    segment_ids=None,
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
      deterministic: make the backward pass bit-reproducible: the float32 dQ
        additions happen in a fixed order. Either each thread block adds into
        its own float32 slice and the slices are summed in order (about
        num_SMs / (batch * nheads_k) slices, at least one, each the size of dq
        in float32: that much extra scratch memory), or, with no causal
        mask, window or score modifier and more than two slices' worth of
        blocks, the K/V tiles add into one accumulator in turn. The forward
        pass is always deterministic.
      return_attn_probs: also return the softmax LSE and the attention
        probabilities (for testing, small sizes: they are materialised).
      dropout_key: a JAX PRNG key (`jax.random.key` or `jax.random.PRNGKey`),
        required when dropout_p > 0. Its bits seed the kernels' counter-based
        RNG (`jax_flash.reference.dropout_keep_mask` is the same mask in plain
        JAX); the forward and backward pass draw the same mask, the same key
        gives bit-identical results and the batch elements get independent
        masks. Under `vmap`, per-example keys give independent masks and an
        unbatched key gives each example the mask it would get alone.
      segment_ids: optional `(q_segment_ids, kv_segment_ids)`, integer arrays
        (batch, seqlen_q) and (batch, seqlen_k): document masking for packed
        sequences. A query attends only keys with its own segment id, and
        causal / window / ALiBi positions count inside the segment: the last
        query of a segment lines up with the last key of that segment
        (`jax_flash.reference.segment_positions`). Computed in the kernels
        from O(seqlen) tables (no mask is materialised), skipping K/V tiles
        that share no segment with a Q tile; fastest when every id forms one
        contiguous run (packed documents). A query whose id no key has gets
        output 0 and LSE +inf.

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
                      alibi_slopes, deterministic, return_attn_probs, dropout_key,
                      _segment_layout(segment_ids, q.shape[0], q.shape[1], k.shape[1]))


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
    segment_ids=None,
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
                      alibi_slopes, deterministic, return_attn_probs, dropout_key,
                      _segment_layout(segment_ids, qkv.shape[0], qkv.shape[1], qkv.shape[1]))


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
    segment_ids=None,
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
                      alibi_slopes, deterministic, return_attn_probs, dropout_key,
                      _segment_layout(segment_ids, q.shape[0], q.shape[1], kv.shape[1]))


# ---- Variable-length (packed) sequences -----------------------------------------


def _varlen(xs, packing, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
            return_attn_probs, dropout_key):
    """Shared by the varlen functions: xs are (total, ...) buffers."""
    _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k)
    layout = _Layout(
        cu_seqlens_q, cu_seqlens_k, _check_max_seqlen("max_seqlen_q", max_seqlen_q),
        _check_max_seqlen("max_seqlen_k", max_seqlen_k),
    )
    result = _attention(tuple(x[None] for x in xs), packing, dropout_p, softmax_scale, causal,
                        window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                        dropout_key, layout)
    if not return_attn_probs:
        return result[0]
    out, lse, probs = result
    return out[0], lse[0], probs


def _check_varlen_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) not in (None, 3):
            raise ValueError(
                f"{name} must have rank 3 (total, nheads, headdim), got shape {_shape_str(x)}"
            )
    _check_qkv(*(jax.ShapeDtypeStruct((1, *x.shape), x.dtype) if hasattr(x, "shape") else x
                 for x in (q, k, v)))


_VARLEN_DOC = """
    Sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and
    cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v; every mask, ALiBi and the
    dropout RNG work per sequence as flash_attn_func does per batch element
    (bottom-right aligned: the last query of a sequence lines up with its last
    key). Works under jit with traced cu_seqlens; max_seqlen_* are static.

    Robustness: the kernels never read or write outside the buffers. A
    sequence's start is clamped into the buffer and its length to
    max_seqlen_* and to the buffer's end, so lengths above max_seqlen_*
    truncate the sequence to its first max_seqlen rows/keys (masks align to
    the truncated lengths). Rows no (truncated) sequence covers — past
    cu_seqlens[-1], or cut off — get output 0, LSE +inf and gradient 0.
    Zero-length sequences are allowed. Decreasing cu_seqlens stay in bounds,
    but outputs and gradients are then unspecified unless every sequence
    after the decrease is empty (later sequences can share rows with earlier
    ones, and rows are assigned to sequences by a search that assumes
    nondecreasing prefix sums). Under vmap, each element runs in turn.
"""


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
    """`flash_attn_func` over packed variable-length sequences.

    Args:
      q: (total_q, nheads, headdim), float16 or bfloat16.
      k, v: (total_k, nheads_k, headdim).
      cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) prefix sums of the
        sequence lengths, starting at 0.
      max_seqlen_q, max_seqlen_k: static Python ints >= every length.
      alibi_slopes: float32 (nheads,) or (batch, nheads), batch = sequences.
      Other arguments: as `flash_attn_func` (dropout masks are drawn per
        sequence, as per batch element there).

    Returns:
      out (total_q, nheads, headdim); with return_attn_probs=True
      `(out, softmax_lse, attn_probs)` with softmax_lse (nheads, total_q)
      float32 and attn_probs (batch, nheads, max_seqlen_q, max_seqlen_k), each
      sequence's probabilities padded with zeros (testing only). Gradients
      flow through `out` only.
    """ + _VARLEN_DOC
    _check_varlen_qkv(q, k, v)
    return _varlen((q, k, v), "", cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                   deterministic, return_attn_probs, dropout_key)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen: int,
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
    """`flash_attn_varlen_func` with q, k, v packed in one (total, 3, nheads,
    headdim) array and one cu_seqlens / max_seqlen for both. The kernels read
    qkv in place and write the gradient in the packed layout."""
    if not hasattr(qkv, "shape") or not hasattr(qkv, "dtype"):
        raise TypeError(f"qkv must be a JAX array, got {type(qkv).__name__}")
    if qkv.ndim != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (total, 3, nheads, headdim), got {_shape_str(qkv)}")
    slot = jax.ShapeDtypeStruct(qkv.shape[:1] + qkv.shape[2:], qkv.dtype)
    _check_varlen_qkv(slot, slot, slot)
    return _varlen((qkv,), "qkv", cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs, dropout_key)


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
    """`flash_attn_varlen_func` with k and v packed in one (total_k, 2,
    nheads_k, headdim) array, read and differentiated in place."""
    if not hasattr(kv, "shape") or not hasattr(kv, "dtype"):
        raise TypeError(f"kv must be a JAX array, got {type(kv).__name__}")
    if kv.ndim != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv must have shape (total_k, 2, nheads_k, headdim), got {_shape_str(kv)}")
    slot = jax.ShapeDtypeStruct(kv.shape[:1] + kv.shape[2:], kv.dtype)
    _check_varlen_qkv(q, slot, slot)
    return _varlen((q, kv), "kv", cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                   deterministic, return_attn_probs, dropout_key)


def unpad_input(x, padding_mask, total: int | None = None):
    """Packs the valid tokens of a padded batch for the varlen functions.

    Args:
      x: (batch, seqlen, ...).
      padding_mask: bool (batch, seqlen), True for real tokens (any order
        inside a row; rows keep their token order).
      total: static number of rows of the result. None: the number of valid
        tokens, which needs a concrete padding_mask; inside jit pass an upper
        bound (e.g. batch * seqlen): rows past the valid tokens are zero and
        belong to no sequence (the kernels give them output 0).

    Returns:
      x_unpadded: (total, ...).
      indices: int32 (total,) position of each row in the flattened (batch *
        seqlen) input; batch * seqlen for filler rows.
      cu_seqlens: int32 (batch + 1,) prefix sums of the per-row token counts.
      max_seqlen: static int, the longest row when padding_mask is concrete,
        else seqlen (an upper bound, valid for the varlen functions).
    """
    if not hasattr(x, "shape") or x.ndim < 2:
        raise ValueError(f"x must have shape (batch, seqlen, ...), got {getattr(x, 'shape', x)!r}")
    batch, seqlen = x.shape[:2]
    padding_mask = jnp.asarray(padding_mask)
    if padding_mask.shape != (batch, seqlen) or padding_mask.dtype != jnp.bool_:
        raise ValueError(
            f"padding_mask must be bool of shape {(batch, seqlen)}, got "
            f"{padding_mask.dtype} {_shape_str(padding_mask)}"
        )
    lengths = jnp.sum(padding_mask, axis=1, dtype=jnp.int32)
    try:
        concrete = np.asarray(lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    if total is None:
        if concrete is None:
            raise ValueError("unpad_input: pass a static `total` when padding_mask is traced")
        total = int(concrete.sum())
    total = _check_max_seqlen("total", total)
    max_seqlen = int(concrete.max(initial=0)) if concrete is not None else seqlen
    flat = padding_mask.reshape(-1)
    (indices,) = jnp.nonzero(flat, size=total, fill_value=batch * seqlen)
    indices = indices.astype(jnp.int32)
    x_unpadded = jnp.take(x.reshape(batch * seqlen, *x.shape[2:]), indices, axis=0,
                          mode="fill", fill_value=0)
    cu_seqlens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(lengths, dtype=jnp.int32)])
    return x_unpadded, indices, cu_seqlens, max_seqlen


def pad_input(x_unpadded, indices, batch: int, seqlen: int):
    """Inverse of `unpad_input`: (total, ...) rows back to (batch, seqlen,
    ...), zeros at the padding. Filler rows (index batch * seqlen) are
    dropped."""
    x_unpadded = jnp.asarray(x_unpadded)
    indices = jnp.asarray(indices)
    if indices.shape != x_unpadded.shape[:1]:
        raise ValueError(
            f"indices must have shape ({x_unpadded.shape[0]},) like x_unpadded's rows, got "
            f"{_shape_str(indices)}"
        )
    out = jnp.zeros((batch * seqlen, *x_unpadded.shape[1:]), x_unpadded.dtype)
    out = out.at[indices].set(x_unpadded, mode="drop")
    return out.reshape(batch, seqlen, *x_unpadded.shape[1:])
