"""Forward kernel vs `jax_flash.reference`, FlashAttention's error rule.

The kernel's max error against an fp32 reference must be within 2x the error
of the same reference computed in the input dtype (+1e-5). Runs only where
JAX's default backend is a GPU.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import reference

from gpu_grid import DTYPES, HEAD_DIMS, HEADS, SEQLENS, requires_gpu, skip_if_not_compiled

pytestmark = requires_gpu


def _inputs(seed, batch, seqlen_q, seqlen_k, heads, head_dim, dtype):
    nheads, nheads_k = heads
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (batch, seqlen_q, nheads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, seqlen_k, nheads_k, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, seqlen_k, nheads_k, head_dim), jnp.float32).astype(dtype)
    return q, k, v


@functools.partial(jax.jit, static_argnames=("causal", "window_size"))
def _kernel_and_refs(q, k, v, causal, window_size=(-1, -1)):
    out, lse, _ = jax_flash.flash_attn_func(
        q, k, v, causal=causal, window_size=window_size, return_attn_probs=True
    )
    kw = dict(causal=causal, window_size=window_size)
    ref32, lse32 = reference.attention_ref(q, k, v, upcast=True, **kw)
    ref_low, _ = reference.attention_ref(q, k, v, upcast=False, **kw)
    return out, lse, ref32, lse32, ref_low


def _check(out, lse, ref32, lse32, ref_low):
    out, ref32, ref_low = (np.asarray(x, np.float32) for x in (out, ref32, ref_low))
    assert np.isfinite(out).all(), "kernel output has NaN/inf"
    kernel_err = np.abs(out - ref32).max()
    low_err = np.abs(ref_low - ref32).max()
    assert kernel_err <= 2 * low_err + 1e-5, (kernel_err, low_err)
    lse, lse32 = np.asarray(lse), np.asarray(lse32)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse32))
    finite = np.isfinite(lse32)
    np.testing.assert_allclose(lse[finite], lse32[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
@pytest.mark.parametrize("seqlens", SEQLENS, ids=[f"{a}x{b}" for a, b in SEQLENS])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_forward_matches_reference(dtype, head_dim, seqlens, heads, causal):
    skip_if_not_compiled(head_dim)
    seqlen_q, seqlen_k = seqlens
    seed = zlib.crc32(repr((str(dtype), head_dim, seqlens, heads, causal)).encode())
    q, k, v = _inputs(seed, 2, seqlen_q, seqlen_k, HEADS[heads], head_dim, dtype)
    _check(*_kernel_and_refs(q, k, v, causal))


@pytest.mark.parametrize(
    "window_size,seqlens",
    [((16, 0), (300, 300)), ((64, 32), (129, 257)), ((0, 0), (77, 77)), ((5, -1), (200, 100)),
     ((-1, 3), (64, 500))],
)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_forward_local_window(window_size, seqlens, head_dim):
    skip_if_not_compiled(head_dim)
    q, k, v = _inputs(7, 2, *seqlens, HEADS["gqa"], head_dim, jnp.bfloat16)
    _check(*_kernel_and_refs(q, k, v, False, window_size))


def test_rows_without_keys_are_zero_with_inf_lse():
    # causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k queries see
    # no key at all.
    q, k, v = _inputs(3, 1, 300, 100, HEADS["mha"], 64, jnp.bfloat16)
    out, lse, _ = jax_flash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    assert (out[:, :200] == 0).all()
    assert np.isposinf(lse[:, :, :200]).all()
    assert np.isfinite(lse[:, :, 200:]).all()


def test_repeated_runs_bit_identical():
    q, k, v = _inputs(11, 2, 1023, 1024, HEADS["gqa"], 128, jnp.bfloat16)
    f = jax.jit(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True))
    first = np.asarray(f(q, k, v))
    for _ in range(10):
        np.testing.assert_array_equal(np.asarray(f(q, k, v)), first)


def test_vmap_folds_into_batch():
    q, k, v = _inputs(5, 6, 129, 200, HEADS["gqa"], 64, jnp.float16)
    q, k, v = (x.reshape(2, 3, *x.shape[1:]) for x in (q, k, v))
    batched = jax.vmap(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True))(q, k, v)
    looped = jnp.stack([jax_flash.flash_attn_func(q[i], k[i], v[i], causal=True) for i in range(2)])
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(looped))
    # vmap over q only: k and v are broadcast.
    one_kv = jax.vmap(lambda q: jax_flash.flash_attn_func(q, k[0], v[0]))(q)
    np.testing.assert_array_equal(
        np.asarray(one_kv[1]), np.asarray(jax_flash.flash_attn_func(q[1], k[0], v[0]))
    )
    # The lowered computation holds one kernel call, not a loop of them.
    hlo = jax.jit(jax.vmap(jax_flash.flash_attn_func)).lower(q, k, v).as_text()
    assert hlo.count("jax_flash_fwd") == 1


def test_grad_close_to_reference_grad():
    q, k, v = _inputs(2, 1, 65, 80, HEADS["gqa"], 64, jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(jax_flash.flash_attn_func(q, k, v, causal=True).astype(jnp.float32))
    ref_loss = lambda q, k, v: jnp.sum(reference.attention_ref(q, k, v, causal=True)[0].astype(jnp.float32))
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(r, np.float32), atol=2e-2, rtol=1e-2
        )


def test_extension_reports_compiled_head_dims():
    dims = jax_flash.compiled_head_dims()
    assert jax_flash.has_kernels() and len(dims) > 0
    assert all(d % 32 == 0 and d <= 256 for d in dims)
