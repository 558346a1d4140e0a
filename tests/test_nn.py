"""jax_flash.attention against jax.nn.dot_product_attention (the contract).

Values and q/k/v gradients of ours (bf16) are checked with the
FlashAttention rule: |ours - ref32| <= 2 x |jax.nn bf16 - ref32| + 1e-3
(gradients: 3x), where ref32 is jax.nn (xla) on the same inputs in float32.
"""

import itertools
import re
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import nn as jf_nn

on_gpu = jax.default_backend() == "gpu"
_seed = itertools.count()


@pytest.fixture(autouse=True)
def _seed_from_test_name(request):
    """Fresh inputs per test, the same on every run of that test (however
    xdist distributes the tests): a failure can be rerun."""
    global _seed
    _seed = itertools.count(zlib.crc32(request.node.nodeid.encode()) % 2**20 * 1000)


def _rand(shape, dtype=jnp.bfloat16):
    key = jax.random.PRNGKey(next(_seed))
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _qkv(B, T, S, N, K, H, batched=True):
    shapes = [(B, T, N, H), (B, S, K, H), (B, S, K, H)]
    if not batched:
        shapes = [s[1:] for s in shapes]
    return [_rand(s) for s in shapes]


def _f32(xs):
    return [x.astype(jnp.float32) for x in xs]


def _check_close(ours, low, ref, factor, floor=1e-3, what="out"):
    ours, low, ref = (np.asarray(x, np.float32) for x in (ours, low, ref))
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = np.max(np.abs(ours - ref)) if ours.size else 0.0
    base = np.max(np.abs(low - ref)) if ours.size else 0.0
    assert err <= factor * base + floor, f"{what}: err {err} vs jax.nn bf16 {base}"


def _compare(q, k, v, grads=True, **kw):
    """ours (bf16) vs jax.nn xla in bf16 and float32, values and gradients;
    one jit for all three (one compile per test)."""
    do = _rand(q.shape, jnp.float32)
    xs = (q, k, v)
    cases = [(jax_flash.attention, None, xs),
             (jax.nn.dot_product_attention, "xla", xs),
             (jax.nn.dot_product_attention, "xla", tuple(_f32(xs)))]

    def one(fn, impl, args):
        def loss(*a):
            out = fn(*a, implementation=impl, **kw)
            return jnp.sum(out.astype(jnp.float32) * do), out
        if grads:
            (_, out), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*args)
            return out, g
        return loss(*args)[1], None

    @jax.jit
    def everything(cases_args):
        return [one(fn, impl, args) for (fn, impl, _), args in zip(cases, cases_args)]

    (o, g), (ol, gl), (orf, gr) = everything([c[2] for c in cases])
    assert o.dtype == q.dtype and o.shape == q.shape
    _check_close(o, ol, orf, 2.0)
    if grads:
        for name, a, b, c in zip("qkv", g, gl, gr):
            _check_close(a, b, c, 3.0, floor=3e-3, what=f"d{name}")


SHAPES = [  # B, T, S, N, K, H
    (2, 8, 8, 2, 2, 16),
    (2, 5, 11, 4, 2, 16),   # T < S, GQA
    (2, 11, 5, 4, 1, 32),   # T > S, MQA
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_basic(shape, is_causal):
    B, T, S, N, K, H = shape
    _compare(*_qkv(*shape), is_causal=is_causal)


@pytest.mark.parametrize("is_causal", [False, True])
def test_unbatched_tnh(is_causal):
    q, k, v = _qkv(1, 6, 9, 4, 2, 16, batched=False)
    assert q.ndim == 3
    _compare(q, k, v, is_causal=is_causal, scale=0.3)


@pytest.mark.parametrize("window,is_causal", [
    (1, False), (3, True), ((2, 0), False), ((0, 2), False), ((4, 1), True),
    ((-1, 3), False), ((3, -1), False)])
@pytest.mark.parametrize("TS", [(5, 10), (10, 5)])
def test_local_window(window, TS, is_causal):
    T, S = TS
    q, k, v = _qkv(2, T, S, 2, 1, 16)
    _compare(q, k, v, local_window_size=window, is_causal=is_causal)


@pytest.mark.parametrize("TS", [(5, 10), (10, 5)])
@pytest.mark.parametrize("opts,which", [
    ({}, "both"), ({"is_causal": True}, "q"), ({"is_causal": True}, "kv"),
    ({"local_window_size": (2, 1)}, "both"), ({"local_window_size": 2, "is_causal": True}, "kv"),
    ({"local_window_size": (3, 0)}, "both")])
def test_seq_lengths(TS, opts, which):
    T, S = TS
    q, k, v = _qkv(3, T, S, 4, 2, 16)
    ql = jnp.array([T, 0, max(T - 3, 1)], jnp.int32)
    kl = jnp.array([S, max(S - 4, 1), 0], jnp.int32)
    kw = dict(opts)
    if which in ("q", "both"):
        kw["query_seq_lengths"] = ql
    if which in ("kv", "both"):
        kw["key_value_seq_lengths"] = kl
    _compare(q, k, v, **kw)


def test_jit_and_scale():
    q, k, v = _qkv(2, 9, 9, 2, 2, 16)
    kl = jnp.array([9, 4], jnp.int32)
    fn = jax.jit(lambda q, k, v, kl: jax_flash.attention(
        q, k, v, is_causal=True, key_value_seq_lengths=kl, scale=0.5))
    ref = jax.nn.dot_product_attention(*_f32((q, k, v)), is_causal=True,
                                       key_value_seq_lengths=kl, scale=0.5)
    low = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       key_value_seq_lengths=kl, scale=0.5)
    _check_close(fn(q, k, v, kl), low, ref, 2.0)


