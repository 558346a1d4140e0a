"""GPU: softcap, ALiBi, local windows and dropout in our kernels, forward and
backward, against jax_flash.reference with FlashAttention's rule (2x the
low-precision reference's error for outputs, 3x for gradients; +1e-4 absolute
with ALiBi)."""

import functools
import random
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import reference

from gpu_grid import (DTYPES, HEAD_DIMS, HEADS, SEQLENS, check_fa_rule, requires_gpu,
                      skip_if_not_compiled)

pytestmark = requires_gpu

WINDOWS = [(-1, -1), (16, 0), (64, 32), (5, -1), (-1, 3), (4096, 4096), (0, 0)]


def _sample_grid(n, seed=0):
    """A fixed random sample of dtypes x head dims x seqlens x heads x causal x
    window x softcap x ALiBi."""
    rnd = random.Random(seed)
    cases = []
    for _ in range(n):
        causal = rnd.random() < 0.4
        cases.append((
            rnd.choice(DTYPES), rnd.choice(HEAD_DIMS), rnd.choice(SEQLENS[:5]),
            rnd.choice(list(HEADS)), causal, (-1, -1) if causal else rnd.choice(WINDOWS),
            rnd.choice([0.0, 30.0]), rnd.random() < 0.5,
        ))
    return cases


def _case_id(case):
    dtype, d, (sq, sk), heads, causal, window, cap, alibi = case
    name = "fp16" if dtype == jnp.float16 else "bf16"
    return f"{name}-d{d}-{sq}x{sk}-{heads}-c{int(causal)}-w{window[0]}_{window[1]}-cap{cap:g}-a{int(alibi)}"


def _inputs(seed, batch, seqlen_q, seqlen_k, heads, head_dim, dtype):
    nheads, nheads_k = heads
    kq, kk, kv, kd, ka = jax.random.split(jax.random.key(seed), 5)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    q = normal(kq, (batch, seqlen_q, nheads, head_dim))
    k = normal(kk, (batch, seqlen_k, nheads_k, head_dim))
    v = normal(kv, (batch, seqlen_k, nheads_k, head_dim))
    d_out = normal(kd, (batch, seqlen_q, nheads, head_dim))
    slopes = jax.random.uniform(ka, (batch, nheads), jnp.float32, 0.01, 0.3)
    return q, k, v, d_out, slopes


@functools.partial(jax.jit, static_argnames=("kw",))
def _run(q, k, v, d_out, slopes, keep, kw):
    """(out, grads) of the kernel and of the fp32 / low-precision references."""
    kw = dict(kw)
    dropout_p = kw.pop("dropout_p", 0.0)
    key = kw.pop("key_seed", None)
    use_alibi = kw.pop("alibi", False)
    alibi = slopes if use_alibi else None

    def kernel(q, k, v):
        return jax_flash.flash_attn_func(
            q, k, v, dropout_p=dropout_p, alibi_slopes=alibi,
            dropout_key=None if key is None else jax.random.key(key), **kw)

    def ref(upcast):
        return lambda q, k, v: reference.attention_ref(
            q, k, v, alibi_slopes=alibi, dropout_p=dropout_p, dropout_mask=keep, upcast=upcast,
            **kw)[0]

    results = []
    for fn in (kernel, ref(True), ref(False)):
        out, pullback = jax.vjp(fn, q, k, v)
        results.append((out, pullback(d_out)))
    return results


@pytest.mark.parametrize("case", _sample_grid(160), ids=_case_id)
def test_modifiers_match_reference(case):
    dtype, head_dim, (sq, sk), heads, causal, window, softcap, alibi = case
    skip_if_not_compiled(head_dim)
    seed = zlib.crc32(_case_id(case).encode())
    q, k, v, d_out, slopes = _inputs(seed, 2, sq, sk, HEADS[heads], head_dim, dtype)
    kw = (("causal", causal), ("window_size", window), ("softcap", softcap), ("alibi", alibi))
    check_fa_rule(_run(q, k, v, d_out, slopes, None, kw), atol=1e-4 if alibi else 1e-5)


