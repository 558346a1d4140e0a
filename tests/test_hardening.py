"""Hardening of the public API: exact segment ids of any integer dtype,
constant ALiBi slopes, static options refused when traced or mistyped,
float32 / int32 ranges, CPU varlen memory that follows the real lengths,
unpad_input's total, and grid sizes past 65535 (these last run on GPUs too:
the regression tests of the kernels' grid limits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import reference
from jax_flash._src import spec as spec_lib
from jax_flash._src.segments import dense_ranks, segment_tables


def _qkv(b=2, sq=9, sk=11, h=2, hk=2, d=16, dtype=jnp.float16, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key, shape in (
        (kq, (b, sq, h, d)), (kk, (b, sk, hk, d)), (kv, (b, sk, hk, d))))


def _close(a, b, atol=2e-2):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=atol, rtol=1e-2)


# ---- 1. Segment ids are compared exactly, whatever their dtype ----------------------


def _two_documents_sharing_low_bits():
    """Ids 1 and 1 + 2**32: equal after a cast to int32."""
    ids = np.array([[1] * 5 + [1 + 2**32] * 4], np.int64)
    return ids


def test_int64_segment_ids_that_differ_above_bit_31_stay_apart():
    q, k, v = _qkv(b=1, sq=9, sk=9)
    expected = jnp.concatenate([jax_flash.flash_attn_func(q[:, :5], k[:, :5], v[:, :5]),
                                jax_flash.flash_attn_func(q[:, 5:], k[:, 5:], v[:, 5:])], axis=1)
    ids = _two_documents_sharing_low_bits()
    # numpy int64 ids: exact even with JAX in 32-bit mode.
    out = jax_flash.flash_attn_func(q, k, v, segment_ids=(ids, ids))
    _close(out, expected, atol=1e-3)
    with jax.enable_x64(True):
        ids64 = jnp.asarray(ids)
        assert ids64.dtype == jnp.int64
        out = jax_flash.flash_attn_func(q, k, v, segment_ids=(ids64, ids64))
        _close(out, expected, atol=1e-3)
        out = jax.jit(lambda q, k, v, i: jax_flash.flash_attn_func(
            q, k, v, segment_ids=(i, i), causal=True))(q, k, v, ids64)
        expected_causal = jnp.concatenate([
            jax_flash.flash_attn_func(q[:, :5], k[:, :5], v[:, :5], causal=True),
            jax_flash.flash_attn_func(q[:, 5:], k[:, 5:], v[:, 5:], causal=True)], axis=1)
        _close(out, expected_causal, atol=1e-3)


def test_dense_ranks_keep_equality_and_make_the_same_tables():
    rng = np.random.RandomState(0)
    q_ids = rng.choice([3, -7, 2**40, 2**40 + 3, 11], (3, 13)).astype(np.int64)
    kv_ids = rng.choice([3, -7, 2**40, 2**40 + 3, 12], (3, 17)).astype(np.int64)
    with jax.enable_x64(True):
        for ids in ((q_ids, kv_ids), (jnp.asarray(q_ids), jnp.asarray(kv_ids))):
            rq, rk = (np.asarray(r) for r in dense_ranks(*ids))
            assert rq.dtype == np.int32 and rk.dtype == np.int32
            both, ranks = np.concatenate([q_ids, kv_ids], 1), np.concatenate([rq, rk], 1)
            np.testing.assert_array_equal(both[:, :, None] == both[:, None, :],
                                          ranks[:, :, None] == ranks[:, None, :])
            np.testing.assert_array_equal(both[:, :, None] < both[:, None, :],
                                          ranks[:, :, None] < ranks[:, None, :])
        # Small ids: the tables from the ids and from their ranks agree but
        # for the id column itself (which keeps the same equalities).
        small_q, small_k = (np.searchsorted(np.unique(np.r_[q_ids.ravel(), kv_ids.ravel()]), x)
                            .astype(np.int32) * 5 + 1 for x in (q_ids, kv_ids))
        for window in ((-1, -1), (2, 0)):
            from_ids = segment_tables(jnp.asarray(small_q), jnp.asarray(small_k), *window)
            from_ranks = segment_tables(*dense_ranks(jnp.asarray(q_ids), jnp.asarray(kv_ids)),
                                        *window)
            for a, b in zip(from_ids, from_ranks):
                a, b = np.asarray(a), np.asarray(b)
                np.testing.assert_array_equal(a[..., [0, 1, 3]], b[..., [0, 1, 3]])
                np.testing.assert_array_equal(a[..., 2, None] == a[..., None, 2],
                                              b[..., 2, None] == b[..., None, 2])


def test_kernel_tables_of_int64_ids_separate_the_documents():
    """The CUDA path's tables (built on any backend): row intervals of
    document 1 hold none of document 1 + 2**32's keys."""
    with jax.enable_x64(True):
        ids = jnp.asarray(_two_documents_sharing_low_bits())
        seg_q, _ = (np.asarray(t) for t in segment_tables(*dense_ranks(ids, ids), -1, -1))
    np.testing.assert_array_equal(seg_q[0, :5, :2], [[0, 4]] * 5)
    np.testing.assert_array_equal(seg_q[0, 5:, :2], [[5, 8]] * 4)


