"""jax_flash.flax on CPU: MultiHeadAttention against a plain-jnp
re-implementation with the same parameters (values and parameter gradients,
FlashAttention's rule: |ours - plain fp32| <= 2 x |plain bf16 - plain fp32| +
eps, plus an absolute bound), decoding against one full forward, the varlen
prefill (decode=True with lengths) against each sequence decoded alone, attention_fn
inside Flax's own modules against their default attention, FlashSelf/Cross
Attention against jax_flash.reference, and every error message."""

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import linen, nnx  # noqa: E402

from jax_flash import flax as jf_flax  # noqa: E402
from jax_flash import nn as jf_nn  # noqa: E402
from jax_flash import reference  # noqa: E402
from jax_flash._src import flax_modules  # noqa: E402

B, F = 2, 40  # batch, in_features
_HIGHEST = jax.lax.Precision.HIGHEST


def _rand(seed, shape, dtype=jnp.float32):
    """Fresh normal values (numpy: no per-shape compile)."""
    return jnp.asarray(np.random.RandomState(seed).standard_normal(shape), dtype)


def _check(ours, low, ref, factor=2.0, floor=2e-3, atol=None, what="out"):
    """FlashAttention's rule, and optionally an absolute bound."""
    ours, low, ref = (np.asarray(x, np.float32) for x in (ours, low, ref))
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert np.all(np.isfinite(ours)), what
    err, base = np.max(np.abs(ours - ref)), np.max(np.abs(low - ref))
    assert err <= factor * base + floor, f"{what}: err {err} vs plain low precision {base}"
    if atol is not None:
        assert err <= atol, f"{what}: err {err} > {atol}"


# ----------------------------------------------------------------------------
# The plain re-implementation: einsums and a softmax, every mask explicit.
# ----------------------------------------------------------------------------


def _rope_complex(x, pos, theta):
    """GPT-NeoX rotary as a complex rotation of (x[:d/2] + i x[d/2:])."""
    half = x.shape[-1] // 2
    freq = theta ** (-2.0 * np.arange(half) / x.shape[-1])
    angle = pos.astype(jnp.float32)[:, :, None, None] * jnp.asarray(freq, jnp.float32)
    z = (x[..., :half].astype(jnp.float32) + 1j * x[..., half:].astype(jnp.float32))
    z = z * jnp.exp(1j * angle)
    return jnp.concatenate([z.real, z.imag], -1).astype(x.dtype)


