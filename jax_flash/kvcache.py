"""FlashAttention-2's `flash_attn_with_kvcache` in functional JAX form."""

from __future__ import annotations

import jax.numpy as jnp

from jax_flash._src import kvcache as kvcache_lib
from jax_flash._src.backend import run_kvcache

__all__ = ["flash_attn_with_kvcache"]


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes=None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """Attention of q against a KV cache, optionally appending new keys/values
    (decoding), FlashAttention-2's `flash_attn_with_kvcache`.

    On GPUs our split-KV / paged decode kernels run (float32 accumulation,
    P rounded to q's dtype like the attention kernels); the environment
    variable JAX_FLASH_KVCACHE_KERNELS=0 selects the plain-JAX reference
    there instead, which always runs on CPUs (`jax_flash.reference.kvcache_attention_ref`'s
    computation, float32 math). Works under `jax.jit` (cache_seqlens and
    the other integer arrays may be traced) and `jax.vmap`. Functional: the
    updated caches are returned; under `jax.jit` with the caches donated
    (`donate_argnums`) the new rows are written in place.

    Args:
      q: (batch, seqlen_q, nheads, headdim), float16 or bfloat16.
      k_cache, v_cache: q's dtype; contiguous (batch_cache, seqlen_cache,
        nheads_k, headdim), or paged (num_blocks, page_size, nheads_k,
        headdim) with block_table (any page_size >= 1). nheads % nheads_k == 0
        (MQA/GQA).
      k, v: optional (batch, seqlen_new, nheads_k, headdim), seqlen_new <=
        seqlen_cache: written into the cache at logical positions
        cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 (k after rotary),
        then attended to. Give both or neither; need cache_seqlens.
      rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2) in q's
        dtype, seqlen_ro >= seqlen_cache; rotary_dim a multiple of 16, <=
        headdim; need k and v. The first rotary_dim dims of new key row i are
        rotated to position cache_seqlens[b] - cache_leftpad[b] + i; q's row i
        to that same position when causal or a window is set, else every q
        row to cache_seqlens[b] - cache_leftpad[b] (FlashAttention-2's rule).
        Rotated values are rounded to q's dtype.
      cache_seqlens: None (the whole cache; not with k/v), a Python int, or
        int32 (batch,): the valid cache rows of each sequence before the append.
      cache_batch_idx: optional int32 (batch,): the contiguous cache's row of
        each sequence (default b). Not with block_table.
      cache_leftpad: optional int32 (batch,): keys before it are not attended
        to (left padding). Not with block_table.
      block_table: optional int32 (batch, max_blocks_per_seq): logical position
        p of sequence b lives in page block_table[b, p // page_size], row
        p % page_size; seqlen_cache = max_blocks_per_seq * page_size.
      softmax_scale, causal, window_size, softcap, alibi_slopes: as in
        `flash_attn_func`, aligned bottom-right against the visible keys:
        query i sits at key position L_b - seqlen_q + i with L_b =
        cache_seqlens[b] + seqlen_new (ALiBi distances count key positions).
        Keys in [cache_leftpad[b], L_b) are visible.
      rotary_interleaved: static bool; GPT-J pairs (0, 1), (2, 3), ... if
        True, GPT-NeoX halves [0, rotary_dim / 2), [rotary_dim / 2, rotary_dim)
        if False.
      num_splits: static int >= 0 (0: automatic); a performance hint of the
        split-KV kernels, no effect on results.
      return_softmax_lse: static bool; also return the LSE.

    Inconsistent values are clamped so that nothing is read or written
    outside a buffer (the reference's rules, `jax_flash._src.kvcache_ref`):
    cache_seqlens[b] is clamped into [0, seqlen_cache - seqlen_new] (every
    write fits), cache_leftpad[b] into [0, cache_seqlens[b]] (after that
    clamp), cache_batch_idx into [0, batch_cache - 1], block_table entries
    into [0, num_blocks - 1], rotary positions into [0, seqlen_ro - 1].
    Writes apply in batch order: where two sequences' writes meet (duplicate
    cache_batch_idx, shared pages) the later sequence's value stays; the
    attention reads the cache after all writes.

    Returns:
      out (batch, seqlen_q, nheads, headdim) in q's dtype; with
      return_softmax_lse, (out, softmax_lse) with softmax_lse float32 (batch,
      nheads, seqlen_q). With k/v, the updated caches follow: (out, k_cache,
      v_cache) or (out, softmax_lse, k_cache, v_cache), same shapes and
      dtypes as the inputs. A query with no visible key gets output 0 and
      LSE +inf.

    Raises:
      TypeError, ValueError: bad shapes, dtypes or options (the message names
        the argument, the expected and the actual). Static options must be
        Python / numpy scalars: a traced value raises TypeError.
    """
    spec, operands = kvcache_lib.bind(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
        cache_leftpad, block_table, softmax_scale, causal, window_size, softcap,
        rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse)
    if spec.batch == 0:  # nothing to attend to or append: no kernel, no empty gather
        _, seqlen_q, nheads, _ = q.shape
        out, lse = jnp.zeros(q.shape, q.dtype), jnp.zeros((0, nheads, seqlen_q), jnp.float32)
    else:
        out, lse, k_cache, v_cache = run_kvcache(spec, (q, k_cache, v_cache, k, v), operands)
    result = (out, lse) if spec.return_lse else (out,)
    if spec.append:
        result += (k_cache, v_cache)
    return result[0] if len(result) == 1 else result