# ---- 2. ALiBi slopes are constants -------------------------------------------------------


def test_alibi_slopes_gradient_is_zero():
    q, k, v = _qkv()
    slopes = jnp.float32([0.25, 0.5])

    def loss(s):
        return jnp.sum(jax_flash.flash_attn_func(q, k, v, alibi_slopes=s).astype(jnp.float32))

    assert not np.asarray(jax.grad(loss)(slopes)).any()
    qv, kv_, vv = (x.reshape(-1, *x.shape[2:]) for x in (q[:1], k[:1], v[:1]))
    cu_q, cu_k = jnp.int32([0, 9]), jnp.int32([0, 11])
    g = jax.grad(lambda s: jnp.sum(jax_flash.flash_attn_varlen_func(
        qv, kv_, vv, cu_q, cu_k, 9, 11, alibi_slopes=s).astype(jnp.float32)))(slopes)
    assert not np.asarray(g).any()
    # ... while the slopes still change the output.
    assert not np.allclose(np.float32(jax_flash.flash_attn_func(q, k, v, alibi_slopes=slopes)),
                           np.float32(jax_flash.flash_attn_func(q, k, v)))


# ---- 3. Static options: no tracers, no strings, float32 ranges ----------------------------


@pytest.mark.parametrize("name,value,kind", [
    ("causal", True, "bool"), ("softmax_scale", 0.5, "float"), ("softcap", 5.0, "float"),
    ("dropout_p", 0.1, "float"), ("deterministic", True, "bool"),
    ("return_attn_probs", True, "bool"),
])
def test_traced_static_option_is_a_type_error(name, value, kind):
    q, k, v = _qkv()
    f = jax.jit(lambda x: jax_flash.flash_attn_func(q, k, v, dropout_key=jax.random.key(0),
                                                    **{name: x}))
    with pytest.raises(TypeError, match=rf"{name} must be a static Python {kind}, not a traced"):
        f(value)


def test_traced_window_and_max_seqlen_are_type_errors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="window_size must be a static Python int, not a traced"):
        jax.jit(lambda w: jax_flash.flash_attn_func(q, k, v, window_size=(w, 0)))(3)
    cu = jnp.int32([0, 9])
    with pytest.raises(TypeError, match="max_seqlen_k must be a static Python int, not a traced"):
        jax.jit(lambda m: jax_flash.flash_attn_varlen_func(q[0], k[0, :9], v[0, :9], cu, cu,
                                                           9, m))(9)