def plain_mha(p, x, *, H, K, causal=False, window=None, cap=None, theta=None, seg=None,
              pad=None, positions=None, keep=None, rate=0.0, dtype=jnp.float32):
    """The module's computation with params p (nnx.to_pure_dict), all in dtype
    (float32: the oracle; bfloat16: the low-precision reference)."""
    c = lambda a: jnp.asarray(a).astype(dtype)  # noqa: E731
    prec = _HIGHEST if dtype == jnp.float32 else None
    y = jnp.einsum("bsf,fnd->bsnd", c(x), c(p["qkv"]["kernel"]), precision=prec)
    if "bias" in p["qkv"]:
        y = y + c(p["qkv"]["bias"])
    q, k, v = y[:, :, :H], y[:, :, H:H + K], y[:, :, H + K:]
    S, D = x.shape[1], q.shape[-1]
    if theta is not None:
        pos = jnp.broadcast_to(jnp.arange(S), (x.shape[0], S)) if positions is None else positions
        q, k = _rope_complex(q, pos, theta), _rope_complex(k, pos, theta)
    k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=prec).astype(jnp.float32) / np.sqrt(D)
    if cap is not None:
        s = cap * jnp.tanh(s / cap)
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    ok = jnp.ones((x.shape[0], 1, S, S), bool)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= j >= i - window
    if seg is not None:
        ok &= (seg[:, :, None] == seg[:, None, :])[:, None]
    if pad is not None:
        ok &= pad[:, None, None, :]
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    e = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0)), 0)
    prob = (e / jnp.maximum(jnp.sum(e, -1, keepdims=True), 1e-30)).astype(dtype)
    if rate:
        prob = jnp.where(keep, prob / (1 - rate), 0).astype(dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", prob, v, precision=prec).astype(dtype)
    out = jnp.einsum("bshd,hdo->bso", o, c(p["out"]["kernel"]), precision=prec)
    if "bias" in p["out"]:
        out = out + c(p["out"]["bias"])
    if pad is not None:
        out = jnp.where(pad[..., None], out, 0)
    return out


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


_CALLS = {}


def _call(model, x, *, rngs=None, decode=False, deterministic=None, **arrays):
    """model(x, ...) under nnx.jit: one compile per structure, not one per
    eager op (which dominates the run time on CPU)."""
    key = (decode, deterministic)
    if key not in _CALLS:
        _CALLS[key] = nnx.jit(lambda m, x, r, a: m(x, rngs=r, decode=decode,
                                                    deterministic=deterministic, **a))
    return _CALLS[key](model, x, rngs, arrays)


def _plain_pair(model, x, **kw):
    """plain_mha in float32 and in the module's dtype, one jit."""
    p, kw = _params(model), {**_plain_kw(model), **kw}
    return jax.jit(lambda p, x: (plain_mha(p, x, **kw),
                                 plain_mha(p, x, dtype=model.dtype, **kw)))(p, x)


def _model(H=4, K=None, D=32, seed=0, **kw):
    m = nnx.jit(lambda: jf_flax.MultiHeadAttention(  # one compile for the initializers
        H, F, num_kv_heads=K, head_dim=D, rngs=nnx.Rngs(seed), **kw))()
    if kw.get("use_bias", True):  # nonzero biases, so that they are checked too
        for lin in (m.qkv, m.out):
            lin.bias[...] = _rand(seed + 7, lin.bias.shape) * 0.1
    return m


MHA, GQA, MQA = (4, 4), (4, 2), (4, 1)
# A covering grid (each head layout with and without every option), not the
# full product: every case is a compile of its own on CPU.
CASES = [
    (MHA, dict()), (GQA, dict()), (MQA, dict()),
    (MHA, dict(causal=True)), (MQA, dict(causal=True, sliding_window=3)),
    (GQA, dict(logits_soft_cap=0.8)), (MHA, dict(rope_theta=10000.0)),
    (MQA, dict(rope_theta=10000.0, causal=True)),
    (GQA, dict(rope_theta=500.0, causal=True, sliding_window=4, logits_soft_cap=2.0)),
    (MQA, dict(causal=True, dtype=jnp.float16)),
]


def _plain_kw(model):
    return dict(H=model.num_heads, K=model.num_kv_heads, causal=model.causal,
                window=model.sliding_window, cap=model.logits_soft_cap, theta=model.rope_theta)


@pytest.mark.parametrize("heads,opts", CASES)
def test_mha_matches_plain(heads, opts):
    H, K = heads
    model = _model(H, K, **opts)
    x = _rand(1, (B, 13, F))
    out = _call(model, x)
    assert out.shape == (B, 13, F) and out.dtype == opts.get("dtype", jnp.bfloat16)
    ref, low = _plain_pair(model, x)
    _check(out, low, ref, atol=5e-2)


@pytest.mark.parametrize("heads,extra", [(MHA, "segments"), (GQA, "padding"), (MHA, "both"),
                                         (MQA, "both")])
def test_mha_segments_and_padding(heads, extra):
    H, K = heads
    S = 17
    model = _model(H, K, D=64, causal=extra != "segments", rope_theta=10000.0, use_bias=False)
    x = _rand(2, (B, S, F))
    seg = pad = None
    if extra in ("segments", "both"):
        seg = jnp.asarray([[0] * 5 + [1] * 8 + [2] * 4, [3] * 11 + [7] * 6], jnp.int32)
    if extra in ("padding", "both"):
        pad = jnp.asarray([[True] * 14 + [False] * 3, [False] * 4 + [True] * 13])
    out = _call(model, x, segment_ids=seg, padding_mask=pad)
    ref, low = _plain_pair(model, x, seg=seg, pad=pad)
    _check(out, low, ref, atol=5e-2)
    if pad is not None:
        assert np.all(np.asarray(out, np.float32)[~np.asarray(pad)] == 0)


def test_mha_positions_argument():
    model = _model(4, 2, rope_theta=100.0, causal=True)
    x = _rand(3, (B, 9, F))
    pos = jnp.asarray([np.arange(9) + 5, np.arange(9) * 2], jnp.int32)
    out = _call(model, x, positions=pos)
    ref, low = _plain_pair(model, x, positions=pos)
    _check(out, low, ref, atol=5e-2)
    default = _call(model, x)
    assert np.max(np.abs(np.asarray(out, np.float32) - np.asarray(default, np.float32))) > 1e-2


@pytest.mark.parametrize("heads,opts", [
    (MHA, dict(causal=True, rope_theta=10000.0)),
    (GQA, dict(logits_soft_cap=1.0, causal=True, sliding_window=2)),
    (MQA, dict(rope_theta=100.0))])
def test_mha_param_gradients(heads, opts):
    H, K = heads
    model = _model(H, K, **opts)
    x, do = _rand(4, (B, 11, F)), _rand(5, (B, 11, F))
    pad = jnp.asarray([[True] * 11, [True] * 8 + [False] * 3])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_module(params):
        out = nnx.merge(graphdef, params, rest)(x, padding_mask=pad)
        return jnp.sum(out.astype(jnp.float32) * do)

    def loss_plain(p, dtype):
        out = plain_mha(p, x, pad=pad, dtype=dtype, **_plain_kw(model))
        return jnp.sum(out.astype(jnp.float32) * do)

    grads = nnx.to_pure_dict(jax.jit(jax.grad(loss_module))(params))
    p = _params(model)
    ref, low = jax.jit(lambda p: (jax.grad(loss_plain)(p, jnp.float32),
                                  jax.grad(loss_plain)(p, jnp.bfloat16)))(p)
    for path in (("qkv", "kernel"), ("qkv", "bias"), ("out", "kernel"), ("out", "bias")):
        g, gl, gr = (t[path[0]][path[1]] for t in (grads, low, ref))
        assert g.dtype == jnp.float32
        scale = float(np.max(np.abs(np.asarray(gr)))) + 1.0
        _check(g, gl, gr, factor=3.0, floor=1e-2 * scale, what="d" + ".".join(path))


# ---- Dropout --------------------------------------------------------------------------


def test_mha_dropout_is_the_kernels_mask():
    rate, S = 0.25, 13
    model = _model(4, 4, dropout_rate=rate, causal=True)
    x = _rand(6, (B, S, F))
    out = _call(model, x, rngs=nnx.Rngs(dropout=11))
    key = nnx.Rngs(dropout=11).dropout()  # the key the call drew
    keep = jax.jit(lambda k: reference.dropout_keep_mask(
        reference.dropout_rng(k, B), 4, S, S, rate))(key)
    assert 0 < np.mean(np.asarray(keep)) < 1
    ref, low = _plain_pair(model, x, keep=keep, rate=rate)
    _check(out, low, ref, atol=8e-2)


def test_mha_dropout_determinism():
    model = _model(4, 2, dropout_rate=0.3)
    plain = _model(4, 2)  # same seed: same parameters, no dropout
    x = _rand(7, (B, 9, F))
    run = lambda m, **kw: np.asarray(_call(m, x, **kw), np.float32)  # noqa: E731
    a, b = run(model, rngs=nnx.Rngs(dropout=1)), run(model, rngs=nnx.Rngs(dropout=1))
    c = run(model, rngs=nnx.Rngs(dropout=2))
    no_drop = run(plain)
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(a - c)) > 1e-2 and np.max(np.abs(a - no_drop)) > 1e-2
    # The constructor's stream advances between calls.
    assert np.max(np.abs(run(model) - run(model))) > 0
    np.testing.assert_array_equal(run(model, deterministic=True), no_drop)
    model.eval()
    np.testing.assert_array_equal(run(model), no_drop)
    model.train()
    assert not model.deterministic
    np.testing.assert_array_equal(run(nnx.view(model, deterministic=True)), no_drop)


