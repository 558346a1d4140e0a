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

from jax_flash._src import validate
# The dropout RNG lives in _src/dropout.py (shared with the kernels' path);
# these names stay public here.
from jax_flash._src.dropout import (  # noqa: F401
    dropout_keep_mask,
    dropout_rng,
    dropout_threshold,
    philox4x32_10,
)

__all__ = [
    "attention_probs",
    "attention_ref",
    "attention_varlen_padded",
    "apply_rotary",
    "attention_varlen_ref",
    "dropout_keep_mask",
    "dropout_rng",
    "dropout_threshold",
    "kvcache_attention_ref",
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
        ``-slope * |i + seqlen_k - seqlen_q - j|`` to the scores. Differentiable
        here (a plain JAX function); the public ``flash_attn_*`` functions
        treat the slopes as constants on every backend (zero gradient).
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
    validate.ref_qkv(q, k, v)
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k = k.shape[1]
    window_size = validate.ref_window(window_size)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    validate.ref_softcap(softcap)
    alibi = validate.ref_alibi(alibi_slopes, batch, nheads)
    dropout_mask = validate.ref_dropout(dropout_p, dropout_mask,
                                        (batch, nheads, seqlen_q, seqlen_k))
    segment_mask = row_shift = None
    segments = validate.ref_segment_ids(q_segment_ids, kv_segment_ids, batch, seqlen_q,
                                        seqlen_k)
    if segments is not None:
        # Compared in the ids' own dtype (equality only): int64 ids stay exact.
        segment_mask, row_shift = segment_positions(*segments)

    return _attention(q, k, v, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size, softcap=float(softcap), alibi_slopes=alibi,
                      dropout_p=float(dropout_p), dropout_mask=dropout_mask,
                      segment_mask=segment_mask, row_shift=row_shift, upcast=upcast)


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
    validate.ref_varlen_qkv(q, k, v)
    cu_q = validate.ref_concrete_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = validate.ref_concrete_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if cu_q.shape != cu_k.shape:
        validate.fail("cu_seqlens_k", f"shape {cu_q.shape} (from cu_seqlens_q)", f"shape {cu_k.shape}")
    batch, nheads = cu_q.shape[0] - 1, q.shape[1]
    alibi = validate.ref_alibi(alibi_slopes, batch, nheads)

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
        Only its first ``min(max_seqlen, total)`` rows / columns are read, so
        a mask of that smaller shape is accepted too.
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
    # A sequence never has more rows than its buffer: padding to the buffer's
    # rows when they are fewer than max_seqlen is the same computation, with
    # memory following the real lengths (max_seqlen may be a loose bound).
    pad_q, pad_k = min(max_seqlen_q, total_q), min(max_seqlen_k, total_k)
    index_q, valid_q, len_q = varlen_rows(cu_seqlens_q, pad_q, total_q)
    index_k, valid_k, len_k = varlen_rows(cu_seqlens_k, pad_k, total_k)
    if dropout_mask is not None and dropout_p > 0:
        dropout_mask = jnp.asarray(dropout_mask)[:, :, :pad_q, :pad_k]

    out, lse = _attention(
        varlen_gather(q, index_q, valid_q), varlen_gather(k, index_k, valid_k),
        varlen_gather(v, index_k, valid_k),
        softmax_scale=softmax_scale, causal=causal, window_size=validate.ref_window(window_size),
        softcap=float(softcap), alibi_slopes=validate.ref_alibi(alibi_slopes, batch, nheads),
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
    validate.ref_qkv(q, k_cache, v_cache)
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_cache, nheads_k = k_cache.shape[1], k_cache.shape[2]
    cache_seqlens = validate.ref_cache_seqlens(cache_seqlens, batch)
    window_size = validate.ref_window(window_size)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    validate.ref_softcap(softcap)
    alibi = validate.ref_alibi(alibi_slopes, batch, nheads)

    if (k_new is None) != (v_new is None):
        validate.fail("k_new/v_new", "both or neither",
              f"k_new={'set' if k_new is not None else None}, "
              f"v_new={'set' if v_new is not None else None}")
    seqlen_new = 0
    if k_new is not None:
        k_new, v_new = jnp.asarray(k_new), jnp.asarray(v_new)
        seqlen_new = k_new.shape[1] if k_new.ndim == 4 else -1
        for name, x, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            expected = (batch, seqlen_new, nheads_k, cache.shape[3])
            if x.ndim != 4 or x.shape != expected:
                validate.fail(name, f"shape {expected}", f"shape {x.shape}")
        try:
            concrete = np.asarray(cache_seqlens)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            concrete = None  # traced: cannot check here
        if concrete is not None:
            max_len = int(np.max(concrete, initial=0)) + seqlen_new
            if max_len > seqlen_cache:
                validate.fail("cache_seqlens", f"cache_seqlens + seqlen_new <= seqlen_cache={seqlen_cache}",
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
    validate.ref_qkv(q, k, k)
    batch, _, nheads, headdim = q.shape
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    groups = nheads // k.shape[2]
    k = jnp.repeat(k.astype(jnp.float32), groups, axis=2)
    segment_mask = row_shift = None
    if q_segment_ids is not None:
        segment_mask, row_shift = segment_positions(q_segment_ids, kv_segment_ids)
    scores = _scores(q.astype(jnp.float32), k, softmax_scale=softmax_scale, causal=causal,
                     window_size=validate.ref_window(window_size), softcap=float(softcap),
                     alibi_slopes=validate.ref_alibi(alibi_slopes, batch, nheads),
                     segment_mask=segment_mask, key_lengths=key_lengths, upcast=True,
                     query_lengths=query_lengths, row_shift=row_shift)
    lse = jnp.asarray(lse, jnp.float32)[..., None]
    return jnp.where(jnp.isfinite(lse), jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)),
                     0.0)


# flash_attn_with_kvcache's reference lives in _src/kvcache_ref.py (it uses
# _attention above, hence the import at the end).
from jax_flash._src.kvcache_ref import apply_rotary, kvcache_attention_ref  # noqa: E402,F401
