"""Plain-JAX reference semantics for the FlashAttention-2 interface.

These functions are the semantics of record: the CUDA kernels must match them
(up to floating point error). They favour clarity over speed and materialize
the full ``(batch, nheads, seqlen_q, seqlen_k)`` score matrix.

Conventions shared by all functions:

* Masks are bottom-right aligned: with ``shift = seqlen_k - seqlen_q``, query
  ``i`` sits at key position ``i + shift``. Key ``j`` is visible to query ``i``
  iff ``(left < 0 or j >= i + shift - left)`` and
  ``(right < 0 or j <= i + shift + right)`` where ``(left, right)`` is
  ``window_size`` and ``causal=True`` forces ``right = 0``.
* A query row with no visible key produces output 0 and ``lse = +inf``.
* ``lse`` is the natural-log sum-exp of the (scaled, soft-capped, ALiBi-biased)
  scores over the visible keys, float32, shape ``(batch, nheads, seqlen_q)``.
* Grouped-query attention: query head ``h`` uses kv head
  ``h // (nheads // nheads_k)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "attention_probs",
    "attention_ref",
    "attention_varlen_padded",
    "attention_varlen_ref",
    "dropout_keep_mask",
    "dropout_rng",
    "dropout_threshold",
    "kvcache_ref",
    "philox4x32_10",
    "segment_positions",
    "varlen_gather",
    "varlen_rows",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _low_precision(dtype):
    """Matmul precision of the upcast=False path: the input dtype's own. float32
    inputs get true float32 (GPUs would otherwise round them to TF32)."""
    return _HIGHEST if dtype == jnp.float32 else None


def _fail(name, expected, actual):
    raise ValueError(f"{name}: expected {expected}, got {actual}")


def _relative_positions(seqlen_q, seqlen_k, key_lengths=None, query_lengths=None,
                        row_shift=None):
    """Signed offset ``j - (i + shift)`` of key ``j`` from query ``i``'s diagonal.

    Args:
      seqlen_q, seqlen_k: static ints.
      key_lengths: optional int array ``(batch,)``; per-batch effective key
        length ``L_b``. None means ``seqlen_k``.
      query_lengths: optional int array ``(batch,)``; per-batch query length
        ``Q_b`` (varlen sequences padded to seqlen_q). None means ``seqlen_q``.
        The diagonal shift is ``L_b - Q_b``.
      row_shift: optional int array ``(batch, seqlen_q)``: query ``i`` sits at
        key position ``i + row_shift[b, i]`` (segment ids); overrides the
        lengths' shift.

    Returns:
      int32 array broadcastable to ``(batch, 1, seqlen_q, seqlen_k)``.
    """
    i = jnp.arange(seqlen_q, dtype=jnp.int32)[None, None, :, None]
    j = jnp.arange(seqlen_k, dtype=jnp.int32)[None, None, None, :]
    if row_shift is not None:
        return j - (i + row_shift.astype(jnp.int32)[:, None, :, None])
    if key_lengths is None and query_lengths is None:
        return j - (i + (seqlen_k - seqlen_q))
    keys = seqlen_k if key_lengths is None else key_lengths.astype(jnp.int32)
    queries = seqlen_q if query_lengths is None else query_lengths.astype(jnp.int32)
    shift = jnp.reshape(jnp.asarray(keys - queries, jnp.int32), (-1, 1, 1, 1))
    return j - (i + shift)


def _visibility_mask(seqlen_q, seqlen_k, *, causal, window_size, key_lengths=None,
                     query_lengths=None, row_shift=None):
    """The single definition of which keys a query may attend to.

    Args:
      seqlen_q, seqlen_k: static ints.
      causal: bool; forces the right window to 0.
      window_size: ``(left, right)``; a negative value means unbounded.
      key_lengths, query_lengths, row_shift: as in ``_relative_positions``;
        keys at ``j >= L_b`` are invisible.

    Returns:
      bool array broadcastable to ``(batch, 1, seqlen_q, seqlen_k)``.
    """
    left, right = window_size
    if causal:
        right = 0
    rel = _relative_positions(seqlen_q, seqlen_k, key_lengths, query_lengths, row_shift)
    visible = jnp.ones(rel.shape, dtype=bool)
    if left >= 0:
        visible &= rel >= -left
    if right >= 0:
        visible &= rel <= right
    if key_lengths is not None:
        j = jnp.arange(seqlen_k, dtype=jnp.int32)
        visible &= j[None, None, None, :] < key_lengths.astype(jnp.int32)[:, None, None, None]
    return visible


def segment_positions(q_segment_ids, kv_segment_ids):
    """Where segment ids put each query: ``(segment_mask, row_shift)``.

    A query sees only keys with its own segment id, and inside its segment
    masks and ALiBi are bottom-right aligned as for one sequence: the last
    query of segment s lines up with the last key of s. Query ``i`` therefore
    sits at key position ``i + row_shift[b, i]`` with ``row_shift = k_last(s)
    - q_last(s)``, the last indices of ``s`` among the keys and the queries
    (for contiguous segments, position within the segment plus its
    bottom-right offset). A query whose id no key has sees nothing.

    Args:
      q_segment_ids: int ``(batch, seqlen_q)``.
      kv_segment_ids: int ``(batch, seqlen_k)``.

    Returns:
      segment_mask: bool ``(batch, 1, seqlen_q, seqlen_k)``.
      row_shift: int32 ``(batch, seqlen_q)``.
    """
    q_seg = jnp.asarray(q_segment_ids)
    kv_seg = jnp.asarray(kv_segment_ids)
    same = q_seg[:, :, None] == kv_seg[:, None, :]  # (batch, seqlen_q, seqlen_k)
    same_q = q_seg[:, :, None] == q_seg[:, None, :]  # (batch, seqlen_q, seqlen_q)
    k_index = jnp.arange(kv_seg.shape[1], dtype=jnp.int32)
    q_index = jnp.arange(q_seg.shape[1], dtype=jnp.int32)
    k_last = jnp.max(jnp.where(same, k_index, -1), axis=-1)
    q_last = jnp.max(jnp.where(same_q, q_index, -1), axis=-1)
    return same[:, None], (k_last - q_last).astype(jnp.int32)


def _check_window(window_size):
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        _fail("window_size", "a (left, right) pair of ints", repr(window_size))
    left, right = (int(w) for w in window_size)
    return left, right


def _check_alibi(alibi_slopes, batch, nheads):
    """Returns float32 slopes of shape ``(batch or 1, nheads)`` or None."""
    if alibi_slopes is None:
        return None
    alibi_slopes = jnp.asarray(alibi_slopes, dtype=jnp.float32)
    if alibi_slopes.shape == (nheads,):
        return alibi_slopes[None, :]
    if alibi_slopes.shape == (batch, nheads):
        return alibi_slopes
    _fail("alibi_slopes", f"shape ({nheads},) or ({batch}, {nheads})", f"shape {alibi_slopes.shape}")


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            _fail(name, "a 4-D array (batch, seqlen, nheads, headdim)", f"shape {x.shape}")
    batch, _, nheads, headdim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        _fail("k/v", f"batch {batch} (from q)", f"k batch {k.shape[0]}, v batch {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        _fail("v", f"(batch, seqlen_k, nheads_k) = {k.shape[:3]} (from k)", f"{v.shape[:3]}")
    if k.shape[3] != headdim:
        _fail("k", f"headdim {headdim} (from q)", f"headdim {k.shape[3]}")
    nheads_k = k.shape[2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        _fail("k", f"nheads_k dividing nheads={nheads}", f"nheads_k={nheads_k}")


def _scores(q, k, *, softmax_scale, causal, window_size, softcap, alibi_slopes, segment_mask,
            key_lengths, upcast, query_lengths=None, row_shift=None):
    """float32 ``(batch, nheads, seqlen_q, seqlen_k)`` scores after scaling,
    softcap and ALiBi, with invisible keys at -inf. k already has nheads heads."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if upcast:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST)
    else:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_low_precision(q.dtype))
    scores = scores.astype(jnp.float32) * jnp.float32(softmax_scale)
    if softcap > 0:
        scores = jnp.float32(softcap) * jnp.tanh(scores / jnp.float32(softcap))
    if alibi_slopes is not None:
        rel = _relative_positions(seqlen_q, seqlen_k, key_lengths, query_lengths, row_shift)
        scores = scores - alibi_slopes[:, :, None, None] * jnp.abs(rel).astype(jnp.float32)

    mask = _visibility_mask(seqlen_q, seqlen_k, causal=causal, window_size=window_size,
                            key_lengths=key_lengths, query_lengths=query_lengths,
                            row_shift=row_shift)
    if segment_mask is not None:
        mask = mask & segment_mask
    return jnp.where(mask, scores, -jnp.inf)