# ---- Decoding -------------------------------------------------------------------------


@pytest.mark.parametrize("heads,page_size", [(MHA, None), (GQA, 4), (MQA, 3)])
def test_decode_equals_full_forward(heads, page_size):
    H, K = heads
    model = _model(H, K, causal=True, rope_theta=10000.0, logits_soft_cap=3.0)
    x = _rand(8, (B, 10, F))
    full = np.asarray(_call(model, x), np.float32)
    model.init_cache(B, 12, page_size=page_size)
    pieces = [_call(model, x[:, a:b], decode=True)
              for a, b in ((0, 5), (5, 6), (6, 9), (9, 10))]
    np.testing.assert_array_equal(np.asarray(model.cache_seqlens[...]), [10, 10])
    steps = np.concatenate([np.asarray(o, np.float32) for o in pieces], axis=1)
    np.testing.assert_allclose(steps, full, atol=2e-2, rtol=2e-2)
    kw = _plain_kw(model)
    ref = jax.jit(lambda p, x: plain_mha(p, x, **kw))(_params(model), x)
    np.testing.assert_allclose(steps, np.asarray(ref), atol=5e-2, rtol=5e-2)
    if page_size is not None:
        table = np.asarray(model.block_table[...])
        assert table.shape == (B, -(-12 // page_size))
        assert sorted(table.ravel().tolist()) == list(range(table.size))


def test_decode_sliding_window():
    model = _model(4, 2, causal=True, sliding_window=3, rope_theta=1000.0)
    x = _rand(9, (B, 8, F))
    full = np.asarray(_call(model, x), np.float32)
    model.init_cache(B, 8)
    pieces = [_call(model, x[:, :4], decode=True)]
    pieces += [_call(model, x[:, i:i + 1], decode=True) for i in range(4, 8)]
    steps = np.concatenate([np.asarray(o, np.float32) for o in pieces], axis=1)
    np.testing.assert_allclose(steps, full, atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(np.asarray(model.cache_seqlens[...]), [8, 8])


def test_decode_overflow_is_clamped():
    model = _model(4, 2, causal=True, rope_theta=10000.0)
    x1, x2 = _rand(10, (B, 3, F)), _rand(11, (B, 3, F))
    model.init_cache(B, 4)
    _call(model, x1, decode=True)
    out = _call(model, x2, decode=True)  # 3 + 3 > 4: written at rows 1..3
    np.testing.assert_array_equal(np.asarray(model.cache_seqlens[...]), [4, 4])
    full = _call(model, jnp.concatenate([x1[:, :1], x2], axis=1))[:, 1:]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(full, np.float32),
                               atol=2e-2, rtol=2e-2)


# ---- Varlen prefill: decode=True with lengths ----------------------------------------


def _logical_rows(model, b, n):
    """Sequence b's cache rows at logical positions 0 .. n - 1: k and v
    (n, num_kv_heads, head_dim) float32, through the block table if paged."""
    k, v = (np.asarray(c[...], np.float32) for c in (model.k_cache, model.v_cache))
    if model.block_table is None:
        return k[b, :n], v[b, :n]
    page_size, p = k.shape[1], np.arange(n)
    pages = np.asarray(model.block_table[...])[b, p // page_size]
    return k[pages, p % page_size], v[pages, p % page_size]


def _capacity(model):
    return model.k_cache.shape[1] * (1 if model.block_table is None else
                                     model.block_table.shape[1])


def _check_cache(model, b, expected):
    """Sequence b's first rows equal expected (k, v); every later row of its
    capacity is still zero (nothing else was written)."""
    n = expected[0].shape[0]
    got = _logical_rows(model, b, _capacity(model))
    for name, g, e in zip("kv", got, expected):
        np.testing.assert_allclose(g[:n], e, atol=1e-2, rtol=1e-2, err_msg=f"{name} rows of {b}")
        assert not np.any(g[n:]), f"{name} rows of sequence {b} past {n} were written"


# Two right-padded chunks per sequence (seqlen, lengths): 1, the full 7, even
# and odd; then the full 5, 0 (nothing appended), 1, 4. Few distinct lengths:
# each is a compile of its own for the sequences run alone.
_CHUNKS = ((7, (1, 7, 4, 5)), (5, (5, 0, 1, 4)))


@pytest.mark.parametrize("page_size,opts", [
    (None, dict(causal=True)),
    (1, dict(causal=True, logits_soft_cap=2.0)),
    (3, dict(causal=True, sliding_window=2)),
    (16, dict()),  # not causal: every new row sees all of its sequence's rows
])
def test_prefill_lengths_equals_each_sequence_alone(page_size, opts):
    model = _model(4, 2, rope_theta=10000.0, **opts)  # GQA
    nb, max_len, steps = len(_CHUNKS[0][1]), 14, 2
    # numpy inputs: slicing them costs no compile
    xs = [np.asarray(_rand(40 + i, (nb, s, F))) for i, (s, _) in enumerate(_CHUNKS)]
    tokens = np.asarray(_rand(42, (nb, steps, F)))

    # The oracle: each sequence alone (batch 1), its real rows only.
    alone = []
    for b in range(nb):
        model.init_cache(1, max_len, page_size)
        outs, rows = [], []
        for x, (_, lens) in zip(xs, _CHUNKS):
            if lens[b]:
                outs.append(np.asarray(_call(model, x[b:b + 1, :lens[b]], decode=True)[0],
                                       np.float32))
            rows.append(_logical_rows(model, 0, int(model.cache_seqlens[0])))
        for i in range(steps):
            outs.append(np.asarray(_call(model, tokens[b:b + 1, i:i + 1], decode=True)[0],
                                   np.float32))
        alone.append((np.concatenate(outs), rows, _logical_rows(model, 0, _capacity(model))))

    model.init_cache(nb, max_len, page_size)
    got = [[] for _ in range(nb)]
    for c, (x, (seqlen, lens)) in enumerate(zip(xs, _CHUNKS)):
        out = np.asarray(_call(model, x, decode=True, lengths=jnp.asarray(lens, jnp.int32)),
                         np.float32)
        assert out.shape == (nb, seqlen, F)
        for b, n in enumerate(lens):
            assert np.all(out[b, n:] == 0), f"padded rows of sequence {b}, chunk {c}"
            got[b].append(out[b, :n])
            _check_cache(model, b, alone[b][1][c])
    np.testing.assert_array_equal(np.asarray(model.cache_seqlens[...]),
                                  [sum(c[1][b] for c in _CHUNKS) for b in range(nb)])
    for i in range(steps):
        out = np.asarray(_call(model, tokens[:, i:i + 1], decode=True), np.float32)
        for b in range(nb):
            got[b].append(out[b])
    for b in range(nb):
        np.testing.assert_allclose(np.concatenate(got[b]), alone[b][0], atol=1e-2, rtol=1e-2,
                                   err_msg=f"sequence {b}")
        n = int(model.cache_seqlens[b])
        _check_cache(model, b, tuple(r[:n] for r in alone[b][2]))


def test_prefill_lengths_are_clamped():
    model = _model(4, 2, causal=True, rope_theta=10000.0)
    x1, x2 = _rand(43, (B, 5, F)), _rand(44, (B, 5, F))
    model.init_cache(B, 8, page_size=3)  # capacity 9
    out = _call(model, x1, decode=True, lengths=jnp.asarray([-3, 99], jnp.int32))  # [0, 5]
    assert not np.any(np.asarray(out[0], np.float32))
    np.testing.assert_array_equal(np.asarray(model.cache_seqlens[...]), [0, 5])
    # 5 + 5 > 9 rows for sequence 1: its write position is clamped to 9 - 5
    # (its last row overwritten), as decode=True without lengths clamps it.
    out = _call(model, x2, decode=True, lengths=jnp.asarray([2, 5], jnp.int32))
    np.testing.assert_array_equal(np.asarray(model.cache_seqlens[...]), [2, 9])
    assert not np.any(np.asarray(out[0, 2:], np.float32))
    model.init_cache(1, 8, page_size=3)
    _call(model, x1[1:], decode=True)
    ref = _call(model, x2[1:], decode=True)
    np.testing.assert_array_equal(np.asarray(model.cache_seqlens[...]), [9])
    np.testing.assert_allclose(np.asarray(out[1:], np.float32), np.asarray(ref, np.float32),
                               atol=1e-2, rtol=1e-2)


# ---- attention_fn in Flax's modules ---------------------------------------------------


def _jcall(module, x, **kw):
    """module(x, **kw) under nnx.jit: arrays and Rngs traced, the rest static."""
    dyn = {k: v for k, v in kw.items() if isinstance(v, (jax.Array, nnx.Rngs))}
    static = {k: v for k, v in kw.items() if k not in dyn}
    return nnx.jit(lambda m, x, d: m(x, **static, **d))(module, x, dyn)


def _nnx_pair(K=None, **kw):
    mk = lambda fn: nnx.MultiHeadAttention(  # noqa: E731
        4, F, qkv_features=64, num_kv_heads=K, decode=False, rngs=nnx.Rngs(3),
        attention_fn=fn, **kw)
    return mk(jf_flax.attention_fn), mk(nnx.dot_product_attention)


@pytest.mark.parametrize("K", [4, 2])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_fn_in_nnx_mha(K, is_causal):
    ours, theirs = _nnx_pair(K)
    low = nnx.MultiHeadAttention(4, F, qkv_features=64, num_kv_heads=K, decode=False,
                                 dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    x = _rand(12, (B, 11, F))
    out = _jcall(ours, x, is_causal=is_causal)
    assert out.dtype == jnp.float32
    _check(out, _jcall(low, x, is_causal=is_causal), _jcall(theirs, x, is_causal=is_causal),
           atol=3e-2)


def _nnx_with_our_weights(model, dtype, attention_fn):
    """nnx.MultiHeadAttention holding `model`'s projections (query, key and
    value heads split out of its fused qkv kernel)."""
    H, K, D = model.num_heads, model.num_kv_heads, model.head_dim
    theirs = nnx.MultiHeadAttention(H, F, qkv_features=H * D, num_kv_heads=K, decode=False,
                                    dtype=dtype, attention_fn=attention_fn, rngs=nnx.Rngs(0))
    kernel, bias = model.qkv.kernel[...], model.qkv.bias[...]
    for name, heads in (("query", slice(0, H)), ("key", slice(H, H + K)),
                        ("value", slice(H + K, H + 2 * K))):
        getattr(theirs, name).kernel[...] = kernel[:, heads]
        getattr(theirs, name).bias[...] = bias[heads]
    theirs.out.kernel[...] = model.out.kernel[...]
    theirs.out.bias[...] = model.out.bias[...]
    return theirs


@pytest.mark.parametrize("heads", [MHA, GQA])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_equals_nnx_mha_with_our_attention_fn(heads, causal):
    # Where the two modules overlap (no rotary, window, softcap or cache), ours
    # is nnx.MultiHeadAttention with attention_fn swapped: same weights, same
    # output, by the FlashAttention rule against nnx's own float32 module.
    H, K = heads
    model = _model(H, K, D=16, causal=causal)
    x = _rand(21, (B, 13, F))
    ours = _call(model, x)
    swapped = _jcall(_nnx_with_our_weights(model, jnp.bfloat16, jf_flax.attention_fn), x,
                     is_causal=causal)
    low = _jcall(_nnx_with_our_weights(model, jnp.bfloat16, nnx.dot_product_attention), x,
                 is_causal=causal)
    ref = _jcall(_nnx_with_our_weights(model, jnp.float32, nnx.dot_product_attention), x,
                 is_causal=causal)
    _check(ours, low, ref, what="ours vs nnx float32")
    _check(swapped, low, ref, what="nnx with attention_fn vs nnx float32")
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(swapped, np.float32),
                               atol=3e-2)


@pytest.mark.parametrize("which", ["causal", "padding"])
def test_attention_fn_mask_goes_to_xla(which, monkeypatch):
    ours, theirs = _nnx_pair()
    x = _rand(13, (B, 9, F))
    if which == "causal":
        mask = nnx.make_causal_mask(x[..., 0])
    else:
        mask = nnx.make_attention_mask(jnp.arange(9)[None] < jnp.asarray([[9], [5]]),
                                       jnp.arange(9)[None] < jnp.asarray([[9], [5]]))
    monkeypatch.setattr(jf_nn, "_WARNED", set())
    with pytest.warns(UserWarning, match="mask"):
        out = _jcall(ours, x, mask=mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_jcall(theirs, x, mask=mask)),
                               atol=1e-5, rtol=1e-5)


def test_attention_fn_dropout_in_nnx_mha():
    ours, _ = _nnx_pair(dropout_rate=0.2)
    x = _rand(14, (B, 9, F))
    a = np.asarray(_jcall(ours, x, rngs=nnx.Rngs(dropout=4), deterministic=False))
    b = np.asarray(_jcall(ours, x, rngs=nnx.Rngs(dropout=4), deterministic=False))
    det = np.asarray(_jcall(ours, x, deterministic=True))
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(a - det)) > 1e-2
    ref = np.asarray(_jcall(_nnx_pair()[1], x))
    np.testing.assert_allclose(det, ref, atol=3e-2)


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)':DeprecationWarning")
def test_attention_fn_sow_weights_falls_back(monkeypatch):
    ours, theirs = _nnx_pair()
    x = _rand(15, (B, 7, F))
    monkeypatch.setattr(flax_modules, "_WARNED", set())
    with pytest.warns(UserWarning, match="sow_weights"):
        out = ours(x, sow_weights=True)
    # Both eager: GPUs may round float32 matmuls differently under jit.
    np.testing.assert_allclose(np.asarray(out), np.asarray(theirs(x)),
                               atol=1e-5, rtol=1e-5)
    weights = nnx.pop(ours, nnx.Intermediate)["attention_weights"]
    assert weights[0].shape == (B, 4, 7, 7)


