"""Every argument check of jax_flash, public functions and reference alike.

One message style: the message names the argument, says what was expected and
what arrived ("q must have rank 4 (batch, seqlen, nheads, headdim), got shape
(17, 4, 32)"; the reference's helpers say "alibi_slopes: expected ..., got
..."). Wrong kinds of value raise `TypeError`, wrong values `ValueError`.
Everything here runs in Python before anything is traced into a kernel, so
static options must be Python (or numpy) scalars: a traced value is refused
with a `TypeError` naming the argument rather than failing deep inside JAX.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16)
MAX_HEAD_DIM = 256
# Attributes and shapes reach the kernels as int32.
INT32_LIMIT = 2**31

_F32_MAX = float(np.finfo(np.float32).max)


def shape_str(x) -> str:
    return str(tuple(x.shape))


def fail(name: str, expected, actual):
    """The reference's style: ``name: expected ..., got ...`` (ValueError)."""
    raise ValueError(f"{name}: expected {expected}, got {actual}")


# ---- Static scalars ------------------------------------------------------------


def is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _not_traced(name: str, value, kind: str) -> None:
    if is_traced(value):
        raise TypeError(
            f"{name} must be a static Python {kind}, not a traced value; pass it as a Python "
            f"constant (under jax.jit: mark it static, e.g. static_argnames=({name!r},))"
        )


def static_bool(name: str, value) -> bool:
    """A Python or numpy bool; strings, numbers and traced values are refused."""
    _not_traced(name, value, "bool")
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool, got {value!r}")
    return bool(value)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def static_int(name: str, value) -> int:
    """A Python int or numpy integer (not a bool)."""
    _not_traced(name, value, "int")
    if not _is_int(value):
        raise TypeError(f"{name} must be a static Python int (not traced), got {value!r}")
    return int(value)


def static_float(name: str, value, expected: str) -> float:
    """An int, float or numpy number (not a bool or a string); `expected`
    describes the valid values for the TypeError."""
    _not_traced(name, value, "float")
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def _float32(value: float) -> float:
    """value rounded to float32 as the kernels see it (inf past float32's range)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


# ---- Arrays of the public functions ------------------------------------------------


def _check_array(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be a JAX array, got {type(x).__name__}")


def qkv(q, k, v) -> None:
    """q (batch, seqlen_q, nheads, d), k/v (batch, seqlen_k, nheads_k, d)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_array(name, x)
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 (batch, seqlen, nheads, headdim), "
                f"got shape {shape_str(x)}"
            )
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16, got {x.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    batch, _, nheads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (batch, seqlen_k, nheads_k, headdim), "
            f"got k {shape_str(k)} and v {shape_str(v)}"
        )
    if k.shape[0] != batch:
        raise ValueError(f"k must have batch {batch} like q, got k {shape_str(k)}")
    if k.shape[3] != head_dim:
        raise ValueError(
            f"k and v must have headdim {head_dim} like q {shape_str(q)}, got k {shape_str(k)}"
        )
    nheads_k = k.shape[2]
    if nheads < 1:
        raise ValueError(f"q must have nheads >= 1, got q {shape_str(q)}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(
            f"nheads of q ({nheads}) must be a multiple of nheads of k/v ({nheads_k})"
        )
    if head_dim > MAX_HEAD_DIM or head_dim < 1:
        raise ValueError(f"headdim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")


def packed(name: str, x, packs: int, axis: int, layout: str):
    """A packed input (qkv: packs=3, kv: packs=2) with the packs on `axis`;
    returns the shape/dtype of one slot, for `qkv`."""
    _check_array(name, x)
    if x.ndim != axis + 3 or x.shape[axis] != packs:
        raise ValueError(f"{name} must have shape {layout}, got {shape_str(x)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16, got {x.dtype}")
    return jax.ShapeDtypeStruct(x.shape[:axis] + x.shape[axis + 1:], x.dtype)


