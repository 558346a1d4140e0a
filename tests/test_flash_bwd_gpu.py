"""Backward kernels vs `jax.grad` of `jax_flash.reference`, FlashAttention's
rule: each gradient's max error against the fp32 reference within 3x the
error of the same reference computed in the input dtype (+1e-5). GPU only."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import reference
from jax_flash._src import extension, plan

from gpu_grid import DTYPES, HEAD_DIMS, HEADS, SEQLENS, requires_gpu, skip_if_not_compiled

pytestmark = requires_gpu


def _inputs(seed, batch, seqlen_q, seqlen_k, heads, head_dim, dtype, scales=(1.0, 1.0)):
    nheads, nheads_k = heads
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    normal = lambda key, shape, s: (s * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    q = normal(kq, (batch, seqlen_q, nheads, head_dim), scales[0])
    k = normal(kk, (batch, seqlen_k, nheads_k, head_dim), scales[1])
    v = normal(kv, (batch, seqlen_k, nheads_k, head_dim), scales[1])
    d_out = normal(kd, (batch, seqlen_q, nheads, head_dim), 1.0)
    return q, k, v, d_out


def _vjp(fn, q, k, v, d_out):
    _, pullback = jax.vjp(fn, q, k, v)
    return pullback(d_out)


@functools.partial(jax.jit, static_argnames=("causal", "window_size", "deterministic"))
def _grads_and_refs(q, k, v, d_out, causal, window_size=(-1, -1), deterministic=False):
    kw = dict(causal=causal, window_size=window_size)
    kernel = _vjp(
        lambda q, k, v: jax_flash.flash_attn_func(q, k, v, deterministic=deterministic, **kw),
        q, k, v, d_out,
    )
    ref32 = _vjp(lambda q, k, v: reference.attention_ref(q, k, v, upcast=True, **kw)[0],
                 q, k, v, d_out)
    ref_low = _vjp(lambda q, k, v: reference.attention_ref(q, k, v, upcast=False, **kw)[0],
                   q, k, v, d_out)
    return kernel, ref32, ref_low


def _check(kernel, ref32, ref_low, factor=3.0, atol=1e-5):
    for name, g, r, lo in zip(("dq", "dk", "dv"), kernel, ref32, ref_low):
        g, r, lo = (np.asarray(x, np.float32) for x in (g, r, lo))
        assert g.shape == r.shape, (name, g.shape, r.shape)
        assert np.isfinite(g).all(), f"{name} has NaN/inf"
        kernel_err, low_err = np.abs(g - r).max(), np.abs(lo - r).max()
        assert kernel_err <= factor * low_err + atol, (name, kernel_err, low_err)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
@pytest.mark.parametrize("seqlens", SEQLENS, ids=[f"{a}x{b}" for a, b in SEQLENS])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_backward_matches_reference(dtype, head_dim, seqlens, heads, causal):
    skip_if_not_compiled(head_dim)
    seed = zlib.crc32(repr(("bwd", str(dtype), head_dim, seqlens, heads, causal)).encode())
    q, k, v, d_out = _inputs(seed, 2, *seqlens, HEADS[heads], head_dim, dtype)
    _check(*_grads_and_refs(q, k, v, d_out, causal))


@pytest.mark.parametrize(
    "window_size,seqlens",
    [((16, 0), (300, 300)), ((64, 32), (129, 257)), ((5, -1), (200, 100)), ((-1, 3), (64, 500))],
)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_local_window(window_size, seqlens, head_dim):
    skip_if_not_compiled(head_dim)
    q, k, v, d_out = _inputs(17, 2, *seqlens, HEADS["gqa"], head_dim, jnp.bfloat16)
    _check(*_grads_and_refs(q, k, v, d_out, False, window_size))


@pytest.mark.parametrize("seqlen", [1, 2, 5, 17, 128])
@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_backward_large_inputs_stay_finite(seqlen, head_dim):
    # q x5, k/v x3: large scores, where an unstable softmax would overflow.
    skip_if_not_compiled(head_dim)
    q, k, v, d_out = _inputs(seqlen, 2, seqlen, seqlen, HEADS["gqa"], head_dim, jnp.float16,
                             scales=(5.0, 3.0))
    _check(*_grads_and_refs(q, k, v, d_out, True), factor=5.0, atol=1e-3)


@pytest.mark.parametrize(
    "batch,seqlens,heads,head_dim,causal",
    [
        # Causal: accumulator slices (csrc/sm80/bwd_kernel.h).
        (2, (1000, 1100), HEADS["gqa"], 128, True),  # many slices per head
        (2, (300, 257), HEADS["mqa"], 256, True),  # 64-key tiles
        (70, (130, 190), (2, 2), 64, True),  # batch * nheads_k >= SMs: one slice
        # No window: K/V tiles add into dQ in order, one accumulator.
        (2, (1000, 1100), HEADS["gqa"], 128, False),
        (2, (300, 257), HEADS["mqa"], 256, False),
        (1, (200, 33000), (2, 2), 64, False),  # a head's tiles span several waves
    ],
)
def test_deterministic_backward_bit_identical(batch, seqlens, heads, head_dim, causal):
    skip_if_not_compiled(head_dim)
    # Each case runs the mode its comment says (test_api's plan test has the rule).
    if not extension.has_kernels():
        pytest.skip("needs the compiled extension (_C.plan)")
    ordered = plan.plan_for(batch, seqlens[0], seqlens[1], heads[0], heads[1], head_dim, -1,
                            causal, False, False, False, False, True,
                            extension.num_sms()).dq_ordered
    assert ordered == (not causal)
    q, k, v, d_out = _inputs(23, batch, *seqlens, heads, head_dim, jnp.bfloat16)
    f = jax.jit(lambda q, k, v, d: _vjp(
        lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=causal, deterministic=True),
        q, k, v, d))
    first = [np.asarray(g) for g in f(q, k, v, d_out)]
    for _ in range(20):
        for g, g0 in zip(f(q, k, v, d_out), first):
            np.testing.assert_array_equal(np.asarray(g), g0)
    # ... and the same function as the atomics path, to rounding.
    _check(*_grads_and_refs(q, k, v, d_out, causal, deterministic=True))


def test_forward_bit_identical_50_runs():
    q, k, v, _ = _inputs(29, 2, 777, 800, HEADS["mha"], 64, jnp.float16)
    f = jax.jit(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True))
    first = np.asarray(f(q, k, v))
    for _ in range(50):
        np.testing.assert_array_equal(np.asarray(f(q, k, v)), first)


@pytest.mark.parametrize("causal", [True, False], ids=["slices", "ordered"])
def test_composes_with_vmap_jit_remat(causal):
    q, k, v, d_out = _inputs(31, 4, 130, 150, HEADS["gqa"], 64, jnp.bfloat16)
    # deterministic=True: the dQ sum order is fixed, so remat must agree bit for bit.
    attn = lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=causal, deterministic=True)
    loss = lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * d_out.astype(jnp.float32))
    plain = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(remat, plain):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    # vmap of grad over a split batch == grad of the whole batch.
    split = lambda x: x.reshape(2, 2, *x.shape[1:])
    per_half = lambda q, k, v, d: jax.grad(
        lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * d.astype(jnp.float32)),
        argnums=(0, 1, 2))(q, k, v)
    vmapped = jax.vmap(per_half)(split(q), split(k), split(v), split(d_out))
    for g, r in zip(vmapped, plain):
        np.testing.assert_allclose(np.asarray(g, np.float32).reshape(r.shape),
                                   np.asarray(r, np.float32), atol=2e-2, rtol=2e-2)
    # grad of vmap.
    vloss = lambda q, k, v: jnp.sum(jax.vmap(attn)(split(q), split(k), split(v)).astype(
        jnp.float32) * split(d_out).astype(jnp.float32))
    for g, r in zip(jax.grad(vloss, argnums=(0, 1, 2))(q, k, v), plain):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   atol=2e-2, rtol=2e-2)


def test_packed_variants_match_unpacked():
    q, k, v, d_out = _inputs(37, 2, 100, 100, HEADS["mha"], 64, jnp.bfloat16)
    w = d_out.astype(jnp.float32)
    loss = lambda o: jnp.sum(o.astype(jnp.float32) * w)
    kw = dict(causal=True, deterministic=True)  # bit-comparable dQ
    ref = jax.grad(lambda q, k, v: loss(jax_flash.flash_attn_func(q, k, v, **kw)),
                   argnums=(0, 1, 2))(q, k, v)
    qkv = jnp.stack([q, k, v], axis=2)
    d_qkv = jax.grad(lambda x: loss(jax_flash.flash_attn_qkvpacked_func(x, **kw)))(qkv)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(d_qkv[:, :, i]), np.asarray(ref[i]))
    # The kernels read qkv in place and write d_qkv in the packed layout:
    # the compiled gradient has no concatenate/slice around the custom calls.
    hlo = jax.jit(jax.grad(lambda x: loss(jax_flash.flash_attn_qkvpacked_func(x, **kw)))).lower(
        qkv).compile().as_text()
    assert "jax_flash_bwd_qkvpacked" in hlo and "jax_flash_fwd_qkvpacked" in hlo
    assert "concatenate" not in hlo and " slice(" not in hlo, hlo
    kv = jnp.stack([k, v], axis=2)
    dq, dkv = jax.grad(lambda q, kv: loss(jax_flash.flash_attn_kvpacked_func(q, kv, **kw)),
                       argnums=(0, 1))(q, kv)
    np.testing.assert_array_equal(np.asarray(dq), np.asarray(ref[0]))
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(dkv[:, :, i]), np.asarray(ref[1 + i]))