@pytest.mark.parametrize("causal_mask", [False, True])
def test_attention_fn_in_linen(causal_mask):
    x = _rand(16, (B, 11, F))
    mask = linen.make_causal_mask(x[..., 0]) if causal_mask else None
    theirs = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=64)
    ours = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=64,
                                              attention_fn=jf_flax.attention_fn)
    params = theirs.init(jax.random.key(0), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mask's one-time XLA warning
        out = jax.jit(lambda p, x, m: ours.apply(p, x, mask=m))(params, x, mask)
    ref = jax.jit(lambda p, x, m: theirs.apply(p, x, mask=m))(params, x, mask)
    tol = 1e-5 if causal_mask else 3e-2  # a mask runs on XLA in float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)


def test_attention_fn_direct():
    q, k, v = (_rand(17 + i, (2, 3, 9, 4, 32)) for i in range(3))  # two batch dims
    out = jax.jit(lambda *a: jf_flax.attention_fn(*a, is_causal=True))(q, k, v)
    ref = nnx.dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=3e-2)
    kept = jf_flax.attention_fn(q, k, v, is_causal=True, kernel_dtype=None)  # float32: XLA
    np.testing.assert_allclose(np.asarray(kept), np.asarray(ref), atol=1e-5, rtol=1e-5)
    half = jf_flax.attention_fn(q, k, v, dtype=jnp.float16)
    assert half.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(half, np.float32),
                               np.asarray(nnx.dot_product_attention(q, k, v)), atol=1e-2)


