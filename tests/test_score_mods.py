"""Score modifiers (softcap, ALiBi, dropout) on any backend: the reference's
definitions against independent formulas, the dropout RNG against Philox's
published answers, and the semantics of dropout keys through the public API
(CPU: the reference path; GPU: the kernels)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import reference


def _qkv(b=2, sq=19, sk=23, h=4, hk=2, d=32, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (b, sq, h, d), jnp.float32).astype(dtype),
        jax.random.normal(kk, (b, sk, hk, d), jnp.float32).astype(dtype),
        jax.random.normal(kv, (b, sk, hk, d), jnp.float32).astype(dtype),
    )


def _naive(q, k, v, bias_fn, keep=None, p=0.0):
    """Softmax attention with an explicit per-(b, h, i, j) score function, loops
    over heads so that nothing is shared with the reference's vectorised code."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = np.zeros(q.shape)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            s = q[bi, :, hi] @ k[bi, :, kh].T / math.sqrt(d)
            i, j = np.meshgrid(np.arange(sq), np.arange(sk), indexing="ij")
            s = bias_fn(s, bi, hi, i, j)
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            if keep is not None:
                w = np.where(np.asarray(keep)[bi, hi], w, 0.0) / (1 - p)
            out[bi, :, hi] = w @ v[bi, :, kh]
    return out


def test_softcap_matches_formula():
    q, k, v = _qkv()
    q = q * 4  # large scores, so that the cap matters
    cap = 2.0
    out, _ = reference.attention_ref(q, k, v, softcap=cap)
    expected = _naive(q, k, v, lambda s, *_: cap * np.tanh(s / cap))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)
    plain, _ = reference.attention_ref(q, k, v)
    assert np.abs(np.asarray(plain) - expected).max() > 1e-2  # the cap changed something


@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi_matches_formula(per_batch):
    q, k, v = _qkv(sq=19, sk=23)
    slopes = jnp.asarray(np.random.default_rng(0).uniform(0.05, 1.0, (2, 4) if per_batch else (4,)),
                         jnp.float32)
    out, _ = reference.attention_ref(q, k, v, alibi_slopes=slopes)
    s2 = np.broadcast_to(np.asarray(slopes), (2, 4))
    expected = _naive(q, k, v, lambda s, bi, hi, i, j: s - s2[bi, hi] * np.abs(i + 23 - 19 - j))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


def test_philox_known_answers():
    # Random123's published test vectors for Philox-4x32-10.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        got = tuple(int(w) for w in reference.philox4x32_10(counter, key))
        assert got == expected, [hex(g) for g in got]