def _attention(q, k, v, *, softmax_scale, causal, window_size, softcap, alibi_slopes,
               dropout_p=0.0, dropout_mask=None, segment_mask=None, key_lengths=None,
               query_lengths=None, row_shift=None, upcast=True):
    """Shared implementation; inputs already validated.

    ``alibi_slopes`` is float32 ``(batch or 1, nheads)`` or None;
    ``segment_mask`` is bool ``(batch, 1, seqlen_q, seqlen_k)`` or None;
    ``key_lengths``, ``query_lengths`` int ``(batch,)`` and ``row_shift`` int
    ``(batch, seqlen_q)`` or None (see ``_relative_positions``).
    """
    out_dtype = q.dtype
    _, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    groups = nheads // nheads_k
    if key_lengths is not None:
        # Cache slots at j >= L_b are never read: zero them so that garbage
        # (even NaN/inf) there cannot leak into the result through 0 * NaN.
        valid = (jnp.arange(seqlen_k) < key_lengths[:, None])[:, :, None, None]
        k = jnp.where(valid, k, jnp.zeros((), k.dtype))
        v = jnp.where(valid, v, jnp.zeros((), v.dtype))
    if upcast:
        # Before repeating K/V heads, so that MQA/GQA gradients are summed over
        # a group's query heads in float32 too.
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if groups > 1:
        k = jnp.repeat(k, groups, axis=2)
        v = jnp.repeat(v, groups, axis=2)

    scores = _scores(q, k, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                     softcap=softcap, alibi_slopes=alibi_slopes, segment_mask=segment_mask,
                     key_lengths=key_lengths, upcast=upcast, query_lengths=query_lengths,
                     row_shift=row_shift)

    # Numerically stable softmax that stays finite (values and gradients) on
    # rows where every key is masked: such rows have row_max = -inf, which we
    # replace by 0 so exp(-inf - 0) = 0, and their sum 0 is replaced by 1.
    row_max = jnp.max(scores, axis=-1, keepdims=True, initial=-jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    unnorm = jnp.exp(scores - row_max)
    row_sum = jnp.sum(unnorm, axis=-1, keepdims=True)
    nonempty = row_sum > 0
    safe_sum = jnp.where(nonempty, row_sum, 1.0)
    probs = unnorm / safe_sum
    lse = jnp.where(nonempty, jnp.log(safe_sum) + row_max, jnp.inf)[..., 0]

    if not upcast:
        # FlashAttention's low-precision reference: the softmax itself runs in
        # the input dtype (exp, its derivative and P are rounded to it; row
        # sums accumulate in float32), so forward and backward both carry the
        # rounding a low-precision implementation would.
        low = v.dtype
        unnorm = jnp.exp(scores.astype(low) - row_max.astype(low))
        probs = (unnorm.astype(jnp.float32) / safe_sum).astype(low)

    if dropout_p > 0:
        probs = jnp.where(dropout_mask, probs, 0.0) / jnp.asarray(1.0 - dropout_p, probs.dtype)

    if upcast:
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_HIGHEST)
    else:
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_low_precision(v.dtype))
    return out.astype(out_dtype), lse.astype(jnp.float32)


