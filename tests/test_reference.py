"""Checks jax_flash.reference against a naive float64 NumPy oracle."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flash.reference import attention_ref, attention_varlen_ref, kvcache_ref

F32_TOL = dict(atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# Oracle: explicit loops over batch, head, query row and visible keys, float64.
# ----------------------------------------------------------------------------


def oracle(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
           alibi_slopes=None, dropout_p=0.0, dropout_mask=None, q_segment_ids=None,
           kv_segment_ids=None, key_lengths=None, upcast=None):
    del upcast  # the oracle is always float64
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k, headdim_v = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(headdim) if softmax_scale is None else softmax_scale
    left, right = window_size
    if causal:
        right = 0
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes, np.float64)
    out = np.zeros((batch, seqlen_q, nheads, headdim_v))
    lse = np.full((batch, nheads, seqlen_q), np.inf)
    for b in range(batch):
        length = seqlen_k if key_lengths is None else int(key_lengths[b])
        for h in range(nheads):
            kh = h // (nheads // nheads_k)
            for i in range(seqlen_q):
                shift = length - seqlen_q
                if q_segment_ids is not None:
                    # Positions count inside the segment: its last query sits
                    # at its last key.
                    seg = q_segment_ids[b][i]
                    k_last = max([j for j in range(seqlen_k) if kv_segment_ids[b][j] == seg],
                                 default=-1)
                    q_last = max(r for r in range(seqlen_q) if q_segment_ids[b][r] == seg)
                    shift = k_last - q_last
                cols = []
                for j in range(length):
                    if left >= 0 and not j >= i + shift - left:
                        continue
                    if right >= 0 and not j <= i + shift + right:
                        continue
                    if q_segment_ids is not None and q_segment_ids[b][i] != kv_segment_ids[b][j]:
                        continue
                    cols.append(j)
                if not cols:
                    continue
                s = np.array([scale * np.dot(q[b, i, h], k[b, j, kh]) for j in cols])
                if softcap > 0:
                    s = softcap * np.tanh(s / softcap)
                if slopes is not None:
                    slope = slopes[h] if slopes.ndim == 1 else slopes[b, h]
                    s = s - slope * np.abs(i + shift - np.array(cols))
                m = s.max()
                e = np.exp(s - m)
                lse[b, h, i] = m + np.log(e.sum())
                p = e / e.sum()
                if dropout_p > 0:
                    p = p * np.asarray(dropout_mask)[b, h, i, cols] / (1.0 - dropout_p)
                out[b, i, h] = p @ v[b, cols, kh]
    return out, lse


def rand(rs, *shape, dtype=np.float32):
    return rs.standard_normal(shape).astype(dtype)


def make_qkv(seed, batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, headdim_v=None,
             dtype=np.float32):
    rs = np.random.RandomState(seed)
    q = rand(rs, batch, seqlen_q, nheads, headdim, dtype=dtype)
    k = rand(rs, batch, seqlen_k, nheads_k, headdim, dtype=dtype)
    v = rand(rs, batch, seqlen_k, nheads_k, headdim_v or headdim, dtype=dtype)
    return rs, q, k, v


ARRAY_KWARGS = ("alibi_slopes", "dropout_mask", "q_segment_ids", "kv_segment_ids")


@functools.lru_cache(maxsize=None)
def _jitted(static_items):
    static = dict(static_items)
    return jax.jit(lambda q, k, v, arrays: attention_ref(q, k, v, **arrays, **static))


def jitted_ref(q, k, v, **kwargs):
    """attention_ref under jit: XLA compiles dominate this file's run time, and one
    compile per case (cached per static kwargs) is much cheaper than eager dispatch."""
    arrays = {n: kwargs.pop(n) for n in ARRAY_KWARGS if kwargs.get(n) is not None}
    return _jitted(tuple(sorted(kwargs.items())))(q, k, v, arrays)


def check(q, k, v, tol=F32_TOL, **kwargs):
    out, lse = jitted_ref(q, k, v, **kwargs)
    ref_out, ref_lse = oracle(q, k, v, **kwargs)
    assert out.shape == ref_out.shape and out.dtype == jnp.asarray(q).dtype
    assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, **tol)
    np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(ref_lse))
    np.testing.assert_allclose(np.asarray(lse), ref_lse, **tol)
    return out, lse, ref_out, ref_lse


# ----------------------------------------------------------------------------
# attention_ref
# ----------------------------------------------------------------------------

LENGTHS_HEADDIMS = [(1, 7, 8), (13, 9, 40), (17, 33, 59), (8, 8, 40), (33, 17, 8), (7, 1, 59)]


@pytest.mark.parametrize("seqlen_q,seqlen_k,headdim", LENGTHS_HEADDIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_causal(seqlen_q, seqlen_k, headdim, causal):
    seed = seqlen_q * 1000 + seqlen_k * 10 + headdim + causal
    _, q, k, v = make_qkv(seed, 2, seqlen_q, seqlen_k, 3, 3, headdim)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("headdim", [8, 40, 59, 128])
def test_headdims(headdim):
    _, q, k, v = make_qkv(headdim, 2, 11, 14, 2, 2, headdim)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(13, 9), (9, 13), (16, 16), (1, 7)])
@pytest.mark.parametrize("window_size,causal", [
    ((3, 2), False), ((0, 0), False), ((5, -1), False), ((-1, 1), False), ((2, 7), True)])
def test_windows(seqlen_q, seqlen_k, window_size, causal):
    _, q, k, v = make_qkv(seqlen_q + 31 * seqlen_k + sum(window_size), 2, seqlen_q, seqlen_k,
                          2, 2, 16)
    check(q, k, v, window_size=window_size, causal=causal)


@pytest.mark.parametrize("kwargs,empty_rows", [
    (dict(causal=True), range(0, 8)),                   # seqlen_q > seqlen_k
    (dict(window_size=(0, 0)), range(0, 8)),
    (dict(window_size=(-1, 0)), range(0, 8)),
    (dict(window_size=(2, 5), causal=True), range(0, 8)),
])
def test_empty_rows(kwargs, empty_rows):
    _, q, k, v = make_qkv(7, 2, 16, 8, 2, 1, 8)
    out, lse, _, _ = check(q, k, v, **kwargs)
    out, lse = np.asarray(out), np.asarray(lse)
    rows = np.array(list(empty_rows))
    assert np.all(out[:, rows] == 0)
    assert np.all(np.isposinf(lse[:, :, rows]))
    others = np.setdiff1d(np.arange(16), rows)
    assert np.all(np.isfinite(lse[:, :, others]))
    assert not np.any(np.isnan(out))


def test_window_left_negative_not_minus_one_is_unbounded():
    _, q, k, v = make_qkv(3, 1, 5, 9, 2, 2, 8)
    for a, b in [((-5, 2), (-1, 2)), ((3, -7), (3, -1))]:
        np.testing.assert_array_equal(jitted_ref(q, k, v, window_size=a)[0],
                                      jitted_ref(q, k, v, window_size=b)[0])


@pytest.mark.parametrize("causal,seed", [(False, 0), (True, 1)])
def test_softcap(causal, seed):
    _, q, k, v = make_qkv(100 + seed, 2, 11, 19, 2, 2, 32)
    scale = 20.0 / math.sqrt(32)  # scores of order +-40 so tanh is far from linear
    tol = dict(atol=5e-5, rtol=5e-5)
    out, _, _, _ = check(q, k, v, softmax_scale=scale, softcap=30.0, causal=causal, tol=tol)
    uncapped, _ = oracle(q, k, v, softmax_scale=scale, causal=causal)
    assert np.max(np.abs(np.asarray(out) - uncapped)) > 1e-2


@pytest.mark.parametrize("slope_shape", ["heads", "batch_heads"])
@pytest.mark.parametrize("seqlen_q,seqlen_k,causal,window_size", [
    (13, 9, False, (-1, -1)), (9, 17, True, (-1, -1)), (12, 12, False, (3, 3)), (1, 7, True, (-1, -1))])
def test_alibi(slope_shape, seqlen_q, seqlen_k, causal, window_size):
    rs, q, k, v = make_qkv(seqlen_q * seqlen_k, 2, seqlen_q, seqlen_k, 4, 2, 24)
    shape = (4,) if slope_shape == "heads" else (2, 4)
    slopes = rs.uniform(0.05, 1.0, size=shape).astype(np.float32)
    out, _, _, _ = check(q, k, v, alibi_slopes=slopes, causal=causal, window_size=window_size)
    if seqlen_k > 1:
        plain, _ = jitted_ref(q, k, v, causal=causal, window_size=window_size)
        assert np.max(np.abs(np.asarray(out) - np.asarray(plain))) > 1e-3


@pytest.mark.parametrize("dropout_p,causal", [(0.1, False), (0.5, True), (0.3, True)])
def test_dropout_mask(dropout_p, causal):
    rs, q, k, v = make_qkv(int(dropout_p * 10) + causal, 2, 10, 14, 4, 4, 16)
    mask = rs.uniform(size=(2, 4, 10, 14)) >= dropout_p
    _, lse, _, _ = check(q, k, v, dropout_p=dropout_p, dropout_mask=mask, causal=causal)
    np.testing.assert_array_equal(lse, jitted_ref(q, k, v, causal=causal)[1])


def test_dropout_mask_ignored_when_p_zero():
    rs, q, k, v = make_qkv(5, 1, 4, 6, 2, 2, 8)
    mask = rs.uniform(size=(1, 2, 4, 6)) > 0.5
    np.testing.assert_array_equal(jitted_ref(q, k, v, dropout_mask=mask)[0],
                                  jitted_ref(q, k, v)[0])


@pytest.mark.parametrize("nheads,nheads_k,causal", [
    (6, 2, False), (6, 2, True), (4, 1, False), (4, 1, True), (6, 3, True)])
def test_gqa_mqa(nheads, nheads_k, causal):
    _, q, k, v = make_qkv(nheads * 10 + nheads_k, 2, 9, 13, nheads, nheads_k, 16)
    check(q, k, v, causal=causal)


def test_gqa_equals_repeated_kv():
    _, q, k, v = make_qkv(11, 2, 5, 7, 6, 2, 8)
    out, lse = jitted_ref(q, k, v)
    out_r, lse_r = jitted_ref(q, np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2))
    np.testing.assert_allclose(out, out_r, **F32_TOL)
    np.testing.assert_allclose(lse, lse_r, **F32_TOL)


def test_value_headdim_differs():
    _, q, k, v = make_qkv(12, 2, 6, 10, 2, 1, 16, headdim_v=24)
    out, _, _, _ = check(q, k, v, causal=True)
    assert out.shape == (2, 6, 2, 24)


@pytest.mark.parametrize("kind", ["packed", "random"])
@pytest.mark.parametrize("causal", [False, True])
def test_segment_ids(kind, causal):
    rs, q, k, v = make_qkv(20 + causal, 2, 12, 15, 2, 2, 8)
    if kind == "packed":  # sorted ids, as produced by sequence packing
        q_seg = np.sort(rs.randint(0, 3, size=(2, 12)), axis=1).astype(np.int32)
        kv_seg = np.sort(rs.randint(0, 3, size=(2, 15)), axis=1).astype(np.int32)
    else:  # unsorted, with ids present only on one side -> some empty rows
        q_seg = rs.randint(0, 4, size=(2, 12)).astype(np.int32)
        kv_seg = rs.randint(0, 3, size=(2, 15)).astype(np.int32)
        q_seg[0, 0] = 3
    _, lse, _, _ = check(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal)
    if kind == "random":
        assert np.isposinf(np.asarray(lse)[0, :, 0]).all()


def test_everything_combined():
    rs, q, k, v = make_qkv(99, 2, 17, 33, 6, 2, 40)
    kwargs = dict(
        softmax_scale=0.3, causal=True, window_size=(9, -1), softcap=30.0,
        alibi_slopes=rs.uniform(0.01, 0.3, size=(2, 6)).astype(np.float32),
        dropout_p=0.25, dropout_mask=rs.uniform(size=(2, 6, 17, 33)) >= 0.25,
        q_segment_ids=np.sort(rs.randint(0, 2, size=(2, 17)), axis=1).astype(np.int32),
        kv_segment_ids=np.sort(rs.randint(0, 2, size=(2, 33)), axis=1).astype(np.int32))
    check(q, k, v, **kwargs)


def test_default_softmax_scale():
    _, q, k, v = make_qkv(4, 1, 5, 6, 2, 2, 59)
    a = jitted_ref(q, k, v)
    b = jitted_ref(q, k, v, softmax_scale=1.0 / math.sqrt(59))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_bf16_upcast_against_oracle():
    _, q, k, v = make_qkv(31, 2, 13, 9, 4, 2, 40)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out, lse = jitted_ref(q, k, v, causal=True)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    f64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v)]
    ref_out, ref_lse = oracle(*f64, causal=True)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref_out, atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, **F32_TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(17, 33), (13, 9)])
def test_upcast_false_close_to_upcast_true_bf16(causal, seqlen_q, seqlen_k):
    rs, q, k, v = make_qkv(seqlen_q + causal, 2, seqlen_q, seqlen_k, 4, 2, 64)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    slopes = rs.uniform(0.01, 0.2, size=(4,)).astype(np.float32)
    hi, lse_hi = jitted_ref(q, k, v, causal=causal, alibi_slopes=slopes)
    lo, lse_lo = jitted_ref(q, k, v, causal=causal, alibi_slopes=slopes, upcast=False)
    assert lo.dtype == jnp.bfloat16 and lse_lo.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lo, np.float32), np.asarray(hi, np.float32),
                               atol=4e-2, rtol=4e-2)
    np.testing.assert_array_equal(np.isinf(lse_lo), np.isinf(lse_hi))
    np.testing.assert_allclose(lse_lo, lse_hi, atol=5e-2, rtol=5e-2)
    assert not np.array_equal(np.asarray(lo, np.float32), np.asarray(hi, np.float32))


def test_upcast_false_f32_matches():
    _, q, k, v = make_qkv(32, 2, 7, 11, 2, 2, 16)
    check(q, k, v, causal=True, upcast=False, tol=dict(atol=1e-4, rtol=1e-4))


def test_jit_matches_eager():
    rs, q, k, v = make_qkv(41, 2, 13, 9, 4, 2, 40)
    slopes = rs.uniform(0.01, 0.5, size=(2, 4)).astype(np.float32)
    mask = rs.uniform(size=(2, 4, 13, 9)) > 0.2
    q_seg = np.sort(rs.randint(0, 2, size=(2, 13)), axis=1).astype(np.int32)
    kv_seg = np.sort(rs.randint(0, 2, size=(2, 9)), axis=1).astype(np.int32)

    def f(q, k, v, slopes, mask, q_seg, kv_seg):
        return attention_ref(q, k, v, causal=True, window_size=(5, -1), softcap=10.0,
                             alibi_slopes=slopes, dropout_p=0.2, dropout_mask=mask,
                             q_segment_ids=q_seg, kv_segment_ids=kv_seg)

    args = (q, k, v, slopes, mask, q_seg, kv_seg)
    eager, jitted = f(*args), jax.jit(f)(*args)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
    ref_out, ref_lse = oracle(q, k, v, causal=True, window_size=(5, -1), softcap=10.0,
                              alibi_slopes=slopes, dropout_p=0.2, dropout_mask=mask,
                              q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    np.testing.assert_allclose(jitted[0], ref_out, **F32_TOL)
    np.testing.assert_allclose(jitted[1], ref_lse, **F32_TOL)


# ----------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(causal=True), dict(window_size=(0, 0)), dict(window_size=(3, -1), causal=True),
    dict(causal=True, softcap=5.0, alibi_slopes=np.array([0.3, 0.7], np.float32))])
def test_grads_finite_with_empty_rows(kwargs):
    rs, q, k, v = make_qkv(51, 2, 12, 5, 2, 1, 8)
    ct = rand(rs, 2, 12, 2, 8)

    def loss(q, k, v):
        out, lse = attention_ref(q, k, v, **kwargs)
        return jnp.sum(out * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    _, lse = jitted_ref(q, k, v, **kwargs)
    empty = np.isinf(np.asarray(lse))  # (batch, nheads, seqlen_q)
    assert empty.any()
    dq = np.asarray(grads[0]).transpose(0, 2, 1, 3)  # (batch, nheads, seqlen_q, d)
    assert np.all(dq[empty] == 0)


@pytest.mark.parametrize("kwargs", [
    dict(), dict(causal=True),
    dict(window_size=(1, 0), softcap=3.0, alibi_slopes=np.array([0.2, 0.5], np.float32)),
    dict(dropout_p=0.3, dropout_mask=np.random.RandomState(0).uniform(size=(1, 2, 5, 4)) > 0.3)])
def test_grads_match_finite_differences_of_oracle(kwargs):
    """Gradient of sum(out * ct) + sum(finite lse) against central differences (float64)."""
    rs, q, k, v = make_qkv(61, 1, 5, 4, 2, 1, 3)
    ct = rand(rs, 1, 5, 2, 3).astype(np.float64)

    def oracle_loss(q, k, v):
        out, lse = oracle(q, k, v, **kwargs)
        return np.sum(out * ct) + np.sum(np.where(np.isfinite(lse), lse, 0.0))

    def loss(q, k, v):
        out, lse = attention_ref(q, k, v, **kwargs)
        return jnp.sum(out * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    args = [x.astype(np.float64) for x in (q, k, v)]
    eps = 1e-6
    for n, g in enumerate(grads):
        fd = np.zeros(args[n].shape)
        for idx in np.ndindex(*args[n].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[n][idx] += eps
            minus[n][idx] -= eps
            fd[idx] = (oracle_loss(*plus) - oracle_loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(g), fd, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------
# attention_varlen_ref
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal,window_size,alibi", [
    (False, (-1, -1), None), (True, (-1, -1), "batch_heads"), (False, (2, 1), "heads"),
    (True, (3, -1), None)])
def test_varlen(causal, window_size, alibi):
    rs = np.random.RandomState(71)
    seqlens_q = [5, 1, 13, 0, 4, 2]
    seqlens_k = [7, 9, 4, 3, 4, 0]
    cu_q = np.concatenate([[0], np.cumsum(seqlens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(seqlens_k)]).astype(np.int32)
    nb, h, hk, d = len(seqlens_q), 4, 2, 16
    q = rand(rs, cu_q[-1], h, d)
    k = rand(rs, cu_k[-1], hk, d)
    v = rand(rs, cu_k[-1], hk, d)
    slopes = None
    if alibi == "heads":
        slopes = rs.uniform(0.05, 0.5, size=(h,)).astype(np.float32)
    elif alibi == "batch_heads":
        slopes = rs.uniform(0.05, 0.5, size=(nb, h)).astype(np.float32)
    kw = dict(causal=causal, window_size=window_size)
    out, lse = jax.jit(lambda q, k, v, slopes: attention_varlen_ref(
        q, k, v, cu_q, cu_k, alibi_slopes=slopes, **kw))(q, k, v, slopes)
    assert out.shape == (cu_q[-1], h, d) and lse.shape == (h, cu_q[-1])
    for b in range(nb):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        sl = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b])
        if seqlens_q[b]:
            o_b, l_b = jitted_ref(q[None, qs], k[None, ks], v[None, ks], alibi_slopes=sl, **kw)
            np.testing.assert_allclose(out[qs], o_b[0], atol=1e-6, rtol=1e-6)
            np.testing.assert_allclose(lse[:, qs], l_b[0], atol=1e-6, rtol=1e-6)
            r_o, r_l = oracle(q[None, qs], k[None, ks], v[None, ks], alibi_slopes=sl, **kw)
            np.testing.assert_allclose(out[qs], r_o[0], **F32_TOL)
            np.testing.assert_allclose(lse[:, qs], r_l[0], **F32_TOL)
    # Sequence with no keys: zero output and +inf lse.
    assert np.all(np.asarray(out[cu_q[5]:cu_q[6]]) == 0)
    assert np.all(np.isposinf(np.asarray(lse[:, cu_q[5]:cu_q[6]])))


# ----------------------------------------------------------------------------
# kvcache_ref
# ----------------------------------------------------------------------------


def expected_cache(cache, new, cache_seqlens):
    cache = np.array(cache)
    if new is not None:
        for b, start in enumerate(cache_seqlens):
            cache[b, start:start + new.shape[1]] = new[b]
    return cache


def run_kvcache_case(seed, seqlen_q, seqlen_new, nheads, nheads_k, use_jit, **kwargs):
    rs = np.random.RandomState(seed)
    batch, seqlen_cache, d = 3, 24, 16
    q = rand(rs, batch, seqlen_q, nheads, d)
    k_cache = rand(rs, batch, seqlen_cache, nheads_k, d)
    v_cache = rand(rs, batch, seqlen_cache, nheads_k, d)
    cache_seqlens = np.array([5, 0, 24 - max(seqlen_new, 1) - 2], np.int32)
    k_new = v_new = None
    if seqlen_new:
        k_new = rand(rs, batch, seqlen_new, nheads_k, d)
        v_new = rand(rs, batch, seqlen_new, nheads_k, d)
    lengths = cache_seqlens + seqlen_new
    # Garbage beyond the valid length must never be read.
    for b, n in enumerate(lengths):
        v_cache[b, n:] = np.nan
        k_cache[b, n:] = np.inf

    def f(q, k_cache, v_cache, cache_seqlens, k_new, v_new):
        return kvcache_ref(q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new, **kwargs)

    fn = jax.jit(f) if use_jit else f
    out, lse, k_upd, v_upd = fn(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    exp_k = expected_cache(k_cache, k_new, cache_seqlens)
    exp_v = expected_cache(v_cache, v_new, cache_seqlens)
    np.testing.assert_array_equal(k_upd, exp_k)
    np.testing.assert_array_equal(v_upd, exp_v)
    ref_out, ref_lse = oracle(q, exp_k, exp_v, key_lengths=lengths, **kwargs)
    assert not np.any(np.isnan(np.asarray(out)))
    np.testing.assert_allclose(out, ref_out, **F32_TOL)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    np.testing.assert_allclose(lse, ref_lse, **F32_TOL)
    return lse


@pytest.mark.parametrize("seqlen_q,seqlen_new", [(1, 0), (1, 1), (4, 3), (3, 5)])
@pytest.mark.parametrize("kwargs", [
    dict(), dict(causal=True), dict(causal=True, window_size=(2, -1)),
    dict(alibi_slopes=np.array([0.1, 0.2, 0.4, 0.8], np.float32), softcap=20.0, causal=True)])
def test_kvcache(seqlen_q, seqlen_new, kwargs):
    # Under jit, so cache_seqlens is traced.
    run_kvcache_case(seqlen_q * 7 + seqlen_new, seqlen_q, seqlen_new, 4, 2, True, **kwargs)


@pytest.mark.parametrize("seqlen_q,seqlen_new", [(4, 0), (2, 3)])
def test_kvcache_eager(seqlen_q, seqlen_new):
    run_kvcache_case(5, seqlen_q, seqlen_new, 4, 2, False, causal=True, window_size=(3, 1))


def test_kvcache_empty_cache_rows_and_batch_alibi():
    slopes = np.random.RandomState(3).uniform(0.1, 0.5, size=(3, 2)).astype(np.float32)
    lse = run_kvcache_case(8, 4, 0, 2, 1, True, causal=True, alibi_slopes=slopes)
    lse = np.asarray(lse)
    assert np.all(np.isposinf(lse[1]))  # cache_seqlens[1] == 0 and nothing appended
    assert np.all(np.isfinite(lse[0, :, -1]))


def test_kvcache_full_length_equals_attention_ref():
    _, q, k, v = make_qkv(9, 2, 5, 12, 4, 2, 8)
    out, lse, _, _ = jax.jit(lambda q, k, v, n: kvcache_ref(q, k, v, n, causal=True))(
        q, k, v, np.array([12, 12], np.int32))
    out_r, lse_r = jitted_ref(q, k, v, causal=True)
    np.testing.assert_allclose(out, out_r, **F32_TOL)
    np.testing.assert_allclose(lse, lse_r, **F32_TOL)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


@pytest.fixture
def qkv():
    return make_qkv(0, 2, 5, 6, 4, 2, 8)[1:]


def test_error_dropout_without_mask(qkv):
    with pytest.raises(ValueError, match="dropout_mask.*dropout_p > 0"):
        attention_ref(*qkv, dropout_p=0.1)


@pytest.mark.parametrize("shape", [(3,), (2, 2), (4, 4), (2, 4, 1), ()])
def test_error_alibi_shape(qkv, shape):
    with pytest.raises(ValueError, match=r"alibi_slopes: expected shape \(4,\) or \(2, 4\)"):
        attention_ref(*qkv, alibi_slopes=np.ones(shape, np.float32))


def test_error_segment_ids(qkv):
    q_seg = np.zeros((2, 5), np.int32)
    kv_seg = np.zeros((2, 6), np.int32)
    with pytest.raises(ValueError, match="both or neither"):
        attention_ref(*qkv, q_segment_ids=q_seg)
    with pytest.raises(ValueError, match="both or neither"):
        attention_ref(*qkv, kv_segment_ids=kv_seg)
    with pytest.raises(ValueError, match=r"kv_segment_ids: expected shape \(2, 6\), got shape \(2, 5\)"):
        attention_ref(*qkv, q_segment_ids=q_seg, kv_segment_ids=q_seg)
    with pytest.raises(ValueError, match=r"q_segment_ids: expected shape \(2, 5\)"):
        attention_ref(*qkv, q_segment_ids=kv_seg, kv_segment_ids=kv_seg)


def test_error_misc(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="nheads_k dividing nheads=4"):
        attention_ref(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="k: expected headdim 8"):
        attention_ref(q, k[..., :4], v)
    with pytest.raises(ValueError, match="q: expected a 4-D array"):
        attention_ref(q[0], k, v)
    with pytest.raises(ValueError, match="dropout_p: expected a value in"):
        attention_ref(q, k, v, dropout_p=1.0, dropout_mask=np.ones((2, 4, 5, 6), bool))
    with pytest.raises(ValueError, match="dropout_mask: expected dtype bool"):
        attention_ref(q, k, v, dropout_p=0.5, dropout_mask=np.ones((2, 4, 5, 6), np.float32))
    with pytest.raises(ValueError, match=r"dropout_mask: expected shape \(2, 4, 5, 6\)"):
        attention_ref(q, k, v, dropout_p=0.5, dropout_mask=np.ones((2, 2, 5, 6), bool))
    with pytest.raises(ValueError, match="softcap"):
        attention_ref(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="window_size"):
        attention_ref(q, k, v, window_size=3)


def test_error_varlen_and_kvcache(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="cu_seqlens_q: expected non-decreasing prefix sums"):
        attention_varlen_ref(q[0], k[0], v[0], np.array([0, 3], np.int32), np.array([0, 6], np.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q: expected a concrete"):
        jax.jit(lambda cu: attention_varlen_ref(q[0], k[0], v[0], cu, np.array([0, 6])))(
            np.array([0, 5], np.int32))
    with pytest.raises(ValueError, match="k_new/v_new: expected both or neither"):
        kvcache_ref(q, k, v, np.array([1, 1], np.int32), k_new=k[:, :2])
    with pytest.raises(ValueError, match="cache_seqlens: expected cache_seqlens \\+ seqlen_new"):
        kvcache_ref(q, k, v, np.array([1, 5], np.int32), k_new=k[:, :2], v_new=v[:, :2])
    with pytest.raises(ValueError, match=r"cache_seqlens: expected an integer array of shape \(2,\)"):
        kvcache_ref(q, k, v, np.array([1], np.int32))
