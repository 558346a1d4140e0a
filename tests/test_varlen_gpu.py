"""GPU: variable-length (packed) attention and segment ids in our kernels,
forward and backward, against jax_flash.reference with FlashAttention's rule
(2x the low-precision reference's error for outputs, 3x for gradients, +1e-5
absolute; +1e-4 with ALiBi), plus the robustness cases."""

import functools
import random
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import reference

from gpu_grid import DTYPES, HEAD_DIMS, HEADS, check_fa_rule, requires_gpu, skip_if_not_compiled

pytestmark = requires_gpu


def _vjps(kernel, ref, q, k, v, d_out):
    # The references jitted: run op by op, every op of every new shape
    # compiles on its own (about 3x slower on a fresh shape).
    results = []
    for fn in (kernel, jax.jit(functools.partial(ref, upcast=True)),
               jax.jit(functools.partial(ref, upcast=False))):
        out, pullback = jax.vjp(fn, q, k, v)
        results.append((out, pullback(d_out)))
    return results


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ---- Varlen -------------------------------------------------------------------

def _lengths(rnd, batch, max_len):
    lens = [rnd.choice([0, 1, rnd.randint(1, max_len)]) if rnd.random() < 0.3
            else rnd.randint(1, max_len) for _ in range(batch)]
    lens[rnd.randrange(batch)] = max_len  # the maximum is reached, not a tile multiple
    return lens


def _varlen_grid(n, seed=0):
    rnd = random.Random(seed)
    cases = []
    for _ in range(n):
        causal = rnd.random() < 0.4
        max_q = rnd.choice([1, 37, 129, 300, 511])
        max_k = max_q if rnd.random() < 0.5 else rnd.choice([17, 200, 333])
        batch = rnd.randint(1, 6)
        cases.append(dict(
            dtype=rnd.choice(DTYPES), head_dim=rnd.choice(HEAD_DIMS), heads=rnd.choice(list(HEADS)),
            lens_q=_lengths(rnd, batch, max_q), lens_k=_lengths(rnd, batch, max_k),
            causal=causal, window=(-1, -1) if causal or rnd.random() < 0.6 else rnd.choice(
                [(16, 0), (64, 32), (5, -1), (0, 0)]),
            softcap=rnd.choice([0.0, 0.0, 30.0]), alibi=rnd.random() < 0.3,
        ))
    return cases


def _varlen_id(c):
    name = "fp16" if c["dtype"] == jnp.float16 else "bf16"
    return (f"{name}-d{c['head_dim']}-{c['heads']}-b{len(c['lens_q'])}-mq{max(c['lens_q'])}-"
            f"mk{max(c['lens_k'])}-c{int(c['causal'])}-w{c['window'][0]}_{c['window'][1]}-"
            f"cap{c['softcap']:g}-a{int(c['alibi'])}")


def _varlen_inputs(seed, lens_q, lens_k, heads, head_dim, dtype):
    nheads, nheads_k = heads
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    kq, kk, kv, kd, ka = jax.random.split(jax.random.key(seed), 5)
    q = _normal(kq, (int(cu_q[-1]), nheads, head_dim), dtype)
    k = _normal(kk, (int(cu_k[-1]), nheads_k, head_dim), dtype)
    v = _normal(kv, (int(cu_k[-1]), nheads_k, head_dim), dtype)
    d_out = _normal(kd, q.shape, dtype)
    slopes = jax.random.uniform(ka, (len(lens_q), nheads), jnp.float32, 0.01, 0.3)
    return q, k, v, d_out, cu_q, cu_k, slopes


@pytest.mark.parametrize("case", _varlen_grid(72), ids=_varlen_id)
def test_varlen_matches_per_sequence_reference(case):
    skip_if_not_compiled(case["head_dim"])
    seed = zlib.crc32(_varlen_id(case).encode())
    q, k, v, d_out, cu_q, cu_k, slopes = _varlen_inputs(
        seed, case["lens_q"], case["lens_k"], HEADS[case["heads"]], case["head_dim"], case["dtype"])
    max_q, max_k = max(case["lens_q"]), max(case["lens_k"])
    opts = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"],
                alibi_slopes=slopes if case["alibi"] else None)
    kernel_fn = jax.jit(lambda q, k, v, cu_q, cu_k: jax_flash.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, **opts))
    kernel = lambda q, k, v: kernel_fn(q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k))
    ref = lambda q, k, v, upcast: reference.attention_varlen_ref(
        q, k, v, cu_q, cu_k, upcast=upcast, **opts)[0]
    check_fa_rule(_vjps(kernel, ref, q, k, v, d_out), atol=1e-4 if case["alibi"] else 1e-5)
    _, lse, _ = jax_flash.flash_attn_varlen_func(q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k),
                                                max_q, max_k, return_attn_probs=True, **opts)
    _, ref_lse = reference.attention_varlen_ref(q, k, v, cu_q, cu_k, **opts)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    np.testing.assert_array_equal(np.isposinf(lse), np.isposinf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)