def test_attention_fn_dropout_with_mask_falls_back(monkeypatch):
    q, k, v = (_rand(30 + i, (B, 7, 4, 32)) for i in range(3))
    mask = jnp.asarray(np.random.RandomState(3).rand(B, 1, 7, 7) < 0.7)
    kw = dict(mask=mask, dropout_rate=0.3, dropout_rng=jax.random.key(5))
    monkeypatch.setattr(flax_modules, "_WARNED", set())
    with pytest.warns(UserWarning, match="dropout with a mask"):
        out = jax.jit(lambda *a: jf_flax.attention_fn(*a, **kw))(q, k, v)
    ref = jax.jit(lambda *a: nnx.dot_product_attention(*a, **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


# ---- FlashSelfAttention / FlashCrossAttention ---------------------------------------


def _ref(q, k, v, **kw):
    return jax.jit(lambda *xs: reference.attention_ref(
        *(x.astype(jnp.float32) for x in xs), **kw)[0])(q, k, v)


def _jit(fn, *args):
    """fn(*args) under nnx.jit (modules among the args)."""
    return nnx.jit(fn)(*args)


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(3, 1)),
                                dict(softmax_scale=0.3, causal=True)])
def test_flash_self_attention(kw):
    qkv = _rand(20, (B, 13, 3, 4, 32), jnp.bfloat16)
    layer = jf_flax.FlashSelfAttention(**kw)
    out = _jit(lambda m, t: m(t), layer, qkv)
    ref = _ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], **kw)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2)