def attention_ref(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                  softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_mask=None,
                  q_segment_ids=None, kv_segment_ids=None, upcast=True):
    """Reference FlashAttention-2 forward pass.

    Args:
      q: ``(batch, seqlen_q, nheads, headdim)``.
      k: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0``.
      v: ``(batch, seqlen_k, nheads_k, headdim_v)``.
      softmax_scale: multiplier of ``q . k``; default ``1 / sqrt(headdim)``.
      causal: bottom-right aligned causal mask (sets the right window to 0).
      window_size: ``(left, right)`` local window; negative means unbounded.
      softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``
        (applied before ALiBi and masking).
      alibi_slopes: float32 ``(nheads,)`` or ``(batch, nheads)``; adds
        ``-slope * |i + seqlen_k - seqlen_q - j|`` to the scores.
      dropout_p: dropout probability in ``[0, 1)``. Requires dropout_mask when
        > 0 (the reference has no RNG). The mask is ignored when 0.
      dropout_mask: bool ``(batch, nheads, seqlen_q, seqlen_k)``, True = keep.
        Kept probabilities are scaled by ``1 / (1 - dropout_p)``; lse is not
        affected by dropout.
      q_segment_ids: int ``(batch, seqlen_q)``; give both or neither.
      kv_segment_ids: int ``(batch, seqlen_k)``; a key is visible only if its
        segment id equals the query's, and causal/window/ALiBi positions count
        inside the segment (``segment_positions``).
      upcast: if True compute everything in float32; if False do both matmuls
        in the input dtype (softmax in float32, P cast to v's dtype before P@V).

    Returns:
      out: ``(batch, seqlen_q, nheads, headdim_v)`` in q's dtype.
      lse: float32 ``(batch, nheads, seqlen_q)``; ``+inf`` for empty rows.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check_qkv(q, k, v)
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k = k.shape[1]
    window_size = _check_window(window_size)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    if softcap < 0:
        _fail("softcap", "a value >= 0", softcap)
    alibi = _check_alibi(alibi_slopes, batch, nheads)

    if not 0.0 <= dropout_p < 1.0:
        _fail("dropout_p", "a value in [0, 1)", dropout_p)
    if dropout_p > 0:
        if dropout_mask is None:
            _fail("dropout_mask", "a boolean keep-mask when dropout_p > 0 "
                  "(the reference has no RNG)", None)
        dropout_mask = jnp.asarray(dropout_mask)
        expected = (batch, nheads, seqlen_q, seqlen_k)
        if dropout_mask.shape != expected:
            _fail("dropout_mask", f"shape {expected}", f"shape {dropout_mask.shape}")
        if dropout_mask.dtype != jnp.bool_:
            _fail("dropout_mask", "dtype bool", f"dtype {dropout_mask.dtype}")

    segment_mask = None
    if (q_segment_ids is None) != (kv_segment_ids is None):
        _fail("q_segment_ids/kv_segment_ids", "both or neither",
              f"q_segment_ids={'set' if q_segment_ids is not None else None}, "
              f"kv_segment_ids={'set' if kv_segment_ids is not None else None}")
    if q_segment_ids is not None:
        q_seg, kv_seg = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
        if q_seg.shape != (batch, seqlen_q):
            _fail("q_segment_ids", f"shape {(batch, seqlen_q)}", f"shape {q_seg.shape}")
        if kv_seg.shape != (batch, seqlen_k):
            _fail("kv_segment_ids", f"shape {(batch, seqlen_k)}", f"shape {kv_seg.shape}")
        segment_mask, row_shift = segment_positions(q_seg, kv_seg)
    else:
        row_shift = None

    return _attention(q, k, v, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size, softcap=float(softcap), alibi_slopes=alibi,
                      dropout_p=float(dropout_p), dropout_mask=dropout_mask,
                      segment_mask=segment_mask, row_shift=row_shift, upcast=upcast)


def _concrete_cu_seqlens(name, cu_seqlens, total):
    try:
        cu = np.asarray(cu_seqlens)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        _fail(name, "a concrete (non-traced) array", "a traced value")
    if cu.ndim != 1 or cu.shape[0] < 1 or not np.issubdtype(cu.dtype, np.integer):
        _fail(name, "a 1-D integer array of shape (batch + 1,)", f"shape {cu.shape} dtype {cu.dtype}")
    if cu[0] != 0 or cu[-1] != total or np.any(np.diff(cu) < 0):
        _fail(name, f"non-decreasing prefix sums from 0 to {total}", cu.tolist())
    return cu.astype(np.int64)


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, *, softmax_scale=None,
                         causal=False, window_size=(-1, -1), softcap=0.0,
                         alibi_slopes=None, upcast=True):
    """Reference variable-length (packed) attention.

    Sequence ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v; masks are aligned per sequence.

    Args:
      q: ``(total_q, nheads, headdim)``.
      k: ``(total_k, nheads_k, headdim)``.
      v: ``(total_k, nheads_k, headdim_v)``.
      cu_seqlens_q, cu_seqlens_k: concrete int ``(batch + 1,)`` prefix sums.
      alibi_slopes: float32 ``(nheads,)`` or ``(batch, nheads)``.
      Other arguments: as in ``attention_ref``.

    Returns:
      out: ``(total_q, nheads, headdim_v)`` in q's dtype.
      lse: float32 ``(nheads, total_q)``.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            _fail(name, "a 3-D array (total, nheads, headdim)", f"shape {x.shape}")
    _check_qkv(q[None], k[None], v[None])
    cu_q = _concrete_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = _concrete_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if cu_q.shape != cu_k.shape:
        _fail("cu_seqlens_k", f"shape {cu_q.shape} (from cu_seqlens_q)", f"shape {cu_k.shape}")
    batch, nheads = cu_q.shape[0] - 1, q.shape[1]
    alibi = _check_alibi(alibi_slopes, batch, nheads)

    outs, lses = [], []
    for b in range(batch):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        out, lse = attention_ref(
            q[None, qs], k[None, ks], v[None, ks], softmax_scale=softmax_scale,
            causal=causal, window_size=window_size, softcap=softcap,
            alibi_slopes=None if alibi is None else alibi[b if alibi.shape[0] > 1 else 0],
            upcast=upcast)
        outs.append(out[0])
        lses.append(lse[0])
    if batch == 0:
        return (jnp.zeros((0, nheads, v.shape[2]), q.dtype),
                jnp.zeros((nheads, 0), jnp.float32))
    return jnp.concatenate(outs, axis=0), jnp.concatenate(lses, axis=1)