def varlen_qkv(q, k, v) -> None:
    """q (total_q, nheads, d), k/v (total_k, nheads_k, d)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) not in (None, 3):
            raise ValueError(
                f"{name} must have rank 3 (total, nheads, headdim), got shape {shape_str(x)}"
            )
    qkv(*(jax.ShapeDtypeStruct((1, *x.shape), x.dtype) if hasattr(x, "shape") else x
          for x in (q, k, v)))


def cu_seqlens(cu_seqlens_q, cu_seqlens_k) -> None:
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not hasattr(cu, "shape") or not hasattr(cu, "dtype"):
            raise TypeError(f"{name} must be an int32 array, got {type(cu).__name__}")
        if cu.dtype != jnp.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.ndim != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must have shape (batch + 1,), got {shape_str(cu)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same shape (batch + 1,), got "
            f"{shape_str(cu_seqlens_q)} and {shape_str(cu_seqlens_k)}"
        )


def max_seqlen(name: str, value) -> int:
    """A static int in [0, 2^31): the kernels take it as an int32 attribute."""
    value = static_int(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value >= INT32_LIMIT:
        raise ValueError(f"{name} must be < 2**31 (the kernels' int32 range), got {value}")
    return value


def segment_ids(segment_ids, batch: int, seqlen_q: int, seqlen_k: int):
    """(q_segment_ids, kv_segment_ids) integer arrays, in their own dtype
    (ids are compared exactly: see `_src/segments.dense_ranks`), or None."""
    if segment_ids is None:
        return None
    if not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
        raise TypeError(
            "segment_ids must be a pair (q_segment_ids, kv_segment_ids), "
            f"got {type(segment_ids).__name__}"
        )
    for name, ids, seqlen in (("q_segment_ids", segment_ids[0], seqlen_q),
                              ("kv_segment_ids", segment_ids[1], seqlen_k)):
        if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
            raise TypeError(f"{name} must be an integer array, got {type(ids).__name__}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array (int32), got dtype {ids.dtype}")
        if ids.shape != (batch, seqlen):
            raise ValueError(
                f"{name} must have shape (batch, seqlen) = {(batch, seqlen)}, "
                f"got {shape_str(ids)}"
            )
    return segment_ids[0], segment_ids[1]


# ---- Options of the public functions ------------------------------------------------


def window(window_size, causal) -> tuple[int, int]:
    """(left, right) with causal folded in as right = 0; -1 is unbounded."""
    causal = static_bool("causal", causal)
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(
            f"window_size must be a pair of ints (left, right), got {window_size!r}"
        )
    for w in window_size:
        _not_traced("window_size", w, "int")
        if not _is_int(w):
            raise TypeError(
                f"window_size must be a pair of ints (left, right), got {window_size!r}"
            )
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    if causal:
        right = 0  # causal is the window with nothing to the right of the diagonal
    return left, right


def canonical_window(left: int, right: int, span: int) -> tuple[int, int]:
    """A window entry that can never bind is unbounded (-1): a query's
    distance to any key is below span = seqlen_q + seqlen_k (max_seqlen_q +
    max_seqlen_k for varlen), so entries >= span mean the same as -1 and never
    overflow the kernels' int32 attributes."""
    left, right = (-1 if w >= span else w for w in (left, right))
    for w in (left, right):
        if w >= INT32_LIMIT:
            raise ValueError(
                f"window_size entries must be < 2**31 (the kernels' int32 range) or -1, got {w}"
            )
    return left, right


def softmax_scale(value, head_dim: int) -> float:
    """The scale of q.k, finite and > 0 in float32 (the kernels' type)."""
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    scale = static_float("softmax_scale", value, "a float > 0 or None")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be a finite number > 0, got {value!r}")
    f32 = _float32(scale)
    if not (math.isfinite(f32) and f32 > 0):
        raise ValueError(
            f"softmax_scale must be a finite number > 0 in float32 (the kernels' type: "
            f"at most {_F32_MAX:.4g}, at least about 1.4e-45), got {value!r}"
        )
    return scale