def test_varlen_packed_variants_and_deterministic():
    lens = [100, 1, 0, 257, 64]
    skip_if_not_compiled(64)
    q, k, v, d_out, cu, _, _ = _varlen_inputs(7, lens, lens, HEADS["mha"], 64, jnp.bfloat16)
    cu = jnp.asarray(cu)
    loss = lambda out: jnp.sum(out.astype(jnp.float32) * d_out)
    f = jax.jit(jax.value_and_grad(lambda q, k, v: loss(jax_flash.flash_attn_varlen_func(
        q, k, v, cu, cu, 257, 257, causal=True)), (0, 1, 2)))
    val, (dq, dk, dv) = f(q, k, v)
    fkv = jax.jit(jax.value_and_grad(lambda q, kv: loss(jax_flash.flash_attn_varlen_kvpacked_func(
        q, kv, cu, cu, 257, 257, causal=True)), (0, 1)))
    val_kv, (dq2, dkv) = fkv(q, jnp.stack([k, v], 1))
    fqkv = jax.jit(jax.value_and_grad(lambda qkv: loss(jax_flash.flash_attn_varlen_qkvpacked_func(
        qkv, cu, 257, causal=True))))
    val_qkv, dqkv = fqkv(jnp.stack([q, k, v], 1))
    for a, b in [(val_kv, val), (val_qkv, val), (dq2, dq), (dkv[:, 0], dk), (dkv[:, 1], dv),
                 (dqkv[:, 0], dq), (dqkv[:, 1], dk), (dqkv[:, 2], dv)]:
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=2e-2, rtol=1e-2)
    for causal in (True, False):  # accumulator slices / ordered additions
        g = jax.jit(jax.grad(lambda q, k, v: loss(jax_flash.flash_attn_varlen_func(
            q, k, v, cu, cu, 257, 257, causal=causal, deterministic=True)), (0, 1, 2)))
        first = [np.asarray(x, np.float32) for x in g(q, k, v)]
        for _ in range(10):
            for a, b in zip(g(q, k, v), first):
                np.testing.assert_array_equal(np.asarray(a, np.float32), b)
        # ... and the same gradients as the atomics path, to rounding.
        atomics = jax.grad(lambda q, k, v: loss(jax_flash.flash_attn_varlen_func(
            q, k, v, cu, cu, 257, 257, causal=causal)), (0, 1, 2))(q, k, v)
        for a, b in zip(atomics, first):
            np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("cu,max_q,max_k", [
    ([0, 50, 90], 64, 64),      # rows 90.. belong to no sequence
    ([0, 150, 200], 64, 128),   # max_seqlen too small: sequences truncated
    ([0, 150, 300, 250, 400], 256, 256),  # decreasing and past the buffer's end
    ([5, 5, 5], 8, 8),          # zero-length sequences only
])
def test_varlen_inconsistent_lengths_stay_in_bounds(cu, max_q, max_k):
    """The kernels clamp exactly as reference.varlen_rows documents."""
    skip_if_not_compiled(64)
    q, k, v, d_out, _, _, _ = _varlen_inputs(3, [200], [200], HEADS["gqa"], 64, jnp.float16)
    cu = jnp.int32(cu)
    kernel = lambda q, k, v: jax_flash.flash_attn_varlen_func(q, k, v, cu, cu, max_q, max_k,
                                                              causal=True)
    ref = lambda q, k, v, upcast: reference.attention_varlen_padded(
        q, k, v, cu, cu, max_q, max_k, causal=True, upcast=upcast)[0]
    results = _vjps(kernel, ref, q, k, v, d_out)
    check_fa_rule(results, atol=1e-5)
    out, lse, _ = jax_flash.flash_attn_varlen_func(q, k, v, cu, cu, max_q, max_k, causal=True,
                                                   return_attn_probs=True)
    _, ref_lse = reference.attention_varlen_padded(q, k, v, cu, cu, max_q, max_k, causal=True)
    np.testing.assert_array_equal(np.isposinf(np.asarray(lse)), np.isposinf(np.asarray(ref_lse)))


