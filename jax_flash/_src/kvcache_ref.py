"""The plain-JAX reference of `flash_attn_with_kvcache` (float32 math, like
`attention_ref(upcast=True)`): the semantics of record of the kvcache layout.

Order of work, per call:

1. Clamp (`_src/kvcache.py`): c_b = cache_seqlens[b] in [0, seqlen_cache -
   seqlen_new], lp_b = cache_leftpad[b] in [0, c_b], cache_batch_idx into
   [0, batch_cache - 1], block_table entries into [0, num_blocks - 1].
2. Rotary (when rotary_cos/sin are given): the first rotary_dim dims of new
   key row i are rotated to position c_b - lp_b + i; q row i to position
   c_b - lp_b + i when causal or a window is set, else c_b - lp_b (every row),
   FlashAttention-2's rule. Positions are clamped into [0, seqlen_ro - 1].
   The rotated values are rounded to the input dtype (as the kernels store them).
3. Write: new row i of sequence b goes to logical position c_b + i of its
   cache: contiguous row cache_batch_idx[b] (or b), or paged
   block_table[b, p // page_size], row p % page_size. Writes apply in batch
   order: where two sequences' writes land on one slot (duplicate
   cache_batch_idx or shared pages; unspecified in FlashAttention-2) the
   later sequence's value stays (within a sequence, the later row's).
4. Attend: sequence b reads its logical cache positions [0, seqlen_cache)
   from the updated cache; keys in [lp_b, L_b) with L_b = c_b + seqlen_new are
   visible, query i sits at key position L_b - seqlen_q + i (causal, window,
   ALiBi are aligned bottom-right against that). No visible key: out 0, LSE +inf.

Steps 1-3 (`update`) are shared with the CUDA backend, whose decode kernel
only reads the cache (step 4): the write is one scatter into the caches, so
under `jax.jit` with the caches donated XLA updates them in place.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_flash._src import kvcache as kvcache_lib
from jax_flash._src.kvcache import KVCacheOperands, KVCacheSpec


def apply_rotary(x, cos, sin, positions, interleaved: bool):
    """Rotary embedding of the first rotary_dim = 2 * cos.shape[1] dims of x.

    Args:
      x: (batch, seqlen, nheads, d).
      cos, sin: (seqlen_ro, rotary_dim / 2).
      positions: int (batch, seqlen), clamped into [0, seqlen_ro - 1].
      interleaved: GPT-J pairs (0, 1), (2, 3), ... if True, else GPT-NeoX
        halves [0, rotary_dim / 2) and [rotary_dim / 2, rotary_dim).

    Returns:
      x with the rotated dims, in x's dtype (computed in float32).
    """
    seqlen_ro, half = cos.shape
    rotary_dim = 2 * half
    positions = jnp.clip(positions, 0, seqlen_ro - 1)
    c = jnp.take(cos.astype(jnp.float32), positions, axis=0)[:, :, None, :]
    s = jnp.take(sin.astype(jnp.float32), positions, axis=0)[:, :, None, :]
    rot = x[..., :rotary_dim].astype(jnp.float32)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
        rotated = jnp.stack([y1, y2], axis=-1).reshape(rot.shape)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)


def _clamped(spec: KVCacheSpec, ops: KVCacheOperands):
    """(c, lp): clamped cache_seqlens and cache_leftpad, int32 (batch,)."""
    c = jnp.clip(ops.cache_seqlens.astype(jnp.int32), 0, spec.seqlen_cache - spec.seqlen_new)
    lp = (jnp.clip(ops.cache_leftpad, 0, c) if spec.has_leftpad
          else jnp.zeros_like(c))
    return c, lp


def _slots(spec: KVCacheSpec, ops: KVCacheOperands, positions):
    """Row of the flattened cache (batch_cache * rows, nheads_k, d) holding
    logical positions (batch, n) of each sequence (positions in range)."""
    b = jnp.arange(spec.batch, dtype=jnp.int32)[:, None]
    if spec.paged:
        table = jnp.clip(ops.block_table, 0, spec.batch_cache - 1)
        pages = jnp.take_along_axis(table, positions // spec.page_size, axis=1)
        return pages * spec.page_size + positions % spec.page_size
    row = jnp.clip(ops.cache_batch_idx, 0, spec.batch_cache - 1)[:, None] \
        if spec.has_batch_idx else b
    return row * spec.seqlen_cache + positions


# Up to this many appended rows, duplicate slots are found by comparing all
# pairs (one fused elementwise kernel); beyond, by a sort.
_PAIRWISE_MAX_ROWS = 1024


def _append_targets(spec: KVCacheSpec, ops: KVCacheOperands, c):
    """Step 3's scatter indices into the flattened caches, (batch * seqlen_new,)
    in write order: each new row's slot, or an index past the cache's end
    (dropped) for a row a later row of the same slot overwrites. Of several
    writes to one slot the last in (batch, row) order stays, so the kept
    indices are unique and no order of applying them is left to XLA."""
    slots = _slots(spec, ops, c[:, None] + jnp.arange(spec.seqlen_new, dtype=jnp.int32)[None, :])
    slots = slots.reshape(-1)  # (batch * seqlen_new,), in write order
    n = slots.shape[0]
    if not spec.paged and not spec.has_batch_idx:
        # Sequence b owns rows [b * seqlen_cache, (b + 1) * seqlen_cache) and
        # writes distinct positions in them: no two rows share a slot.
        return slots
    if n <= _PAIRWISE_MAX_ROWS:
        later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
        keep = ~jnp.any(later & (slots[None, :] == slots[:, None]), axis=1)
    else:
        order = jnp.argsort(slots, stable=True)  # equal slots keep write order
        ordered = slots[order]
        last = jnp.append(ordered[1:] != ordered[:-1], True)  # the last write of its slot
        keep = jnp.zeros((n,), bool).at[order].set(last)
    past_end = spec.batch_cache * (spec.page_size if spec.paged else spec.seqlen_cache)
    return jnp.where(keep, slots, past_end + jnp.arange(n, dtype=jnp.int32))


def _append(targets, cache, new):
    """Step 3 for one cache: the new rows (batch, seqlen_new, ...) scattered
    to `targets` (_append_targets), the dropped ones past the end."""
    tail = cache.shape[2:]
    flat = cache.reshape(-1, *tail)
    flat = flat.at[targets].set(new.reshape(-1, *tail).astype(cache.dtype), mode="drop",
                                unique_indices=True)
    return flat.reshape(cache.shape)


def update(spec: KVCacheSpec, xs, ops: KVCacheOperands):
    """Steps 1-3: (q, k_cache, v_cache) after rotary and the append, for a
    bound call; xs = (q, k_cache, v_cache, k, v), k/v None without an append."""
    q, k_cache, v_cache, k, v = (None if x is None else jnp.asarray(x) for x in xs)
    c, lp = _clamped(spec, ops)
    if spec.rotary_dim:
        start = (c - lp)[:, None]
        k = apply_rotary(k, ops.rotary_cos, ops.rotary_sin,
                         start + jnp.arange(spec.seqlen_new, dtype=jnp.int32)[None, :],
                         spec.rotary_interleaved)
        rows = jnp.arange(spec.seqlen_q, dtype=jnp.int32)[None, :]
        q = apply_rotary(q, ops.rotary_cos, ops.rotary_sin,
                         start + (rows if spec.rotary_q_per_row else 0 * rows),
                         spec.rotary_interleaved)
    if spec.append and spec.batch * spec.seqlen_new:  # an empty batch writes nothing
        targets = _append_targets(spec, ops, c)
        k_cache = _append(targets, k_cache, k)
        v_cache = _append(targets, v_cache, v)
    return q, k_cache, v_cache


def attend(spec: KVCacheSpec, q, k_cache, v_cache, ops: KVCacheOperands, upcast: bool = True):
    """Step 4: (out, lse) of q against the (updated) caches. upcast=False is
    FlashAttention's low-precision reference (both matmuls and P in the input
    dtype), for the kernels' error bound."""
    from jax_flash import reference  # the shared attention core

    c, lp = _clamped(spec, ops)
    tail = k_cache.shape[2:]
    k_flat = k_cache.reshape(-1, *tail)
    v_flat = v_cache.reshape(-1, *tail)
    positions = jnp.broadcast_to(jnp.arange(spec.seqlen_cache, dtype=jnp.int32)[None, :],
                                 (spec.batch, spec.seqlen_cache))
    read = _slots(spec, ops, positions)
    keys, values = jnp.take(k_flat, read, axis=0), jnp.take(v_flat, read, axis=0)
    lengths = c + spec.seqlen_new
    j = positions[:, :, None, None]
    visible = (j >= lp[:, None, None, None]) & (j < lengths[:, None, None, None])
    # Invisible slots may hold anything (NaN): zero them so 0 * NaN cannot leak.
    keys = jnp.where(visible, keys, jnp.zeros((), keys.dtype))
    values = jnp.where(visible, values, jnp.zeros((), values.dtype))
    return reference._attention(
        q, keys, values, softmax_scale=spec.softmax_scale, causal=False,
        window_size=spec.window, softcap=spec.softcap,
        alibi_slopes=ops.alibi if spec.has_alibi else None,
        segment_mask=visible[:, :, 0, 0][:, None, None, :], key_lengths=lengths,
        upcast=upcast)