def softcap(value, scale: float) -> float:
    """0 (off) or a positive float32 cap such that scale / softcap is finite."""
    cap = static_float("softcap", value, "a float >= 0")
    if not (math.isfinite(cap) and cap >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {value!r}")
    if cap == 0:
        return 0.0
    f32 = _float32(cap)
    if not (math.isfinite(f32) and f32 > 0):
        raise ValueError(
            f"softcap must be 0 or a float32 > 0 (the kernels' type), got {value!r} "
            f"(float32 {f32!r})"
        )
    # The kernels compute tanh(s * (scale / softcap)).
    if not math.isfinite(_float32(_float32(scale) / f32)):
        raise ValueError(
            f"softcap must keep softmax_scale / softcap finite in float32, got softcap "
            f"{value!r} with softmax_scale {scale!r}"
        )
    return cap


def alibi(alibi_slopes, batch: int, nheads: int):
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
            f"got {shape_str(alibi_slopes)}"
        )
    return jnp.broadcast_to(alibi_slopes, (batch, nheads))


def dropout(dropout_p, dropout_key) -> float:
    """dropout_p as a float in [0, 1) (also in float32), and the key checked
    when dropout is on."""
    p = static_float("dropout_p", dropout_p, "a float in [0, 1)")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if _float32(p) >= 1.0:
        raise ValueError(
            f"dropout_p must be in [0, 1) in float32 (the kernels' type), got {dropout_p!r} "
            "(rounds to 1.0)"
        )
    if p == 0.0:
        return p  # a key without dropout is allowed (and unused)
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
    return p


# ---- The reference's checks (``name: expected ..., got ...``) ---------------------


def ref_window(window_size) -> tuple[int, int]:
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        fail("window_size", "a (left, right) pair of ints", repr(window_size))
    left, right = (int(w) for w in window_size)
    return left, right


def ref_alibi(alibi_slopes, batch: int, nheads: int):
    """float32 slopes of shape ``(batch or 1, nheads)`` or None."""
    if alibi_slopes is None:
        return None
    alibi_slopes = jnp.asarray(alibi_slopes, dtype=jnp.float32)
    if alibi_slopes.shape == (nheads,):
        return alibi_slopes[None, :]
    if alibi_slopes.shape == (batch, nheads):
        return alibi_slopes
    fail("alibi_slopes", f"shape ({nheads},) or ({batch}, {nheads})", f"shape {alibi_slopes.shape}")


