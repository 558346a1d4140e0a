"""Random flash_attn_with_kvcache cases, shared by the CPU model test, the
GPU kernel tests and scripts/sanitize_kvcache.py: caches contiguous or
paged (random page order, a few spare pages), sequences of random lengths
(the first one full), optional append, rotary, cache_batch_idx,
cache_leftpad and ALiBi, and optionally adversarial tables: lengths past the
capacity and negative, pages and batch rows out of range, left padding
beyond the length."""

import jax.numpy as jnp
import numpy as np


def make_case(seed, *, dtype=jnp.bfloat16, batch=3, head_dim=64, heads=(4, 2), seqlen_q=1,
              seqlen_cache=100, page_size=0, seqlen_new=0, rotary=None, batch_idx=False,
              leftpad=False, alibi=False, adversarial=False):
    """(arrays, statics): keyword arguments of flash_attn_with_kvcache, the
    arrays apart from the static options (rotary_interleaved).

    rotary: None or (rotary_dim, interleaved). page_size 0: contiguous;
    else seqlen_cache is rounded up to whole pages.
    """
    rs = np.random.RandomState(seed)
    nheads, nheads_k = heads
    seqlen_new = min(seqlen_new, seqlen_cache)
    normal = lambda *shape: jnp.asarray(rs.standard_normal(shape), dtype)
    kw = dict(q=normal(batch, seqlen_q, nheads, head_dim))
    statics = {}
    if page_size:
        blocks = -(-seqlen_cache // page_size)
        num_blocks = batch * blocks + 2
        kw["k_cache"] = normal(num_blocks, page_size, nheads_k, head_dim)
        kw["v_cache"] = normal(num_blocks, page_size, nheads_k, head_dim)
        table = rs.permutation(num_blocks)[:batch * blocks].reshape(batch, blocks)
        if adversarial:
            table[0, 0], table[-1, -1] = -5, num_blocks + 7
        kw["block_table"] = jnp.asarray(table, jnp.int32)
        seqlen_cache = blocks * page_size
    else:
        batch_cache = batch + 2 if batch_idx else batch
        kw["k_cache"] = normal(batch_cache, seqlen_cache, nheads_k, head_dim)
        kw["v_cache"] = normal(batch_cache, seqlen_cache, nheads_k, head_dim)
        if batch_idx:
            idx = rs.permutation(batch_cache)[:batch]
            if adversarial:
                idx[0], idx[-1] = -3, batch_cache + 4
            kw["cache_batch_idx"] = jnp.asarray(idx, jnp.int32)
    seqlens = rs.randint(0, seqlen_cache - seqlen_new + 1, batch)
    seqlens[0] = seqlen_cache - seqlen_new
    if adversarial and batch > 1:
        seqlens[1] = -7
        seqlens[-1] = seqlen_cache + 100
    kw["cache_seqlens"] = jnp.asarray(seqlens, jnp.int32)
    if leftpad and not page_size:
        pad = rs.randint(0, seqlen_cache + 1, batch)
        if adversarial:
            pad[0] = -2
            pad[-1] = seqlen_cache + 50
        kw["cache_leftpad"] = jnp.asarray(pad, jnp.int32)
    if seqlen_new:
        kw["k"] = normal(batch, seqlen_new, nheads_k, head_dim)
        kw["v"] = normal(batch, seqlen_new, nheads_k, head_dim)
        if rotary:
            rotary_dim, interleaved = rotary
            angle = (np.arange(seqlen_cache + 3)[:, None]
                     * rs.uniform(1e-3, 1, rotary_dim // 2)[None, :])
            kw["rotary_cos"] = jnp.asarray(np.cos(angle), dtype)
            kw["rotary_sin"] = jnp.asarray(np.sin(angle), dtype)
            statics["rotary_interleaved"] = interleaved
    if alibi:
        kw["alibi_slopes"] = jnp.asarray(rs.uniform(0.01, 0.3, (batch, nheads)), jnp.float32)
    return kw, statics
