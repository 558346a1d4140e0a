"""CPU (any backend): variable-length attention and segment ids through the
reference path, the padded-batch helpers, the kernels' segment tables, and
the error messages."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import reference
from jax_flash._src.segments import segment_tables


def _packed(seed, lens_q, lens_k, nheads=4, nheads_k=2, head_dim=16, dtype=jnp.float32):
    rng = np.random.RandomState(seed)
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = jnp.asarray(rng.randn(cu_q[-1], nheads, head_dim), dtype)
    k = jnp.asarray(rng.randn(cu_k[-1], nheads_k, head_dim), dtype)
    v = jnp.asarray(rng.randn(cu_k[-1], nheads_k, head_dim), dtype)
    return q, k, v, cu_q, cu_k


LENS = [([5, 0, 17, 1, 9], [5, 0, 17, 1, 9]), ([3, 8, 1], [10, 2, 7]), ([0, 0], [4, 0])]
OPTIONS = [dict(causal=True), dict(window_size=(3, 1)), dict(softcap=5.0),
           dict(alibi_slopes=np.float32([0.1, 0.2, 0.3, 0.4])), dict()]


@pytest.mark.parametrize("lens,opts", list(itertools.product(LENS, OPTIONS)))
def test_padded_reference_matches_per_sequence_loop(lens, opts):
    q, k, v, cu_q, cu_k = _packed(1, *lens)
    max_q, max_k = max(max(lens[0]), 1), max(max(lens[1]), 1)
    f = jax.jit(lambda q, k, v, cu_q, cu_k: reference.attention_varlen_padded(
        q, k, v, cu_q, cu_k, max_q, max_k, **opts))
    out, lse = f(q, k, v, cu_q, cu_k)
    ref_out, ref_lse = reference.attention_varlen_ref(q, k, v, cu_q, cu_k, **opts)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)
    # Gradients too (the CPU path of flash_attn_varlen_func differentiates this).
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    g = jax.grad(loss(lambda q, k, v: f(q, k, v, cu_q, cu_k)[0]), (0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(lambda q, k, v: reference.attention_varlen_ref(
        q, k, v, cu_q, cu_k, **opts)[0]), (0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_varlen_functions_and_packing_on_the_reference_path():
    q, k, v, cu_q, cu_k = _packed(2, [4, 9, 1], [6, 9, 3], nheads=4, nheads_k=4,
                                  dtype=jnp.bfloat16)
    out, lse, probs = jax_flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, causal=True,
                                                      return_attn_probs=True)
    ref_out, ref_lse = reference.attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True)
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=1e-2)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-4)
    assert probs.shape == (3, 4, 9, 9)
    np.testing.assert_allclose(np.asarray(probs).sum(-1)[1], 1.0, atol=1e-3)  # seq 1: 9 rows
    kv = jnp.stack([k, v], axis=1)
    out_kv = jax_flash.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 9, 9, causal=True)
    np.testing.assert_array_equal(np.float32(out_kv), np.float32(out))
    qkv = jnp.stack([q, q, q], axis=1)
    out_qkv = jax_flash.flash_attn_varlen_qkvpacked_func(qkv, cu_q, 9)
    ref_qkv, _ = reference.attention_varlen_ref(q, q, q, cu_q, cu_q)
    np.testing.assert_allclose(np.float32(out_qkv), np.float32(ref_qkv), atol=1e-2)


def test_uncovered_and_truncated_rows():
    """Rows past cu_seqlens[-1] and rows cut by a too small max_seqlen: 0 / +inf."""
    q, k, v, _, _ = _packed(3, [12], [12])
    cu = jnp.int32([0, 5, 10])  # rows 10, 11 belong to no sequence
    out, lse = reference.attention_varlen_padded(q, k, v, cu, cu, 3, 5)
    assert (np.asarray(out)[10:] == 0).all() and np.isposinf(np.asarray(lse)[:, 10:]).all()
    # max_seqlen_q = 3 truncates each sequence's queries to its first 3 rows.
    assert (np.asarray(out)[3:5] == 0).all() and (np.asarray(out)[8:10] == 0).all()
    # Inconsistent prefix sums are clamped into the buffer, never out of it.
    bad = jnp.int32([0, 20, 7])
    out, lse = reference.attention_varlen_padded(q, k, v, bad, bad, 12, 12)
    assert np.isfinite(np.asarray(out)).all()


def test_unpad_pad_round_trip_and_jit():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(3, 7, 2, 4), jnp.float32)
    mask = jnp.asarray(rng.rand(3, 7) > 0.4)
    xu, idx, cu, max_len = jax_flash.unpad_input(x, mask)
    lens = np.asarray(mask).sum(1)
    assert xu.shape[0] == lens.sum() and max_len == lens.max()
    np.testing.assert_array_equal(cu, np.concatenate([[0], np.cumsum(lens)]))
    back = jax_flash.pad_input(xu, idx, 3, 7)
    np.testing.assert_array_equal(back, jnp.where(mask[..., None, None], x, 0))

    @jax.jit
    def f(x, mask):
        xu, idx, cu, max_len = jax_flash.unpad_input(x, mask, total=21)
        assert max_len == 7  # traced mask: the padded length bounds it
        return jax_flash.pad_input(xu * 2, idx, 3, 7), cu

    back2, cu2 = f(x, mask)
    np.testing.assert_array_equal(back2, jnp.where(mask[..., None, None], 2 * x, 0))
    np.testing.assert_array_equal(cu2, cu)


def _random_segments(rng, batch, seqlen, contiguous):
    if contiguous:
        return np.sort(rng.randint(0, 5, (batch, seqlen)), axis=1).astype(np.int32)
    return rng.randint(0, 3, (batch, seqlen)).astype(np.int32)


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (2, 1), (0, 0), (3, -1)])
@pytest.mark.parametrize("seqlens", [(23, 23), (17, 29), (30, 11)])
def test_segment_tables_describe_the_reference_mask(contiguous, window, seqlens):
    """The kernels' O(seqlen) tables reproduce the reference's segment mask:
    row intervals (with the id check when ids are not single runs) give
    exactly the visible keys, key intervals contain every row that sees the
    key, and the ALiBi shift is the reference's."""
    rng = np.random.RandomState(sum(seqlens) + window[0] * 7 + contiguous)
    sq, sk = seqlens
    q_seg = _random_segments(rng, 2, sq, contiguous)
    kv_seg = _random_segments(rng, 2, sk, contiguous)
    seg_q, seg_k = (np.asarray(t) for t in segment_tables(jnp.asarray(q_seg),
                                                           jnp.asarray(kv_seg), *window))
    same, shift = reference.segment_positions(q_seg, kv_seg)
    mask = same & reference._visibility_mask(sq, sk, causal=False, window_size=window,
                                             row_shift=shift)
    mask = np.asarray(mask)[:, 0]
    j = np.arange(sk)[None, None, :]
    i = np.arange(sq)[None, :, None]
    from_rows = (j >= seg_q[..., 0:1]) & (j <= seg_q[..., 1:2])
    exact = seg_k[:, :1, 3:4] != 0
    from_rows &= exact | (seg_q[..., 2:3] == kv_seg[:, None, :])
    np.testing.assert_array_equal(from_rows, mask)
    in_cols = (i >= seg_k[:, None, :, 0]) & (i <= seg_k[:, None, :, 1])
    assert not (mask & ~in_cols).any()
    np.testing.assert_array_equal(seg_q[..., 3], shift)
    if contiguous:
        assert exact.all()