def test_flash_self_attention_alibi_and_call_causal():
    qkv = _rand(21, (B, 9, 3, 4, 32), jnp.bfloat16)
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)
    layer = jf_flax.FlashSelfAttention(alibi_slopes=slopes)
    out = _jit(lambda m, t: m(t, causal=True), layer, qkv)
    ref = _ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True, alibi_slopes=slopes)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_self_attention_varlen(causal):
    cu = jnp.asarray([0, 5, 12, 19], jnp.int32)
    qkv = _rand(22, (19, 3, 4, 32), jnp.bfloat16)
    out = _jit(lambda m, t, cu: m(t, cu_seqlens=cu, max_seqlen=7),
               jf_flax.FlashSelfAttention(causal=causal), qkv, cu)
    ref, _ = reference.attention_varlen_ref(
        *(qkv[:, i].astype(jnp.float32) for i in range(3)), cu, cu, causal=causal)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_cross_attention(causal):
    q = _rand(23, (B, 7, 4, 32), jnp.bfloat16)
    kv = _rand(24, (B, 12, 2, 2, 32), jnp.bfloat16)
    out = _jit(lambda m, q, kv: m(q, kv), jf_flax.FlashCrossAttention(causal=causal), q, kv)
    ref = _ref(q, kv[:, :, 0], kv[:, :, 1], causal=causal)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2)