def ref_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            fail(name, "a 4-D array (batch, seqlen, nheads, headdim)", f"shape {x.shape}")
    batch, _, nheads, headdim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        fail("k/v", f"batch {batch} (from q)", f"k batch {k.shape[0]}, v batch {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        fail("v", f"(batch, seqlen_k, nheads_k) = {k.shape[:3]} (from k)", f"{v.shape[:3]}")
    if k.shape[3] != headdim:
        fail("k", f"headdim {headdim} (from q)", f"headdim {k.shape[3]}")
    nheads_k = k.shape[2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        fail("k", f"nheads_k dividing nheads={nheads}", f"nheads_k={nheads_k}")


def ref_varlen_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            fail(name, "a 3-D array (total, nheads, headdim)", f"shape {x.shape}")
    ref_qkv(q[None], k[None], v[None])


def ref_softcap(softcap) -> None:
    if softcap < 0:
        fail("softcap", "a value >= 0", softcap)


def ref_dropout(dropout_p, dropout_mask, expected_shape):
    """The reference's dropout: p in [0, 1) and, when p > 0, a bool keep-mask
    of expected_shape (the reference has no RNG). Returns the mask array."""
    if not 0.0 <= dropout_p < 1.0:
        fail("dropout_p", "a value in [0, 1)", dropout_p)
    if dropout_p == 0:
        return None
    if dropout_mask is None:
        fail("dropout_mask", "a boolean keep-mask when dropout_p > 0 "
             "(the reference has no RNG)", None)
    dropout_mask = jnp.asarray(dropout_mask)
    if dropout_mask.shape != expected_shape:
        fail("dropout_mask", f"shape {expected_shape}", f"shape {dropout_mask.shape}")
    if dropout_mask.dtype != jnp.bool_:
        fail("dropout_mask", "dtype bool", f"dtype {dropout_mask.dtype}")
    return dropout_mask


def ref_segment_ids(q_segment_ids, kv_segment_ids, batch: int, seqlen_q: int, seqlen_k: int):
    """Both arrays (in their own dtype) or None."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        fail("q_segment_ids/kv_segment_ids", "both or neither",
             f"q_segment_ids={'set' if q_segment_ids is not None else None}, "
             f"kv_segment_ids={'set' if kv_segment_ids is not None else None}")
    if q_segment_ids is None:
        return None
    q_seg, kv_seg = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
    if q_seg.shape != (batch, seqlen_q):
        fail("q_segment_ids", f"shape {(batch, seqlen_q)}", f"shape {q_seg.shape}")
    if kv_seg.shape != (batch, seqlen_k):
        fail("kv_segment_ids", f"shape {(batch, seqlen_k)}", f"shape {kv_seg.shape}")
    return q_seg, kv_seg


def ref_concrete_cu_seqlens(name: str, cu_seqlens, total: int):
    try:
        cu = np.asarray(cu_seqlens)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        fail(name, "a concrete (non-traced) array", "a traced value")
    if cu.ndim != 1 or cu.shape[0] < 1 or not np.issubdtype(cu.dtype, np.integer):
        fail(name, "a 1-D integer array of shape (batch + 1,)", f"shape {cu.shape} dtype {cu.dtype}")
    if cu[0] != 0 or cu[-1] != total or np.any(np.diff(cu) < 0):
        fail(name, f"non-decreasing prefix sums from 0 to {total}", cu.tolist())
    return cu.astype(np.int64)


def ref_cache_seqlens(cache_seqlens, batch: int):
    cache_seqlens = jnp.asarray(cache_seqlens)
    if cache_seqlens.shape != (batch,) or not jnp.issubdtype(cache_seqlens.dtype, jnp.integer):
        fail("cache_seqlens", f"an integer array of shape ({batch},)",
             f"shape {cache_seqlens.shape} dtype {cache_seqlens.dtype}")
    return cache_seqlens.astype(jnp.int32)


# ---- unpad_input ---------------------------------------------------------------------


def padding_mask(x, mask):
    """x (batch, seqlen, ...) and its bool (batch, seqlen) mask, as a JAX array."""
    if not hasattr(x, "shape") or x.ndim < 2:
        raise ValueError(f"x must have shape (batch, seqlen, ...), got {getattr(x, 'shape', x)!r}")
    batch, seqlen = x.shape[:2]
    mask = jnp.asarray(mask)
    if mask.shape != (batch, seqlen) or mask.dtype != jnp.bool_:
        raise ValueError(
            f"padding_mask must be bool of shape {(batch, seqlen)}, got "
            f"{mask.dtype} {shape_str(mask)}"
        )
    return mask


def unpad_total(total, valid_tokens: int | None) -> int:
    """The static row count of unpad_input's result: >= the valid tokens
    when they are known (fewer rows would silently drop tokens)."""
    if total is None:
        if valid_tokens is None:
            raise ValueError("unpad_input: pass a static `total` when padding_mask is traced")
        return valid_tokens
    total = static_int("total", total)
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if valid_tokens is not None and total < valid_tokens:
        raise ValueError(
            f"total must be >= the number of valid tokens ({valid_tokens}), got {total}"
        )
    return total