def test_segment_ids_equal_per_document_attention():
    """Contiguous segments in one row = each document attended alone."""
    lens = [4, 7, 1, 6]
    q, k, v, cu, _ = _packed(5, lens, lens, nheads=2, nheads_k=2)
    seg = np.repeat(np.arange(len(lens)), lens).astype(np.int32)[None]
    for opts in (dict(causal=True), dict(window_size=(2, 0)),
                 dict(alibi_slopes=np.float32([0.3, 0.1]))):
        out, lse = reference.attention_ref(q[None], k[None], v[None], q_segment_ids=seg,
                                           kv_segment_ids=seg, **opts)
        ref_out, ref_lse = reference.attention_varlen_ref(q, k, v, cu, cu, **opts)
        np.testing.assert_allclose(out[0], ref_out, atol=1e-5)
        np.testing.assert_allclose(lse[0], ref_lse, atol=1e-5)
        half = [x[None].astype(jnp.float16) for x in (q, k, v)]
        api = jax_flash.flash_attn_func(*half, segment_ids=(seg, seg), **opts)
        np.testing.assert_allclose(np.float32(api[0]), ref_out, atol=2e-2)


def test_varlen_and_segment_errors():
    q, k, v, cu, _ = _packed(6, [3, 4], [3, 4], dtype=jnp.float16)
    call = jax_flash.flash_attn_varlen_func
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        call(q, k, v, cu.astype(np.int64), cu, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        call(q, k, v, jnp.int32([0, 3, 7]), jnp.int32([0, 7]), 4, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must have shape \(batch \+ 1,\)"):
        call(q, k, v, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2), jnp.int32), 4, 4)
    with pytest.raises(ValueError, match="q must have rank 3"):
        call(q[None], k, v, jnp.asarray(cu), jnp.asarray(cu), 4, 4)
    with pytest.raises(ValueError, match="max_seqlen_k must be >= 0"):
        call(q, k, v, jnp.asarray(cu), jnp.asarray(cu), 4, -1)
    with pytest.raises(TypeError, match="static Python int"):
        jax.jit(lambda m: call(q, k, v, jnp.asarray(cu), jnp.asarray(cu), m, 4))(4)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        call(q, k, v, jnp.asarray(cu), jnp.asarray(cu), 4, 4,
             alibi_slopes=jnp.ones((3, 4), jnp.float32))
    qb, kb, vb = q[None], k[None], v[None]
    seg = jnp.zeros((1, 7), jnp.int32)
    with pytest.raises(TypeError, match="segment_ids must be a pair"):
        jax_flash.flash_attn_func(qb, kb, vb, segment_ids=seg)
    with pytest.raises(TypeError, match="kv_segment_ids must be an integer array"):
        jax_flash.flash_attn_func(qb, kb, vb, segment_ids=(seg, seg.astype(jnp.float32)))
    with pytest.raises(ValueError, match=r"q_segment_ids must have shape \(batch, seqlen\)"):
        jax_flash.flash_attn_func(qb, kb, vb, segment_ids=(seg[:, :5], seg))
    with pytest.raises(ValueError, match="pass a static `total`"):
        jax.jit(lambda x, m: jax_flash.unpad_input(x, m)[0])(jnp.ones((2, 3, 1)),
                                                            jnp.ones((2, 3), bool))


def test_varlen_empty_buffers_with_probs():
    """No rows at all: empty outputs, zero probabilities, no gather from an empty axis."""
    q = jnp.zeros((0, 2, 16), jnp.float16)
    cu = jnp.int32([0, 0, 0])
    out, lse, probs = jax_flash.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, causal=True,
                                                      return_attn_probs=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    assert probs.shape == (2, 2, 4, 4) and not np.asarray(probs).any()