def test_flash_cross_attention_varlen():
    cu_q, cu_k = jnp.asarray([0, 3, 9], jnp.int32), jnp.asarray([0, 8, 13], jnp.int32)
    q = _rand(25, (9, 4, 32), jnp.bfloat16)
    kv = _rand(26, (13, 2, 1, 32), jnp.bfloat16)
    out = _jit(lambda m, q, kv, a, b: m(q, kv, True, a, 6, b, 8),
               jf_flax.FlashCrossAttention(), q, kv, cu_q, cu_k)
    ref, _ = reference.attention_varlen_ref(
        q.astype(jnp.float32), kv[:, 0].astype(jnp.float32), kv[:, 1].astype(jnp.float32),
        cu_q, cu_k, causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2)


def test_flash_attention_modules_dropout():
    rate, S = 0.2, 11
    qkv = _rand(27, (B, S, 3, 4, 32), jnp.bfloat16)
    layer = jf_flax.FlashSelfAttention(attention_dropout=rate, rngs=nnx.Rngs(0))
    call = nnx.jit(lambda m, t, r=None: m(t, rngs=r))
    out = call(layer, qkv, nnx.Rngs(dropout=9))
    key = nnx.Rngs(dropout=9).dropout()
    keep = jax.jit(lambda k: reference.dropout_keep_mask(
        reference.dropout_rng(k, B), 4, S, S, rate))(key)
    ref = _ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p=rate, dropout_mask=keep)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2)
    no_drop = _ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    assert np.max(np.abs(np.asarray(out, np.float32) - np.asarray(no_drop))) > 1e-2
    a, b = call(layer, qkv), call(layer, qkv)  # the stored stream advances
    assert np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))) > 0
    layer.eval()
    np.testing.assert_allclose(np.asarray(call(layer, qkv), np.float32), np.asarray(no_drop),
                               atol=2e-2)
    cross = jf_flax.FlashCrossAttention(attention_dropout=rate, deterministic=True)
    out = _jit(lambda m, q, kv: m(q, kv), cross, qkv[:, :, 0], qkv[:, :, 1:])
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(no_drop), atol=2e-2)


def test_flash_self_attention_grad_deterministic_backward():
    qkv = _rand(28, (B, 9, 3, 2, 32), jnp.bfloat16)
    layer = jf_flax.FlashSelfAttention(causal=True, deterministic_backward=True)
    g = jax.jit(jax.grad(lambda t: jnp.sum(layer(t).astype(jnp.float32))))(qkv)
    gr = jax.jit(jax.grad(lambda t: jnp.sum(reference.attention_ref(
        t[:, :, 0], t[:, :, 1], t[:, :, 2], causal=True)[0])))(qkv.astype(jnp.float32))
    assert g.shape == qkv.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(gr), atol=5e-2)


# ---- Packaging and errors --------------------------------------------------------------


def test_flax_is_not_imported_by_jax_flash():
    code = "import sys, jax_flash; assert 'jax_flash.flax' not in sys.modules; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.parametrize("kw,exc,match", [
    (dict(num_heads=4, num_kv_heads=3), ValueError, "num_kv_heads=3"),
    (dict(num_heads=0), ValueError, "num_heads must be an int >= 1, got 0"),
    (dict(head_dim=320), ValueError, r"head_dim must be in \[1, 256\], got 320"),
    (dict(num_heads=3, head_dim=None), ValueError, "head_dim: expected an int"),
    (dict(dtype=jnp.float32), TypeError, "dtype must be float16 or bfloat16"),
    (dict(sliding_window=4), ValueError, "sliding_window needs causal=True"),
    (dict(sliding_window=-1, causal=True), ValueError, "sliding_window must be an int >= 0"),
    (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap must be None or a finite float"),
    (dict(dropout_rate=1.0), ValueError, r"dropout_rate must be in \[0, 1\), got 1.0"),
    (dict(rope_theta=-1.0), ValueError, "rope_theta must be None or a finite float > 0"),
    (dict(rope_theta=10.0, head_dim=33), ValueError, "head_dim must be even"),
    (dict(causal="yes"), TypeError, "causal must be a Python bool"),
])
def test_mha_constructor_errors(kw, exc, match):
    kw = {"num_heads": 4, "head_dim": 32, **kw}
    with pytest.raises(exc, match=match):
        jf_flax.MultiHeadAttention(in_features=F, rngs=nnx.Rngs(0), **kw)


