"""`flash_attn_varlen_func` against paged K/V (chunked prefill): packed
queries of several sequences, each attending to its own pages.

It is a kv-cache call in disguise: sequence b's queries, left-padded to a
common length, sit at the end of its visible keys, which is exactly
`flash_attn_with_kvcache`'s alignment. So this binds a paged kv-cache call
(`_src/kvcache.bind`, its validation and clamping rules) and runs it on the
backend chosen for that layout, then scatters the rows back.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_flash import reference
from jax_flash._src import kvcache as kvcache_lib
from jax_flash._src import validate
from jax_flash._src.backend import run_kvcache
from jax_flash._src.validate import shape_str


def _left_padded_rows(cu_seqlens_q, pad: int, total: int):
    """Buffer row of each left-padded position (batch, pad) and validity:
    sequence b's rows end at position pad - 1 (clamped like
    `reference.varlen_rows`)."""
    index, _, lengths = reference.varlen_rows(cu_seqlens_q, pad, total)
    start = index[:, :1]  # row of position 0 (0 for empty sequences)
    src = jnp.arange(pad, dtype=jnp.int32)[None, :] - (pad - lengths)[:, None]
    valid = src >= 0
    return jnp.where(valid, start + src, 0), valid


def run(q, k_cache, v_cache, cu_seqlens_q, max_seqlen_q, max_seqlen_k, *, block_table,
        seqused_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        return_attn_probs):
    """Paged varlen attention: out (total_q, nheads, headdim)."""
    if not hasattr(q, "shape") or q.ndim != 3:
        raise ValueError(f"q must have rank 3 (total_q, nheads, headdim), got "
                         f"{shape_str(q) if hasattr(q, 'shape') else type(q).__name__}")
    if not hasattr(cu_seqlens_q, "dtype"):
        raise TypeError(f"cu_seqlens_q must be an int32 array (batch + 1,), got "
                        f"{type(cu_seqlens_q).__name__}")
    if cu_seqlens_q.dtype != jnp.int32:
        raise TypeError(f"cu_seqlens_q must be int32, got {cu_seqlens_q.dtype}")
    if cu_seqlens_q.ndim != 1 or cu_seqlens_q.shape[0] < 1:
        raise ValueError(f"cu_seqlens_q must have shape (batch + 1,), got "
                         f"{shape_str(cu_seqlens_q)}")
    batch = cu_seqlens_q.shape[0] - 1
    if seqused_k is None:
        raise ValueError("seqused_k must be given with block_table (the keys of each "
                         "sequence), got None")
    kvcache_lib._int32("seqused_k", seqused_k, (batch,), "(batch,)")
    max_q = validate.max_seqlen("max_seqlen_q", max_seqlen_q)
    max_k = validate.max_seqlen("max_seqlen_k", max_seqlen_k)
    if validate.static_float("dropout_p", dropout_p, "0 with block_table") != 0:
        raise ValueError(f"dropout_p must be 0 with block_table (paged K/V is inference-only), "
                         f"got {dropout_p!r}")
    if validate.static_bool("return_attn_probs", return_attn_probs):
        raise ValueError("return_attn_probs must be False with block_table, got True")
    total_q = q.shape[0]
    pad = min(max_q, total_q)
    index, valid = _left_padded_rows(cu_seqlens_q, pad, total_q)
    q_pad = reference.varlen_gather(q, index, valid)  # (batch, pad, nheads, headdim)
    # Keys: the first seqused_k[b] logical positions, at most max_seqlen_k.
    seqlens = jnp.minimum(seqused_k, max_k)
    spec, operands = kvcache_lib.bind(
        q_pad, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, cache_names=("k", "v"))
    out, _, _, _ = run_kvcache(spec, (q_pad, k_cache, v_cache, None, None), operands)
    rows = jnp.where(valid, index, total_q).reshape(-1)  # padding: dropped
    return jnp.zeros(q.shape, out.dtype).at[rows].set(
        out.reshape(-1, *q.shape[1:]), mode="drop")
