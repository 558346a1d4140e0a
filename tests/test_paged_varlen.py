"""flash_attn_varlen_func with paged K/V (block_table + seqused_k, chunked
prefill): values against a float64 loop over the pages, clamping of
inconsistent values, errors. Runs the platform's backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash


def _case(seed, lens_q, ctx, page, g=2, h=4, d=32, spare_rows=2, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    batch = len(lens_q)
    max_blocks = max(1, -(-max(ctx) // page))
    num_blocks = batch * max_blocks + 1
    kc = jnp.asarray(rng.standard_normal((num_blocks, page, g, d)), dtype)
    vc = jnp.asarray(rng.standard_normal((num_blocks, page, g, d)), dtype)
    table = jnp.asarray(rng.permutation(num_blocks)[:batch * max_blocks].reshape(batch, max_blocks),
                        jnp.int32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens_q)]), jnp.int32)
    q = jnp.asarray(rng.standard_normal((int(cu[-1]) + spare_rows, h, d)), dtype)
    return q, kc, vc, table, cu


def _loop(q, kc, vc, table, cu, seqused, *, causal, window=(-1, -1), softcap=0.0):
    """float64 attention of each sequence's queries against its pages;
    rows no sequence covers stay 0."""
    q, kc, vc = (np.asarray(x, np.float64) for x in (q, kc, vc))
    table, cu = np.asarray(table), np.asarray(cu)
    page = kc.shape[1]
    out = np.zeros(q.shape)
    groups = q.shape[1] // kc.shape[2]
    for b in range(len(cu) - 1):
        rows = np.arange(cu[b], cu[b + 1])
        n_k = int(seqused[b])
        keys = np.stack([kc[table[b, p // page], p % page] for p in range(n_k)]) if n_k else None
        vals = np.stack([vc[table[b, p // page], p % page] for p in range(n_k)]) if n_k else None
        for i, r in enumerate(rows):
            pos = n_k - len(rows) + i  # bottom-right: the last query at the last key
            for hh in range(q.shape[1]):
                if n_k == 0:
                    continue
                s = keys[:, hh // groups] @ q[r, hh] / np.sqrt(q.shape[2])
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                j = np.arange(n_k)
                ok = np.ones(n_k, bool)
                if causal:
                    ok &= j <= pos
                if window[0] >= 0:
                    ok &= j >= pos - window[0]
                if window[1] >= 0:
                    ok &= j <= pos + window[1]
                if not ok.any():
                    continue
                p = np.where(ok, np.exp(s - s[ok].max()), 0.0)
                out[r, hh] = p @ vals[:, hh // groups] / p.sum()
    return out


@pytest.mark.parametrize("page", [1, 3, 16])
@pytest.mark.parametrize("causal,window,softcap", [
    (True, (-1, -1), 0.0), (False, (-1, -1), 0.0), (True, (2, 0), 0.0), (False, (3, 1), 5.0)])
def test_matches_loop(page, causal, window, softcap):
    lens_q, ctx = [3, 0, 5, 1], [7, 4, 12, 1]
    q, kc, vc, table, cu = _case(page, lens_q, ctx, page)
    seqused = jnp.asarray(ctx, jnp.int32)
    fn = jax.jit(lambda q, kc, vc, table, seqused: jax_flash.flash_attn_varlen_func(
        q, kc, vc, cu, None, max(lens_q), max(ctx), causal=causal, window_size=window,
        softcap=softcap, block_table=table, seqused_k=seqused))
    out = fn(q, kc, vc, table, seqused)
    ref = _loop(q, kc, vc, table, cu, ctx, causal=causal, window=window, softcap=softcap)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2, rtol=2e-2)
    assert np.all(np.asarray(out[-2:], np.float32) == 0)  # rows no sequence covers


def test_gqa_mqa_and_matches_dense_varlen():
    """Paged K/V gives what the same keys packed densely give."""
    for g in (4, 1):
        lens_q, ctx = [2, 4], [5, 9]
        q, kc, vc, table, cu = _case(7, lens_q, ctx, 2, g=g, spare_rows=0)
        out = jax_flash.flash_attn_varlen_func(
            q, kc, vc, cu, None, 4, 9, causal=True, block_table=table,
            seqused_k=jnp.asarray(ctx, jnp.int32))
        page = kc.shape[1]
        k_rows = [kc[table[b, p // page], p % page] for b in range(2) for p in range(ctx[b])]
        v_rows = [vc[table[b, p // page], p % page] for b in range(2) for p in range(ctx[b])]
        cu_k = jnp.asarray(np.concatenate([[0], np.cumsum(ctx)]), jnp.int32)
        dense = jax_flash.flash_attn_varlen_func(
            q, jnp.stack(k_rows), jnp.stack(v_rows), cu, cu_k, 4, 9, causal=True)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(dense, np.float32),
                                   atol=1e-2)


def test_inconsistent_values_are_clamped():
    """seqused_k beyond capacity or negative, block_table entries out of
    range: clamped (documented), never out of bounds."""
    lens_q, ctx = [2, 2, 2], [4, 4, 4]
    q, kc, vc, table, cu = _case(3, lens_q, ctx, 2)
    capacity = table.shape[1] * kc.shape[1]
    seqused = jnp.asarray([capacity + 50, -3, 4], jnp.int32)
    bad_table = table.at[2, 0].set(10_000).at[2, 1].set(-7)
    out = jax_flash.flash_attn_varlen_func(q, kc, vc, cu, None, 2, 10_000, causal=True,
                                           block_table=bad_table, seqused_k=seqused)
    clamped_table = jnp.clip(bad_table, 0, kc.shape[0] - 1)
    ref = _loop(q, kc, vc, clamped_table, cu, [capacity, 0, 4], causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2, rtol=2e-2)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_errors():
    q, kc, vc, table, cu = _case(0, [2, 3], [4, 5], 2)
    seqused = jnp.asarray([4, 5], jnp.int32)
    call = jax_flash.flash_attn_varlen_func
    with pytest.raises(ValueError, match="seqused_k must be given with block_table"):
        call(q, kc, vc, cu, None, 3, 5, block_table=table)
    with pytest.raises(ValueError, match="seqused_k is only supported with block_table"):
        call(q, kc, vc, cu, cu, 3, 5, seqused_k=seqused)
    with pytest.raises(ValueError, match="cu_seqlens_k must be None with block_table"):
        call(q, kc, vc, cu, cu, 3, 5, block_table=table, seqused_k=seqused)
    with pytest.raises(TypeError, match="seqused_k must be int32"):
        call(q, kc, vc, cu, None, 3, 5, block_table=table, seqused_k=seqused.astype(jnp.int16))
    with pytest.raises(ValueError, match=r"seqused_k must have shape \(batch,\)"):
        call(q, kc, vc, cu, None, 3, 5, block_table=table, seqused_k=seqused[:1])
    with pytest.raises(TypeError, match="block_table must be int32"):
        call(q, kc, vc, cu, None, 3, 5, block_table=table.astype(jnp.float32),
             seqused_k=seqused)
    with pytest.raises(ValueError, match="block_table must have shape"):
        call(q, kc, vc, cu, None, 3, 5, block_table=table[:1], seqused_k=seqused)
    with pytest.raises(ValueError, match="dropout_p must be 0 with block_table"):
        call(q, kc, vc, cu, None, 3, 5, dropout_p=0.1, dropout_key=jax.random.key(0),
             block_table=table, seqused_k=seqused)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        call(q, kc.astype(jnp.float16), vc, cu, None, 3, 5, block_table=table,
             seqused_k=seqused)
    with pytest.raises(ValueError, match=r"k and v must have the same shape \(num_blocks, "
                                         r"page_size, nheads_k, headdim\)"):
        call(q, kc, vc[:, :1], cu, None, 3, 5, block_table=table, seqused_k=seqused)
    with pytest.raises(ValueError, match=r"v must have rank 4"):
        call(q, kc, vc[0], cu, None, 3, 5, block_table=table, seqused_k=seqused)
    with pytest.raises(ValueError, match="q must have rank 3"):
        call(q[None], kc, vc, cu, None, 3, 5, block_table=table, seqused_k=seqused)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32, got int16"):
        call(q, kc, vc, cu.astype(jnp.int16), None, 3, 5, block_table=table, seqused_k=seqused)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must have shape \(batch \+ 1,\), "
                                         r"got \(1, 3\)"):
        call(q, kc, vc, cu[None], None, 3, 5, block_table=table, seqused_k=seqused)