def test_mha_call_errors():
    model = _model(4, 2, causal=True)
    x = _rand(30, (B, 6, F))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seqlen, in_features=40\)"
                       r", got shape \(6, 40\)"):
        model(x[0])
    with pytest.raises(ValueError, match=r"got shape \(2, 6, 41\)"):
        model(jnp.zeros((B, 6, F + 1)))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(batch, seqlen\) = "
                       r"\(2, 6\), got \(2, 5\)"):
        model(x, segment_ids=jnp.zeros((B, 5), jnp.int32))
    with pytest.raises(TypeError, match="padding_mask must be a bool array .* dtype int32"):
        model(x, padding_mask=jnp.ones((B, 6), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must be an integer array .* dtype float32"):
        model(x, segment_ids=jnp.ones((B, 6)))
    with pytest.raises(ValueError, match="positions are rotary positions and need rope_theta"):
        model(x, positions=jnp.zeros((B, 6), jnp.int32))
    with pytest.raises(ValueError, match=r"lengths \(the rows each sequence appends to the "
                       r"cache\) needs decode=True, got decode=False"):
        model(x, lengths=jnp.full((B,), 6, jnp.int32))
    with pytest.raises(ValueError, match=r"lengths must have shape \(batch,\) = \(2,\), got "
                       r"\(2, 1\)"):
        model(x, decode=True, lengths=jnp.ones((B, 1), jnp.int32))
    with pytest.raises(TypeError, match=r"lengths must be an integer array of shape \(2,\), "
                       "got dtype float32"):
        model(x, decode=True, lengths=jnp.ones((B,), jnp.float32))
    with pytest.raises(TypeError, match="lengths must be an integer array .* got list"):
        model(x, decode=True, lengths=[6, 6])
    with pytest.raises(ValueError, match="call init_cache"):
        model(x, decode=True)
    with pytest.raises(ValueError, match="call init_cache"):
        model(x, decode=True, lengths=jnp.full((B,), 6, jnp.int32))
    with pytest.raises(ValueError, match="page_size must be an int >= 1, got 0"):
        model.init_cache(B, 8, page_size=0)
    with pytest.raises(ValueError, match="max_len must be an int >= 1, got 0"):
        model.init_cache(B, 0)
    with pytest.raises(TypeError, match="dtype must be float16 or bfloat16"):
        model.init_cache(B, 8, dtype=jnp.float32)
    model.init_cache(B, 4)
    with pytest.raises(ValueError, match="cache's batch 2 with decode=True, got batch 1"):
        model(x[:1], decode=True)
    with pytest.raises(ValueError, match="capacity 4 with decode=True, got seqlen 6"):
        model(x, decode=True)
    with pytest.raises(ValueError, match="capacity 4 with decode=True, got seqlen 6"):
        model(x, decode=True, lengths=jnp.full((B,), 3, jnp.int32))
    with pytest.raises(ValueError, match="padding_mask must be None with decode=True"):
        model(x[:, :2], decode=True, padding_mask=jnp.ones((B, 2), bool))
    dropping = _model(4, 2, dropout_rate=0.1)
    dropping.rngs = None
    with pytest.raises(ValueError, match="rngs: expected an nnx.Rngs"):
        dropping(x)


def test_module_and_attention_fn_errors():
    qkv = jnp.zeros((B, 6, 3, 4, 32), jnp.bfloat16)
    layer = jf_flax.FlashSelfAttention()
    with pytest.raises(ValueError, match=r"qkv must have rank 5 \(batch, seqlen, 3, nheads, "
                       r"head_dim\), got shape \(6, 3, 4, 32\)"):
        layer(qkv[0])
    cu = jnp.asarray([0, 6], jnp.int32)
    with pytest.raises(ValueError, match="qkv must have rank 4"):
        layer(qkv, cu_seqlens=cu, max_seqlen=6)
    with pytest.raises(ValueError, match="max_seqlen: expected a value with cu_seqlens"):
        layer(qkv[0], cu_seqlens=cu)
    with pytest.raises(ValueError, match="attention_dropout must be in"):
        jf_flax.FlashSelfAttention(attention_dropout=-0.1)
    with pytest.raises(TypeError, match="window_size must be a pair"):
        jf_flax.FlashSelfAttention(window_size=3)
    with pytest.raises(ValueError, match="rngs: expected"):
        jf_flax.FlashSelfAttention(attention_dropout=0.1)(qkv)
    with pytest.raises(TypeError, match="must be float16 or bfloat16, got float32"):
        layer(qkv.astype(jnp.float32))
    cross = jf_flax.FlashCrossAttention()
    q, kv = qkv[:, :, 0], qkv[:, :, 1:]
    with pytest.raises(ValueError, match=r"kv must have rank 5 \(batch, seqlen_k, 2"):
        cross(q, kv[0])
    with pytest.raises(ValueError, match="cu_seqlens: expected an int32 array with "
                       "cu_seqlens_k"):
        cross(q, kv, cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected a value with cu_seqlens"):
        cross(q[0], kv[0], cu_seqlens=cu, max_seqlen=6)
    with pytest.raises(ValueError, match=r"query must have shape \[batch..., length, "
                       r"num_heads, head_dim\] \(rank >= 3\), got shape \(4, 32\)"):
        jf_flax.attention_fn(q[0, 0], q[0], q[0])
    with pytest.raises(TypeError, match="kernel_dtype must be float16 or bfloat16"):
        jf_flax.attention_fn(q, q, q, kernel_dtype=jnp.int8)
    with pytest.raises(ValueError, match="dropout_rng: expected a JAX PRNG key"):
        jf_flax.attention_fn(q, q, q, dropout_rate=0.1)