@pytest.mark.parametrize("kw", [
    {}, {"is_causal": True},
    {"query_seq_lengths": jnp.array([3, 0], jnp.int32),
     "key_value_seq_lengths": jnp.array([5, 2], jnp.int32), "is_causal": True},
    {"local_window_size": (1, 1), "key_value_seq_lengths": jnp.array([0, 2], jnp.int32)}])
def test_return_residual(kw):
    batched = bool(kw)  # the no-option case runs unbatched (TNH)
    q, k, v = _qkv(2, 6, 8, 4, 2, 16, batched=batched)
    out, res = jax_flash.attention(q, k, v, return_residual=True, **kw)
    out_l, res_l = jax.nn.dot_product_attention(q, k, v, return_residual=True,
                                                implementation="xla", **kw)
    out_r, res_r = jax.nn.dot_product_attention(*_f32((q, k, v)), return_residual=True,
                                                implementation="xla", **kw)
    assert res.shape == res_l.shape == q.shape[:-1] and res.dtype == res_l.dtype
    dead = np.asarray(res_r) < -1e30
    np.testing.assert_array_equal(np.asarray(res, np.float32)[dead],
                                  np.asarray(res_l, np.float32)[dead])
    live = ~dead
    _check_close(np.asarray(res, np.float32)[live], np.asarray(res_l, np.float32)[live],
                 np.asarray(res_r)[live], 2.0, floor=2e-2, what="residual")
    _check_close(out, out_l, out_r, 2.0)