def varlen_rows(cu_seqlens, max_seqlen, total):
    """Rows of a packed buffer that each sequence owns, clamped as the kernels
    clamp them: sequence ``b`` starts at ``cu_seqlens[b]`` clipped to
    ``[0, total]`` and keeps ``cu_seqlens[b + 1] - cu_seqlens[b]`` rows, at most
    ``max_seqlen`` and never past the buffer's end. Works on traced values.

    Returns:
      index: int32 ``(batch, max_seqlen)`` buffer row of each padded position.
      valid: bool ``(batch, max_seqlen)``.
      lengths: int32 ``(batch,)`` clamped lengths.
    """
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    start = jnp.clip(cu[:-1], 0, total)
    lengths = jnp.clip(cu[1:] - cu[:-1], 0, None)
    lengths = jnp.minimum(jnp.minimum(lengths, max_seqlen), total - start)
    pos = jnp.arange(max_seqlen, dtype=jnp.int32)
    valid = pos[None, :] < lengths[:, None]
    index = jnp.where(valid, start[:, None] + pos[None, :], 0)
    return index, valid, lengths


def varlen_gather(x, index, valid):
    """Packed rows ``(total, ...)`` gathered into a padded ``(batch,
    max_seqlen, ...)`` batch by ``varlen_rows``' index, zero where not valid."""
    if x.shape[0] == 0:  # an empty buffer: every sequence is empty
        return jnp.zeros(index.shape + x.shape[1:], x.dtype)
    rows = jnp.take(x, index, axis=0)
    valid = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
    return jnp.where(valid, rows, jnp.zeros((), x.dtype))