@pytest.mark.parametrize("kwargs,match", [
    (dict(causal="False"), "causal must be a Python bool, got 'False'"),
    (dict(causal=1), "causal must be a Python bool, got 1"),
    (dict(window_size=(1.9, 0)), r"window_size must be a pair of ints \(left, right\), got \(1.9, 0\)"),
    (dict(window_size=(True, 0)), r"window_size must be a pair of ints"),
    (dict(dropout_p="0.5"), r"dropout_p must be a float in \[0, 1\), got '0.5'"),
    (dict(deterministic="yes"), "deterministic must be a Python bool, got 'yes'"),
    (dict(softmax_scale="1"), "softmax_scale must be a float > 0 or None, got '1'"),
    (dict(softmax_scale=True), "softmax_scale must be a float > 0 or None, got True"),
    (dict(softcap=False), "softcap must be a float >= 0, got False"),
])
def test_mistyped_static_options_are_type_errors(kwargs, match):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=match):
        jax_flash.flash_attn_func(q, k, v, **kwargs)


def test_numpy_scalars_are_accepted():
    q, k, v = _qkv()
    out = jax_flash.flash_attn_func(q, k, v, causal=np.bool_(True), softmax_scale=np.float32(0.3),
                                    window_size=(np.int64(3), np.int32(-1)), softcap=np.float64(4),
                                    deterministic=np.bool_(False))
    ref = reference.attention_ref(q, k, v, causal=True, softmax_scale=0.3, window_size=(3, -1),
                                  softcap=4.0)[0]
    _close(out, ref)


@pytest.mark.parametrize("kwargs,match", [
    (dict(softmax_scale=1e39), "softmax_scale must be a finite number > 0 in float32"),
    (dict(softmax_scale=1e-46), "softmax_scale must be a finite number > 0 in float32"),
    (dict(softcap=1e-46), r"softcap must be 0 or a float32 > 0"),
    (dict(softcap=1e39), r"softcap must be 0 or a float32 > 0"),
    (dict(softcap=1e-38, softmax_scale=1e3), "softmax_scale / softcap finite in float32"),
    (dict(dropout_p=1 - 1e-9, dropout_key=jax.random.key(0)), r"dropout_p must be in \[0, 1\) in float32"),
])
def test_float32_ranges(kwargs, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        jax_flash.flash_attn_func(q, k, v, **kwargs)


# ---- 4. int32 ranges: windows that never bind, max_seqlen ---------------------------------


def test_window_entries_that_never_bind_are_unbounded():
    q, k, v = _qkv(sq=9, sk=11)
    spec, _ = spec_lib.bind((q, k, v), layout="fixed", packing="", dropout_p=0.0,
                            softmax_scale=None, causal=False, window_size=(20, 2**40),
                            softcap=0.0, alibi_slopes=None, deterministic=False,
                            return_attn_probs=False, dropout_key=None)
    assert spec.window == (-1, -1) and not spec.local
    spec_kept = spec_lib.bind((q, k, v), layout="fixed", packing="", dropout_p=0.0,
                              softmax_scale=None, causal=True, window_size=(19, 2**40),
                              softcap=0.0, alibi_slopes=None, deterministic=False,
                              return_attn_probs=False, dropout_key=None)[0]
    assert spec_kept.window == (19, 0)
    out = jax_flash.flash_attn_func(q, k, v, window_size=(2**31, 2**63))
    _close(out, jax_flash.flash_attn_func(q, k, v), atol=0)
    # Varlen: the bound is max_seqlen_q + max_seqlen_k.
    cu_q, cu_k = jnp.int32([0, 4, 9]), jnp.int32([0, 5, 11])
    out = jax_flash.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 5, 6,
                                           window_size=(2**35, 0))
    ref = jax_flash.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 5, 6, causal=True)
    _close(out, ref, atol=0)


def test_max_seqlen_at_or_above_2_31_is_a_value_error():
    q, k, v = _qkv()
    cu = jnp.int32([0, 9])
    with pytest.raises(ValueError, match=r"max_seqlen_q must be < 2\*\*31 .*got 2147483648"):
        jax_flash.flash_attn_varlen_func(q[0], k[0, :9], v[0, :9], cu, cu, 2**31, 9)