def test_varlen_overlapping_sequences_stay_finite():
    """Decreasing cu_seqlens can make clamped sequences share rows. Their
    values are unspecified (both write the shared rows), but nothing leaves
    the buffers: the output stays finite, rows no sequence covers are exact
    zeros, and the output rows only one sequence writes match the
    reference."""
    skip_if_not_compiled(64)
    q, k, v, d_out, _, _, _ = _varlen_inputs(3, [240], [240], HEADS["gqa"], 64, jnp.float16)
    # Sequence 0: rows [0, 200); sequence 1 is empty; sequence 2: rows
    # [120, 180), inside sequence 0; rows [200, 240) belong to no sequence.
    cu = jnp.int32([0, 200, 120, 180])
    f = lambda q, k, v: jax_flash.flash_attn_varlen_func(q, k, v, cu, cu, 256, 256, causal=True)
    out, vjp = jax.vjp(f, q, k, v)
    grads = vjp(d_out)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    ref = reference.attention_varlen_padded(q, k, v, cu, cu, 256, 256, causal=True)[0]
    np.testing.assert_allclose(np.float32(out[:120]), np.float32(ref[:120]), atol=5e-3)
    for x in (out, *grads):
        assert not np.asarray(x[200:]).any()


def test_varlen_dropout_matches_reference_fed_the_kernels_mask():
    lens_q, lens_k = [33, 1, 130, 0, 77], [40, 9, 130, 5, 77]
    skip_if_not_compiled(128)
    q, k, v, d_out, cu_q, cu_k, slopes = _varlen_inputs(9, lens_q, lens_k, HEADS["gqa"], 128,
                                                        jnp.bfloat16)
    p, key = 0.25, jax.random.key(3)
    cu_q, cu_k = jnp.asarray(cu_q), jnp.asarray(cu_k)
    _, _, probs = jax_flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 130, 130, dropout_p=p,
                                                   causal=True, alibi_slopes=slopes,
                                                   dropout_key=key, return_attn_probs=True)
    expected = np.asarray(reference.dropout_keep_mask(reference.dropout_rng(key, 5), 6, 130,
                                                      130, p))
    visible = np.asarray(probs) != 0
    np.testing.assert_array_equal((np.asarray(probs) >= 0)[visible], expected[visible])
    opts = dict(causal=True, alibi_slopes=slopes, dropout_p=p)
    kernel = lambda q, k, v: jax_flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 130, 130,
                                                              dropout_key=key, **opts)
    ref = lambda q, k, v, upcast: reference.attention_varlen_padded(
        q, k, v, cu_q, cu_k, 130, 130, dropout_mask=jnp.asarray(expected), upcast=upcast,
        **opts)[0]
    check_fa_rule(_vjps(kernel, ref, q, k, v, d_out), atol=1e-4)


def test_varlen_under_vmap_and_shard_map():
    lens = [31, 64, 5]
    skip_if_not_compiled(64)
    q, k, v, _, cu, _, _ = _varlen_inputs(4, lens, lens, HEADS["mha"], 64, jnp.float16)
    cu = jnp.asarray(cu)
    one = lambda q, k, v, cu: jax_flash.flash_attn_varlen_func(q, k, v, cu, cu, 64, 64,
                                                               causal=True)
    expected = one(q, k, v, cu)
    stacked = jax.jit(jax.vmap(one))(*(jnp.stack([x, x]) for x in (q, k, v, cu)))
    np.testing.assert_array_equal(np.float32(stacked[1]), np.float32(expected))
    # Per-device packed buffers, each shard with its own cu_seqlens.
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    n = len(devices)
    spec = jax.sharding.PartitionSpec("d")
    f = jax.jit(jax.shard_map(lambda q, k, v, cu: one(q, k, v, cu[0])[None], mesh=mesh,
                              in_specs=(spec, spec, spec, spec), out_specs=spec))
    tile = lambda x: jnp.concatenate([x] * n)
    out = f(tile(q), tile(k), tile(v), jnp.stack([cu] * n))
    np.testing.assert_array_equal(np.float32(out[0]), np.float32(expected))


# ---- Segment ids ----------------------------------------------------------------

def _segments(rnd, batch, seqlen, contiguous, n_ids):
    rows = []
    for _ in range(batch):
        if contiguous:
            cuts = sorted(rnd.sample(range(1, seqlen), min(n_ids - 1, seqlen - 1))) if seqlen > 1 else []
            ids = np.zeros(seqlen, np.int32)
            for c in cuts:
                ids[c:] += 1
        else:
            ids = np.asarray([rnd.randrange(n_ids) for _ in range(seqlen)], np.int32)
        rows.append(ids)
    return np.stack(rows)


def _segment_grid(n, seed=1):
    rnd = random.Random(seed)
    cases = []
    for _ in range(n):
        sq = rnd.choice([1, 77, 128, 255, 513, 1000])
        same = rnd.random() < 0.6
        sk = sq if same else rnd.choice([64, 200, 511])
        causal = rnd.random() < 0.5
        cases.append(dict(
            dtype=rnd.choice(DTYPES), head_dim=rnd.choice(HEAD_DIMS), heads=rnd.choice(list(HEADS)),
            sq=sq, sk=sk, same=same, contiguous=rnd.random() < 0.75, n_ids=rnd.choice([2, 5, 12]),
            causal=causal, window=(-1, -1) if causal or rnd.random() < 0.6 else rnd.choice(
                [(16, 0), (64, 32), (5, -1)]),
            softcap=rnd.choice([0.0, 0.0, 30.0]), alibi=rnd.random() < 0.25,
            dropout=rnd.random() < 0.15,
        ))
    return cases