@pytest.mark.parametrize("softcap,alibi", [(0.0, False), (30.0, False), (0.0, True), (5.0, True)])
@pytest.mark.parametrize("window,seqlens", [((0, 0), (300, 100)), ((2, 1), (500, 40)),
                                            ((-1, 0), (257, 64))])
def test_empty_rows(window, seqlens, softcap, alibi):
    """Windows that leave rows with no key: output 0, LSE +inf, finite grads."""
    skip_if_not_compiled(64)
    q, k, v, d_out, slopes = _inputs(11, 2, *seqlens, HEADS["gqa"], 64, jnp.bfloat16)
    kw = (("causal", False), ("window_size", window), ("softcap", softcap), ("alibi", alibi))
    results = _run(q, k, v, d_out, slopes, None, kw)
    check_fa_rule(results, atol=1e-4)
    out, lse, _ = jax_flash.flash_attn_func(q, k, v, window_size=window, softcap=softcap,
                                            alibi_slopes=slopes if alibi else None,
                                            return_attn_probs=True)
    _, ref_lse = reference.attention_ref(q, k, v, window_size=window, softcap=softcap,
                                         alibi_slopes=slopes if alibi else None)
    empty = np.isposinf(np.asarray(ref_lse))
    assert empty.any()
    np.testing.assert_array_equal(np.isposinf(np.asarray(lse)), empty)
    rows = np.asarray(out, np.float32).transpose(0, 2, 1, 3)[empty]
    assert (rows == 0).all()


@pytest.mark.parametrize("softcap", [30.0, 50.0])
@pytest.mark.parametrize("causal,window,seqlens", [
    (False, (-1, -1), (300, 1100)), (True, (-1, -1), (113, 1203)), (False, (200, 0), (700, 650)),
    (False, (0, 0), (113, 203))])
def test_softcap_saturated_scores(softcap, causal, window, seqlens):
    """bf16 softcap alone uses a fixed softmax offset per row up to softcap 30
    (fwd/launch.h); 50 takes the running-max kernel. Scores far beyond the cap
    saturate tanh at both ends, so P spans exp(-2 * softcap) .. 1, and rows
    whose first K/V tiles are masked (causal with seqlen_q < seqlen_k, windows)
    find their offset late. Output, gradients and LSE against the reference."""
    skip_if_not_compiled(128)
    q, k, v, d_out, slopes = _inputs(23, 2, *seqlens, HEADS["gqa"], 128, jnp.bfloat16)
    q = (q.astype(jnp.float32) * 40).astype(jnp.bfloat16)
    kw = (("causal", causal), ("window_size", window), ("softcap", softcap), ("alibi", False))
    # atol: with one visible key (window (0, 0)) the references' dS is exactly
    # 0, the kernel's dP - D a float32 rounding residue, times the large q in dK.
    check_fa_rule(_run(q, k, v, d_out, slopes, None, kw), atol=1e-4)
    _, lse, _ = jax_flash.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                          softcap=softcap, return_attn_probs=True)
    ref_lse, lo_lse = (np.asarray(reference.attention_ref(
        q, k, v, causal=causal, window_size=window, softcap=softcap, upcast=up)[1])
        for up in (True, False))
    lse = np.asarray(lse)
    np.testing.assert_array_equal(np.isposinf(lse), np.isposinf(ref_lse))
    finite = np.isfinite(ref_lse)
    lse, ref_lse, lo_lse = lse[finite], ref_lse[finite], lo_lse[finite]
    err = np.abs(lse - ref_lse).max()
    assert err <= 2 * np.abs(lo_lse - ref_lse).max() + 1e-3, err


# ---- Dropout ------------------------------------------------------------------

DROPOUT_CASES = [
    # dtype, head_dim, seqlens, heads, causal, softcap, alibi, p
    (jnp.bfloat16, 64, (113, 203), "mha", False, 0.0, False, 0.17),
    (jnp.float16, 128, (257, 255), "gqa", True, 0.0, False, 0.3),
    (jnp.bfloat16, 128, (64, 128), "mqa", False, 30.0, True, 0.5),
    (jnp.float16, 32, (1, 147), "gqa", False, 0.0, True, 0.1),
    (jnp.bfloat16, 96, (200, 131), "mha", True, 30.0, False, 0.25),
    (jnp.bfloat16, 256, (129, 300), "gqa", False, 0.0, False, 0.2),
    (jnp.float16, 192, (77, 77), "mha", True, 0.0, True, 0.4),
    (jnp.bfloat16, 59, (100, 33), "mqa", False, 0.0, False, 0.6),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[str(i) for i in range(len(DROPOUT_CASES))])