def test_dropout_mask_layout_matches_definition():
    """Spot-check dropout_keep_mask against its docstring, entry by entry."""
    rng = reference.dropout_rng(jax.random.key(7), 2)
    p = 0.37
    keep = np.asarray(reference.dropout_keep_mask(rng, 3, 37, 41, p))
    r = np.asarray(rng)
    threshold = reference.dropout_threshold(p)
    for b, h, i, j in [(0, 0, 0, 0), (1, 2, 36, 40), (0, 1, 17, 9), (1, 0, 8, 15), (0, 2, 31, 16)]:
        lane = (i % 8) * 4 + (j % 8) // 2
        words = reference.philox4x32_10((j // 16, (i // 16) * 32 + lane, h, r[b, 2]),
                                        (r[b, 0], r[b, 1]))
        slot = ((i % 16) // 8) * 4 + ((j % 16) // 8) * 2 + j % 2
        number = (int(words[slot // 2]) >> (16 * (slot % 2))) & 0xFFFF
        assert keep[b, h, i, j] == (number >= threshold), (b, h, i, j)


def test_dropout_mask_statistics():
    rng = reference.dropout_rng(jax.random.key(1), 4)
    for p in (0.1, 0.5, 0.9):
        keep = np.asarray(reference.dropout_keep_mask(rng, 8, 128, 128, p))
        assert abs((1 - keep.mean()) - p) < 0.01
    keep = np.asarray(reference.dropout_keep_mask(rng, 8, 128, 128, 0.5))
    # Independent across batch elements, heads, rows and columns.
    for a, b in [(keep[0], keep[1]), (keep[:, 0], keep[:, 1]), (keep[..., 0, :], keep[..., 1, :]),
                 (keep[..., 0], keep[..., 1])]:
        agree = (a == b).mean()
        assert 0.45 < agree < 0.55, agree


def _drop(q, k, v, key, p=0.3, **kw):
    return jax_flash.flash_attn_func(q, k, v, dropout_p=p, dropout_key=key, **kw)


def test_dropout_same_key_same_output_different_key_different():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    a = _drop(q, k, v, jax.random.key(0))
    b = _drop(q, k, v, jax.random.key(0))
    c = _drop(q, k, v, jax.random.key(1))
    assert (np.asarray(a, np.float32) == np.asarray(b, np.float32)).all()
    assert not (np.asarray(a, np.float32) == np.asarray(c, np.float32)).all()
    # Raw uint32 keys work too.
    d = _drop(q, k, v, jax.random.PRNGKey(0))
    assert np.isfinite(np.asarray(d, np.float32)).all()


def test_dropout_probs_mark_dropped_entries():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    p = 0.25
    key = jax.random.key(5)
    out, lse, probs = _drop(q, k, v, key, p=p, return_attn_probs=True)
    probs = np.asarray(probs)
    keep = np.asarray(reference.dropout_keep_mask(reference.dropout_rng(key, 2), 4, 19, 23, p))
    np.testing.assert_array_equal(probs >= 0, keep | (probs == 0))
    ref, _ = reference.attention_ref(q, k, v, dropout_p=p, dropout_mask=probs >= 0)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=3e-2, rtol=2e-2)


def test_dropout_mean_over_keys_approaches_no_dropout():
    q, k, v = _qkv(b=1, sq=32, sk=32, h=2, hk=2)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    clean = np.asarray(jax_flash.flash_attn_func(q, k, v), np.float32)
    f = jax.jit(jax.vmap(lambda key: _drop(q, k, v, key, p=0.2)))
    outs = np.asarray(f(jax.random.split(jax.random.key(2), 64)), np.float32)
    err_1 = np.abs(outs[0] - clean).mean()
    err_64 = np.abs(outs.mean(0) - clean).mean()
    assert err_64 < err_1 / 4, (err_1, err_64)  # ~1/sqrt(64) in expectation


def test_dropout_under_vmap():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    keys = jax.random.split(jax.random.key(3), 3)
    qs, ks, vs = (jnp.stack([x] * 3) for x in (q, k, v))

    def run(q, k, v, key):
        out, _, probs = _drop(q, k, v, key, return_attn_probs=True)
        return out, probs >= 0  # the kept mask (a dropped entry is negative)

    # Per-example keys: each example as if alone with its key, masks independent.
    out, keep = jax.vmap(run)(qs, ks, vs, keys)
    for i in range(3):
        out_i, keep_i = run(q, k, v, keys[i])
        np.testing.assert_array_equal(np.asarray(keep[i]), np.asarray(keep_i))
        np.testing.assert_allclose(np.asarray(out[i], np.float32), np.asarray(out_i, np.float32),
                                   atol=1e-2, rtol=1e-2)
    assert not (np.asarray(keep[0]) == np.asarray(keep[1])).all()
    # One unbatched key: every example gets the mask it would get alone.
    _, shared = jax.vmap(lambda q, k, v: run(q, k, v, keys[0]))(qs, ks, vs)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(shared[i]), np.asarray(keep[0]))


def test_dropout_grads_finite_and_match_reference_with_the_mask():
    q, k, v = _qkv(dtype=jnp.bfloat16, sq=17, sk=17)
    p, key = 0.3, jax.random.key(9)
    keep = reference.dropout_keep_mask(reference.dropout_rng(key, 2), 4, 17, 17, p)
    loss = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2),
                               (0, 1, 2))
    grads = loss(lambda q, k, v: _drop(q, k, v, key, p=p, causal=True))(q, k, v)
    refs = loss(lambda q, k, v: reference.attention_ref(
        q, k, v, causal=True, dropout_p=p, dropout_mask=keep)[0])(q, k, v)
    for g, r in zip(grads, refs):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, r, atol=8e-2, rtol=5e-2)


@pytest.mark.parametrize("kw", [dict(softcap=5.0), dict(alibi=True), dict(softcap=5.0, alibi=True)])
def test_softcap_alibi_through_public_api(kw):
    q, k, v = _qkv(dtype=jnp.bfloat16)
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32) if kw.get("alibi") else None
    cap = kw.get("softcap", 0.0)
    out = jax_flash.flash_attn_func(q * 3, k, v, causal=True, softcap=cap, alibi_slopes=slopes)
    ref, _ = reference.attention_ref(q * 3, k, v, causal=True, softcap=cap, alibi_slopes=slopes)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=3e-2, rtol=2e-2)