def attention_varlen_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                            softmax_scale=None, causal=False, window_size=(-1, -1),
                            softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_mask=None,
                            upcast=True):
    """Variable-length attention with traced ``cu_seqlens`` (jit-friendly).

    The same semantics as ``attention_varlen_ref``, computed by gathering the
    sequences into a padded ``(batch, max_seqlen, ...)`` batch (clamped as in
    ``varlen_rows``), running ``attention_ref``'s computation with per-sequence
    lengths and scattering back. Rows no sequence covers get output 0 and
    ``lse = +inf``.

    Args:
      q: ``(total_q, nheads, headdim)``; k, v: ``(total_k, nheads_k, headdim)``.
      cu_seqlens_q, cu_seqlens_k: int ``(batch + 1,)``, may be traced.
      max_seqlen_q, max_seqlen_k: static ints.
      dropout_mask: bool ``(batch, nheads, max_seqlen_q, max_seqlen_k)`` in
        per-sequence coordinates, True = keep; needed when dropout_p > 0.
      Other arguments: as in ``attention_ref``; alibi_slopes is ``(nheads,)``
        or ``(batch, nheads)``.

    Returns:
      out: ``(total_q, nheads, headdim)`` in q's dtype.
      lse: float32 ``(nheads, total_q)``.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    total_q, nheads, headdim = q.shape
    total_k = k.shape[0]
    batch = jnp.shape(cu_seqlens_q)[0] - 1
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    index_q, valid_q, len_q = varlen_rows(cu_seqlens_q, max_seqlen_q, total_q)
    index_k, valid_k, len_k = varlen_rows(cu_seqlens_k, max_seqlen_k, total_k)

    out, lse = _attention(
        varlen_gather(q, index_q, valid_q), varlen_gather(k, index_k, valid_k),
        varlen_gather(v, index_k, valid_k),
        softmax_scale=softmax_scale, causal=causal, window_size=_check_window(window_size),
        softcap=float(softcap), alibi_slopes=_check_alibi(alibi_slopes, batch, nheads),
        dropout_p=float(dropout_p), dropout_mask=dropout_mask, key_lengths=len_k,
        query_lengths=len_q, upcast=upcast)
    if total_q == 0:
        return jnp.zeros((0, nheads, v.shape[2]), out.dtype), jnp.zeros((nheads, 0), jnp.float32)
    rows = jnp.where(valid_q, index_q, total_q).reshape(-1)  # invalid: dropped
    out_flat = jnp.zeros((total_q, nheads, v.shape[2]), out.dtype).at[rows].set(
        out.reshape(-1, nheads, v.shape[2]), mode="drop")
    lse_flat = jnp.full((nheads, total_q), jnp.inf, jnp.float32).at[:, rows].set(
        jnp.moveaxis(lse, 1, 0).reshape(nheads, -1), mode="drop")
    return out_flat, lse_flat


def kvcache_ref(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None,
                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                alibi_slopes=None):
    """Reference attention against a KV cache, with optional in-place append.

    Computation is in float32 (as ``attention_ref(upcast=True)``).

    Args:
      q: ``(batch, seqlen_q, nheads, headdim)``.
      k_cache: ``(batch, seqlen_cache, nheads_k, headdim)``.
      v_cache: ``(batch, seqlen_cache, nheads_k, headdim_v)``.
      cache_seqlens: int ``(batch,)`` number of valid cache entries; may be
        traced. Requires ``cache_seqlens[b] + seqlen_new <= seqlen_cache``
        (checked only when concrete).
      k_new: optional ``(batch, seqlen_new, nheads_k, headdim)`` written at
        positions ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1``.
      v_new: optional ``(batch, seqlen_new, nheads_k, headdim_v)``; with k_new.
      Other arguments: as in ``attention_ref``. The effective key length is
      ``L_b = cache_seqlens[b] + seqlen_new``; keys at ``j >= L_b`` are
      invisible and masks/ALiBi use ``shift_b = L_b - seqlen_q``.

    Returns:
      out: ``(batch, seqlen_q, nheads, headdim_v)`` in q's dtype.
      lse: float32 ``(batch, nheads, seqlen_q)``.
      k_cache_updated, v_cache_updated: caches with k_new/v_new written, in the
        caches' dtypes (the inputs unchanged if no k_new).
    """
    q, k_cache, v_cache = jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache)
    _check_qkv(q, k_cache, v_cache)
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_cache, nheads_k = k_cache.shape[1], k_cache.shape[2]
    cache_seqlens = jnp.asarray(cache_seqlens)
    if cache_seqlens.shape != (batch,) or not jnp.issubdtype(cache_seqlens.dtype, jnp.integer):
        _fail("cache_seqlens", f"an integer array of shape ({batch},)",
              f"shape {cache_seqlens.shape} dtype {cache_seqlens.dtype}")
    cache_seqlens = cache_seqlens.astype(jnp.int32)
    window_size = _check_window(window_size)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    if softcap < 0:
        _fail("softcap", "a value >= 0", softcap)
    alibi = _check_alibi(alibi_slopes, batch, nheads)

    if (k_new is None) != (v_new is None):
        _fail("k_new/v_new", "both or neither",
              f"k_new={'set' if k_new is not None else None}, "
              f"v_new={'set' if v_new is not None else None}")
    seqlen_new = 0
    if k_new is not None:
        k_new, v_new = jnp.asarray(k_new), jnp.asarray(v_new)
        seqlen_new = k_new.shape[1] if k_new.ndim == 4 else -1
        for name, x, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            expected = (batch, seqlen_new, nheads_k, cache.shape[3])
            if x.ndim != 4 or x.shape != expected:
                _fail(name, f"shape {expected}", f"shape {x.shape}")
        try:
            concrete = np.asarray(cache_seqlens)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            concrete = None  # traced: cannot check here
        if concrete is not None:
            max_len = int(np.max(concrete, initial=0)) + seqlen_new
            if max_len > seqlen_cache:
                _fail("cache_seqlens", f"cache_seqlens + seqlen_new <= seqlen_cache={seqlen_cache}",
                      f"max cache_seqlens + seqlen_new = {max_len}")
        if seqlen_new > 0:
            # Position p of the cache takes k_new[p - cache_seqlens[b]] when in range.
            offset = jnp.arange(seqlen_cache, dtype=jnp.int32)[None, :] - cache_seqlens[:, None]
            in_range = ((offset >= 0) & (offset < seqlen_new))[:, :, None, None]
            index = jnp.clip(offset, 0, seqlen_new - 1)[:, :, None, None]

            def write(cache, new):
                gathered = jnp.take_along_axis(new.astype(cache.dtype), index, axis=1)
                return jnp.where(in_range, gathered, cache)

            k_cache, v_cache = write(k_cache, k_new), write(v_cache, v_new)

    key_lengths = cache_seqlens + seqlen_new
    out, lse = _attention(q, k_cache, v_cache, softmax_scale=softmax_scale, causal=causal,
                          window_size=window_size, softcap=float(softcap), alibi_slopes=alibi,
                          key_lengths=key_lengths, upcast=True)
    return out, lse, k_cache, v_cache


# ---- Dropout RNG ---------------------------------------------------------------
# The kernels' dropout mask (csrc/score_mods.h) in plain JAX, bit for bit, so
# that the reference, the CPU path and the GPU kernels drop the same entries.

_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b):
    """(hi, lo) 32-bit halves of the 64-bit product of constant a and uint32 b."""
    b = b.astype(jnp.uint32)
    lo = b * jnp.uint32(a)
    a0, a1 = jnp.uint32(a & 0xFFFF), jnp.uint32(a >> 16)
    b0, b1 = b & jnp.uint32(0xFFFF), b >> jnp.uint32(16)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1  # each < 2^32
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)  # < 3 * 2^16
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    return hi, lo


def philox4x32_10(counter, key):
    """Philox-4x32 with 10 rounds (Salmon et al., SC 2011).

    Args:
      counter: four uint32 arrays (broadcastable to each other).
      key: two uint32 arrays.

    Returns:
      Four uint32 arrays: the random words.
    """
    c0, c1, c2, c3 = (jnp.asarray(c, jnp.uint32) for c in counter)
    k0, k1 = (jnp.asarray(k, jnp.uint32) for k in key)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + jnp.uint32(_PHILOX_WEYL[0])
        k1 = k1 + jnp.uint32(_PHILOX_WEYL[1])
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """An entry is dropped when its 16-bit random number is below this:
    ``round(dropout_p * 65536)``, so dropout_p is honoured to 2^-17."""
    return int(np.rint(np.float64(np.float32(dropout_p)) * 65536.0))


def dropout_rng(key, batch: int):
    """The kernels' per-batch-element RNG state from a JAX PRNG key.

    Returns uint32 ``(batch, 4)``: the key's 64-bit seed (two words drawn with
    ``jax.random.bits``), the batch index and 0. The batch index is part of
    every counter, so the elements of a batch get independent masks; under
    ``vmap`` with per-example keys each example gets its own seed.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.arange(batch, dtype=jnp.uint32)
    return jnp.stack([jnp.broadcast_to(seed[0], (batch,)), jnp.broadcast_to(seed[1], (batch,)),
                      index, jnp.zeros_like(index)], axis=-1)