def _segment_id(c):
    name = "fp16" if c["dtype"] == jnp.float16 else "bf16"
    return (f"{name}-d{c['head_dim']}-{c['heads']}-{c['sq']}x{c['sk']}-s{int(c['same'])}"
            f"c{int(c['contiguous'])}n{c['n_ids']}-c{int(c['causal'])}-w{c['window'][0]}_"
            f"{c['window'][1]}-cap{c['softcap']:g}-a{int(c['alibi'])}-p{int(c['dropout'])}")


@pytest.mark.parametrize("case", _segment_grid(64), ids=_segment_id)
def test_segment_ids_match_reference(case):
    skip_if_not_compiled(case["head_dim"])
    seed = zlib.crc32(_segment_id(case).encode())
    rnd = random.Random(seed)
    batch, (nheads, nheads_k) = 2, HEADS[case["heads"]]
    kq, kk, kv, kd, ka = jax.random.split(jax.random.key(seed), 5)
    q = _normal(kq, (batch, case["sq"], nheads, case["head_dim"]), case["dtype"])
    k = _normal(kk, (batch, case["sk"], nheads_k, case["head_dim"]), case["dtype"])
    v = _normal(kv, (batch, case["sk"], nheads_k, case["head_dim"]), case["dtype"])
    d_out = _normal(kd, q.shape, case["dtype"])
    q_seg = _segments(rnd, batch, case["sq"], case["contiguous"], case["n_ids"])
    kv_seg = q_seg if case["same"] else _segments(rnd, batch, case["sk"], case["contiguous"],
                                                  case["n_ids"])
    slopes = jax.random.uniform(ka, (batch, nheads), jnp.float32, 0.01, 0.3)
    opts = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"],
                alibi_slopes=slopes if case["alibi"] else None)
    p = 0.2 if case["dropout"] else 0.0
    key = jax.random.key(seed % 1000)
    keep = None
    if p:
        keep = reference.dropout_keep_mask(reference.dropout_rng(key, batch), nheads,
                                           case["sq"], case["sk"], p)
    segs = (jnp.asarray(q_seg), jnp.asarray(kv_seg))
    kernel = jax.jit(lambda q, k, v: jax_flash.flash_attn_func(
        q, k, v, dropout_p=p, dropout_key=key if p else None, segment_ids=segs, **opts))
    ref = lambda q, k, v, upcast: reference.attention_ref(
        q, k, v, q_segment_ids=segs[0], kv_segment_ids=segs[1], dropout_p=p,
        dropout_mask=keep, upcast=upcast, **opts)[0]
    check_fa_rule(_vjps(kernel, ref, q, k, v, d_out), atol=1e-4 if case["alibi"] else 1e-5)
    _, lse, _ = jax.jit(lambda q, k, v: jax_flash.flash_attn_func(
        q, k, v, segment_ids=segs, return_attn_probs=True, dropout_p=p,
        dropout_key=key if p else None, **opts))(q, k, v)
    _, ref_lse = jax.jit(lambda q, k, v: reference.attention_ref(
        q, k, v, q_segment_ids=segs[0], kv_segment_ids=segs[1], **opts))(q, k, v)
    np.testing.assert_array_equal(np.isposinf(np.asarray(lse)), np.isposinf(np.asarray(ref_lse)))


def test_segment_ids_agree_with_varlen():
    """One packed row with segment ids = the same documents through varlen."""
    lens = [300, 64, 1, 1000, 129, 555]
    skip_if_not_compiled(128)
    q, k, v, d_out, cu, _, _ = _varlen_inputs(12, lens, lens, HEADS["gqa"], 128, jnp.bfloat16)
    seg = jnp.asarray(np.repeat(np.arange(len(lens)), lens).astype(np.int32)[None])
    loss = lambda o: jnp.sum(o.astype(jnp.float32) * d_out)
    g_var = jax.jit(jax.value_and_grad(lambda q, k, v: loss(jax_flash.flash_attn_varlen_func(
        q, k, v, jnp.asarray(cu), jnp.asarray(cu), 1000, 1000, causal=True)), (0, 1, 2)))
    g_seg = jax.jit(jax.value_and_grad(lambda q, k, v: loss(jax_flash.flash_attn_func(
        q[None], k[None], v[None], causal=True, segment_ids=(seg, seg))[0]), (0, 1, 2)))
    (a, ga), (b, gb) = g_var(q, k, v), g_seg(q, k, v)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-3)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.float32(x), np.float32(y), atol=2e-2, rtol=1e-2)
