"""Segment ids (document masking) for the kernels.

The kernels read O(seqlen) int32 tables (`segment_tables`), not a mask. User
ids may be any integer dtype (hashed document ids are often int64): they are
first mapped to dense int32 ranks per batch row (`dense_ranks`), which keeps
equal ids equal and distinct ids distinct, so no cast can merge documents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _ranks_numpy(ids: np.ndarray) -> np.ndarray:
    """Dense ranks along the last axis of a concrete numpy array (exact in
    any integer dtype, even where JAX runs without 64-bit types)."""
    order = np.argsort(ids, axis=-1, kind="stable")
    sorted_ = np.take_along_axis(ids, order, axis=-1)
    new = np.concatenate([np.zeros(ids.shape[:-1] + (min(ids.shape[-1], 1),), bool),
                          sorted_[..., 1:] != sorted_[..., :-1]], axis=-1)
    ranks = np.empty(ids.shape, np.int32)
    np.put_along_axis(ranks, order, np.cumsum(new, axis=-1, dtype=np.int32), axis=-1)
    return ranks


def _ranks_row(ids):
    """Dense ranks of one row of ids (jnp, in the ids' own dtype)."""
    n = ids.shape[0]
    if n == 0:
        return jnp.zeros((0,), jnp.int32)
    order = jnp.argsort(ids, stable=True)
    sorted_ = ids[order]
    new = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                           (sorted_[1:] != sorted_[:-1]).astype(jnp.int32)])
    return jnp.zeros((n,), jnp.int32).at[order].set(jnp.cumsum(new, dtype=jnp.int32))


def dense_ranks(q_ids, kv_ids):
    """Maps each batch row's ids, q and kv together, to int32 ranks.

    The rank of an id is the number of distinct smaller ids in the row (q's
    and kv's ids pooled), computed in the ids' own dtype: equal ids get equal
    ranks and distinct ids distinct ones, so attention by rank equals
    attention by id exactly, whatever the dtype (ids 1 and 1 + 2**32 stay
    apart). Concrete numpy ids are ranked in numpy, so they are exact even
    when JAX runs without 64-bit types.

    Args:
      q_ids: integer (batch..., seqlen_q).
      kv_ids: integer (batch..., seqlen_k), the same leading dims.

    Returns:
      int32 (batch..., seqlen_q) and (batch..., seqlen_k) ranks.
    """
    seqlen_q = q_ids.shape[-1]
    if isinstance(q_ids, np.ndarray) and isinstance(kv_ids, np.ndarray):
        dtype = np.promote_types(q_ids.dtype, kv_ids.dtype)
        ranks = _ranks_numpy(np.concatenate([q_ids.astype(dtype), kv_ids.astype(dtype)], -1))
        return jnp.asarray(ranks[..., :seqlen_q]), jnp.asarray(ranks[..., seqlen_q:])
    q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    dtype = jnp.promote_types(q_ids.dtype, kv_ids.dtype)
    fn = _ranks_row
    for _ in range(q_ids.ndim - 1):
        fn = jax.vmap(fn)
    ranks = fn(jnp.concatenate([q_ids.astype(dtype), kv_ids.astype(dtype)], axis=-1))
    return ranks[..., :seqlen_q], ranks[..., seqlen_q:]


def segment_tables(q_seg, kv_seg, left: int, right: int):
    """The kernels' segment tables (csrc/params.h: seg_q, seg_k) from int32
    segment ids (batch..., seqlen_q) / (batch..., seqlen_k), e.g. the ranks
    of `dense_ranks`, and the window (left, right), -1 unbounded.

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
    # int32 tables: the ids must already be int32 ranks (`dense_ranks`), as a
    # cast of wider ids could merge two documents.
    return fn(q_seg, kv_seg)