def test_dropout_matches_reference_fed_the_kernels_mask(case):
    dtype, head_dim, (sq, sk), heads, causal, softcap, alibi, p = case
    skip_if_not_compiled(head_dim)
    q, k, v, d_out, slopes = _inputs(sq * 7 + sk, 2, sq, sk, HEADS[heads], head_dim, dtype)
    key = jax.random.key(sq + sk)
    alibi_arg = slopes if alibi else None
    out, lse, probs = jax_flash.flash_attn_func(
        q, k, v, dropout_p=p, causal=causal, softcap=softcap, alibi_slopes=alibi_arg,
        dropout_key=key, return_attn_probs=True)
    keep = np.asarray(probs) >= 0
    # The kernel's mask is the documented one, bit for bit.
    expected = np.asarray(reference.dropout_keep_mask(reference.dropout_rng(key, 2),
                                                      HEADS[heads][0], sq, sk, p))
    # (Entries the mask hides have probability 0 and carry no sign.)
    visible = np.asarray(probs) != 0
    assert visible.mean() > 0.3
    np.testing.assert_array_equal(keep[visible], expected[visible])
    frac = 1 - expected.mean()
    assert abs(frac - p) < 0.01 or expected.size < 20000, (frac, p)
    kw = (("causal", causal), ("softcap", softcap), ("alibi", alibi), ("dropout_p", p),
          ("key_seed", sq + sk))
    check_fa_rule(_run(q, k, v, d_out, slopes, jnp.asarray(expected), kw), atol=1e-4 if alibi else 1e-5)


def test_dropout_fraction_and_determinism():
    skip_if_not_compiled(128)
    q, k, v, d_out, _ = _inputs(3, 4, 512, 512, HEADS["gqa"], 128, jnp.bfloat16)
    p = 0.3
    f = jax.jit(lambda q, k, v, key: jax_flash.flash_attn_func(
        q, k, v, dropout_p=p, dropout_key=key, return_attn_probs=True))
    _, _, probs = f(q, k, v, jax.random.key(0))
    assert abs((np.asarray(probs) < 0).mean() - p) < 0.01
    grad = jax.jit(jax.grad(lambda q, k, v, key: jnp.sum(jax_flash.flash_attn_func(
        q, k, v, dropout_p=p, dropout_key=key, deterministic=True).astype(jnp.float32) * d_out),
        (0, 1, 2)))
    outs = [np.asarray(f(q, k, v, jax.random.key(0))[0], np.float32) for _ in range(3)]
    grads = [[np.asarray(g, np.float32) for g in grad(q, k, v, jax.random.key(0))]
             for _ in range(20)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    for g in grads[1:]:
        for a, b in zip(g, grads[0]):
            np.testing.assert_array_equal(a, b)
        assert all(np.isfinite(a).all() for a in g)
    other = np.asarray(f(q, k, v, jax.random.key(1))[0], np.float32)
    assert not (other == outs[0]).all()


def test_dropout_mean_over_64_keys_approaches_no_dropout():
    skip_if_not_compiled(64)
    q, k, v, _, _ = _inputs(5, 1, 256, 256, HEADS["mha"], 64, jnp.bfloat16)
    clean = np.asarray(jax_flash.flash_attn_func(q, k, v), np.float32)
    f = jax.jit(jax.vmap(lambda key: jax_flash.flash_attn_func(q, k, v, dropout_p=0.2,
                                                               dropout_key=key)))
    outs = np.asarray(f(jax.random.split(jax.random.key(4), 64)), np.float32)
    err_1 = np.abs(outs[0] - clean).mean()
    err_64 = np.abs(outs.mean(0) - clean).mean()
    assert err_64 < err_1 / 5, (err_1, err_64)