def dropout_keep_mask(rng, nheads: int, seqlen_q: int, seqlen_k: int, dropout_p: float):
    """Which attention probabilities survive dropout, as the kernels draw them.

    Entries are grouped in 16 x 16 blocks. Entry ``(i, j)`` of head ``h`` and
    batch element ``b`` takes 16 bits of the Philox-4x32-10 call with counter
    ``(j // 16, (i // 16) * 32 + lane, h, rng[b, 2])`` and key ``rng[b, :2]``,
    where ``lane = (i % 8) * 4 + (j % 8) // 2``; the bits are number
    ``slot = ((i % 16) // 8) * 4 + ((j % 16) // 8) * 2 + j % 2`` of the eight
    16-bit halves of the 128-bit result (low half of a word first). The entry
    is kept when that number is ``>= dropout_threshold(dropout_p)``.

    Args:
      rng: uint32 ``(batch, 4)`` from ``dropout_rng``.

    Returns:
      bool ``(batch, nheads, seqlen_q, seqlen_k)``, True = kept.
    """
    rng = jnp.asarray(rng, jnp.uint32)
    i = jnp.arange(seqlen_q, dtype=jnp.uint32)[None, None, :, None]
    j = jnp.arange(seqlen_k, dtype=jnp.uint32)[None, None, None, :]
    h = jnp.arange(nheads, dtype=jnp.uint32)[None, :, None, None]
    seed0, seed1, index = (rng[:, w][:, None, None, None] for w in range(3))
    lane = (i % 8) * 4 + (j % 8) // 2
    words = philox4x32_10((j // 16, (i // 16) * 32 + lane, h, index), (seed0, seed1))
    slot = ((i % 16) // 8) * 4 + ((j % 16) // 8) * 2 + j % 2
    word = jnp.select([slot // 2 == w for w in range(3)], list(words[:3]), words[3])
    bits = jnp.where(slot % 2 == 1, word >> 16, word & jnp.uint32(0xFFFF))
    return bits >= jnp.uint32(dropout_threshold(dropout_p))


def attention_probs(q, k, lse, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, key_lengths=None, query_lengths=None,
                    q_segment_ids=None, kv_segment_ids=None):
    """Attention probabilities ``exp(score - lse)`` for a given LSE, float32.

    Args:
      q, k: as in ``attention_ref``.
      lse: float32 ``(batch, nheads, seqlen_q)``, e.g. a kernel's.
      key_lengths, query_lengths: optional int ``(batch,)``: sequences padded
        to seqlen_k / seqlen_q (varlen), masks aligned to these lengths.
      q_segment_ids, kv_segment_ids: optional segment ids (``attention_ref``).
      Other arguments: as in ``attention_ref``.

    Returns:
      float32 ``(batch, nheads, seqlen_q, seqlen_k)``; 0 for invisible keys and
      on rows with ``lse = +inf``.
    """
    q, k = jnp.asarray(q), jnp.asarray(k)
    _check_qkv(q, k, k)
    batch, _, nheads, headdim = q.shape
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    groups = nheads // k.shape[2]
    k = jnp.repeat(k.astype(jnp.float32), groups, axis=2)
    segment_mask = row_shift = None
    if q_segment_ids is not None:
        segment_mask, row_shift = segment_positions(q_segment_ids, kv_segment_ids)
    scores = _scores(q.astype(jnp.float32), k, softmax_scale=softmax_scale, causal=causal,
                     window_size=_check_window(window_size), softcap=float(softcap),
                     alibi_slopes=_check_alibi(alibi_slopes, batch, nheads),
                     segment_mask=segment_mask, key_lengths=key_lengths, upcast=True,
                     query_lengths=query_lengths, row_shift=row_shift)
    lse = jnp.asarray(lse, jnp.float32)[..., None]
    return jnp.where(jnp.isfinite(lse), jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)),
                     0.0)