# ---- 5. CPU varlen memory follows the real lengths -----------------------------------------


def test_varlen_with_a_loose_max_seqlen_runs_on_real_lengths():
    lens = [5, 3, 4]  # 12 tokens, max_seqlen 65536: padding to it would take GiBs
    cu = jnp.int32(np.r_[0, np.cumsum(lens)])
    q, k, v = (x[0, :12] for x in _qkv(b=1, sq=12, sk=12, dtype=jnp.bfloat16))
    f = jax.jit(lambda q, k, v: jax_flash.flash_attn_varlen_func(
        q, k, v, cu, cu, 65536, 65536, causal=True))
    ref = reference.attention_varlen_ref(q, k, v, cu, cu, causal=True)[0]
    _close(f(q, k, v), ref)
    g = jax.grad(lambda q: jnp.sum(f(q, k, v).astype(jnp.float32)))(q)
    assert np.isfinite(np.float32(g)).all()
    # Dropout draws the same mask as with a tight bound.
    drop = lambda m: jax_flash.flash_attn_varlen_func(q, k, v, cu, cu, m, m, dropout_p=0.3,
                                                      dropout_key=jax.random.key(1))
    _close(drop(65536), drop(5), atol=0)


# ---- 6. unpad_input's total ------------------------------------------------------------


def test_unpad_input_total_below_the_valid_tokens_is_a_value_error():
    x = jnp.ones((2, 4, 3))
    mask = jnp.asarray([[1, 1, 0, 1], [1, 0, 0, 1]], bool)
    with pytest.raises(ValueError, match=r"total must be >= the number of valid tokens \(5\), got 4"):
        jax_flash.unpad_input(x, mask, total=4)
    assert jax_flash.unpad_input(x, mask, total=7)[0].shape == (7, 3)


# ---- 7. Grids past 65535 (no skip: on a GPU these test the kernels' grid fix) ----------


def test_fixed_batch_above_65535():
    q, k, v = _qkv(b=70000, sq=5, sk=5, h=1, hk=1, d=8, dtype=jnp.bfloat16)
    out = jax.jit(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True))(q, k, v)
    assert out.shape == q.shape
    for sl in (slice(0, 3), slice(65534, 65538), slice(69997, 70000)):
        _close(out[sl], reference.attention_ref(q[sl], k[sl], v[sl], causal=True)[0])


def test_varlen_sequences_above_65535():
    n, length = 70000, 3
    q, k, v = (x[0] for x in _qkv(b=1, sq=n * length, sk=n * length, h=1, hk=1, d=8,
                                  dtype=jnp.bfloat16))
    cu = jnp.arange(n + 1, dtype=jnp.int32) * length
    out = jax.jit(lambda q, k, v: jax_flash.flash_attn_varlen_func(
        q, k, v, cu, cu, length, length, causal=True))(q, k, v)
    assert out.shape == q.shape
    for b in (0, 65535, 65536, n - 1):
        rows = slice(b * length, (b + 1) * length)
        ref = reference.attention_ref(q[None, rows], k[None, rows], v[None, rows], causal=True)[0]
        _close(out[rows], ref[0])


def test_heads_above_65535():
    # Grid y holds heads: 70000 query heads over 2 K/V heads (GQA), then MHA;
    # heads on both sides of 65535 checked one by one against the reference.
    edge = (0, 1, 65534, 65535, 65536, 65537, 69999)
    for hk, seed in ((2, 0), (70000, 1)):
        q, k, v = _qkv(b=1, sq=3, sk=4, h=70000, hk=hk, d=8, dtype=jnp.bfloat16, seed=seed)
        out = jax.jit(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True))(q, k, v)
        assert out.shape == q.shape
        group = 70000 // hk
        for h in edge:
            kv = slice(h // group, h // group + 1)
            ref = reference.attention_ref(q[:, :, h:h + 1], k[:, :, kv], v[:, :, kv],
                                          causal=True)[0]
            _close(out[:, :, h:h + 1], ref)