@pytest.mark.parametrize("which", ["bias", "mask"])
def test_bias_mask_fall_back_with_warning(which):
    q, k, v = _qkv(2, 6, 7, 2, 2, 16)
    extra = {"bias": _rand((1, 2, 6, 7)),
             "mask": jax.random.bernoulli(jax.random.PRNGKey(3), 0.7, (2, 1, 6, 7))}[which]
    jf_nn._WARNED.clear()
    with pytest.warns(UserWarning, match="XLA|xla"):
        out = jax_flash.attention(q, k, v, **{which: extra})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = jax_flash.attention(q, k, v, **{which: extra})  # warned once only
    ref = jax.nn.dot_product_attention(q, k, v, **{which: extra}, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    np.testing.assert_array_equal(np.asarray(out2, np.float32), np.asarray(ref, np.float32))
    with pytest.raises(ValueError, match=which):
        jax_flash.attention(q, k, v, **{which: extra}, implementation="cuda")


def test_float32_goes_to_xla_silently():
    q, k, v = _f32(_qkv(2, 6, 7, 2, 1, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = jax_flash.attention(q, k, v, is_causal=True)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    with pytest.raises(ValueError, match="float32"):
        jax_flash.attention(q, k, v, implementation="cuda")


@pytest.mark.skipif(on_gpu, reason="CPU behaviour")
def test_cuda_raises_on_cpu():
    with pytest.raises(ValueError, match="GPU"):
        jax_flash.attention(*_qkv(1, 4, 4, 2, 2, 16), implementation="cuda")


def test_xla_passes_through():
    q, k, v = _qkv(2, 6, 7, 2, 1, 16)
    kw = dict(is_causal=True, key_value_seq_lengths=jnp.array([3, 7], jnp.int32))
    np.testing.assert_array_equal(
        np.asarray(jax_flash.attention(q, k, v, implementation="xla", **kw), np.float32),
        np.asarray(jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw),
                   np.float32))
    with pytest.raises(ValueError, match="logits_soft_cap"):
        jax_flash.attention(q, k, v, implementation="xla", logits_soft_cap=5.0)


@pytest.mark.skipif(not on_gpu, reason="cuDNN needs a GPU")
def test_cudnn_passes_through():
    q, k, v = _qkv(2, 128, 128, 2, 2, 64)
    out = jax_flash.attention(q, k, v, implementation="cudnn", is_causal=True)
    ref = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_ours_extras_match_flash_attn_func():
    q, k, v = _qkv(2, 8, 8, 2, 2, 16)
    kv_ids = jnp.array([[0] * 3 + [1] * 5, [0] * 8], jnp.int32)
    out = jax_flash.attention(q, k, v, is_causal=True, logits_soft_cap=4.0,
                              segment_ids=(kv_ids, kv_ids))
    ref = jax_flash.flash_attn_func(q, k, v, causal=True, softcap=4.0,
                                    segment_ids=(kv_ids, kv_ids))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=1e-2)
    key = jax.random.PRNGKey(0)
    out = jax_flash.attention(q, k, v, dropout_rate=0.3, dropout_rng=key)
    ref = jax_flash.flash_attn_func(q, k, v, dropout_p=0.3, dropout_key=key)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=1e-2)


@pytest.mark.parametrize("args,kw,exc,match", [
    ((2, 6, 7, 2, 2, 16), {"implementation": "triton"}, ValueError, "implementation"),
    ((2, 6, 7, 3, 2, 16), {}, ValueError, "multiple"),
    ((2, 6, 7, 2, 2, 16), {"query_seq_lengths": jnp.array([1, 2])
                           .astype(jnp.int16)}, ValueError, "query_seq_lengths"),
    ((2, 6, 7, 2, 2, 16), {"key_value_seq_lengths": jnp.array([1, 2, 3], jnp.int32)},
     ValueError, "key_value_seq_lengths"),
    ((2, 6, 7, 2, 2, 16), {"mask": jnp.ones((1, 1, 6, 7), jnp.int32)}, ValueError, "mask"),
    ((2, 6, 7, 2, 2, 16), {"bias": jnp.ones((6, 7, 1, 1, 1))}, ValueError, "bias"),
    ((2, 6, 7, 2, 2, 16), {"local_window_size": "wide"}, TypeError, "local_window_size"),
    # Options checked by jax_flash's shared validation, named as here.
    ((2, 6, 7, 2, 2, 16), {"dropout_rate": 0.2}, ValueError,
     r"^dropout_rng: expected a JAX PRNG key .* \(dropout_rate=0.2\)"),
    ((2, 6, 7, 2, 2, 16), {"dropout_rate": "0.5"}, TypeError, r"^dropout_rate\b"),
    ((2, 6, 7, 2, 2, 16), {"logits_soft_cap": -1.0}, ValueError, r"^logits_soft_cap must be"),
    ((2, 6, 7, 2, 2, 16), {"scale": -1.0}, ValueError, r"^scale must be a finite number > 0"),
    ((2, 6, 7, 2, 2, 16), {"scale": 1e39}, ValueError, r"^scale must be .* float32"),
])
def test_errors(args, kw, exc, match):
    q, k, v = _qkv(*args)
    with pytest.raises(exc, match=match) as err:
        jax_flash.attention(q, k, v, **kw)
    for internal in ("softmax_scale", "softcap", "dropout_p", "dropout_key"):
        assert not re.search(rf"\b{internal}\b", str(err.value)), str(err.value)


def test_shape_and_dtype_errors():
    q, k, v = _qkv(2, 6, 7, 2, 2, 16)
    with pytest.raises(ValueError, match="value"):
        jax_flash.attention(q, k, v[..., :8])
    with pytest.raises(ValueError, match="query"):
        jax_flash.attention(q.astype(jnp.float16), k, v)
    with pytest.raises(ValueError, match="query"):
        jax_flash.attention(q[..., :8], k, v)
    with pytest.raises(ValueError, match="ndim"):
        jax_flash.attention(q[0, 0], k, v)