def run(spec: KVCacheSpec, xs, ops: KVCacheOperands, upcast: bool = True):
    """(out, lse, k_cache, v_cache) of a bound call; xs = (q, k_cache,
    v_cache, k, v), k/v None without an append."""
    q, k_cache, v_cache = update(spec, xs, ops)
    out, lse = attend(spec, q, k_cache, v_cache, ops, upcast)
    return out, lse, k_cache, v_cache


def kvcache_attention_ref(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                          rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                          cache_leftpad=None, block_table=None, softmax_scale=None,
                          causal=False, window_size=(-1, -1), softcap=0.0,
                          rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                          upcast=True):
    """Reference `flash_attn_with_kvcache` on any backend (plain JAX, float32).

    Takes `jax_flash.flash_attn_with_kvcache`'s arguments (validated the same
    way) and returns ``(out, softmax_lse, k_cache, v_cache)`` always: the
    caches updated functionally (the inputs when k/v are None). The rules,
    clamping included, are in this module's docstring. ``upcast=False``
    computes the attention like `attention_ref(upcast=False)` (matmuls and
    P in the input dtype): FlashAttention's low-precision reference.
    """
    spec, ops = kvcache_lib.bind(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
        cache_leftpad, block_table, softmax_scale, causal, window_size, softcap,
        rotary_interleaved, alibi_slopes, num_splits, True)
    return run(spec, (q, k_cache, v_cache, k, v), ops, upcast=upcast)
