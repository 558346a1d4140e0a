"""Public API: argument validation (every error message) and the composition
of flash_attn_func with jit / vmap / grad on whatever backend runs the tests."""

import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import reference


def _qkv(b=2, sq=17, sk=23, h=4, hk=2, d=32, dtype=jnp.bfloat16, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (b, sq, h, d), jnp.float32).astype(dtype),
        jax.random.normal(kk, (b, sk, hk, d), jnp.float32).astype(dtype),
        jax.random.normal(kv, (b, sk, hk, d), jnp.float32).astype(dtype),
    )


# ---- Errors -------------------------------------------------------------------


def test_rank_error_names_argument_and_shape():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must have rank 4 .*got shape \(17, 4, 32\)"):
        jax_flash.flash_attn_func(q[0], k, v)
    with pytest.raises(ValueError, match=r"k must have rank 4 .*got shape \(2, 23, 2, 32, 1\)"):
        jax_flash.flash_attn_func(q, k[..., None], v)


def test_dtype_errors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="q must be float16 or bfloat16, got float32"):
        jax_flash.flash_attn_func(q.astype(jnp.float32), k, v)
    with pytest.raises(TypeError, match="share one dtype, got q bfloat16, k float16, v bfloat16"):
        jax_flash.flash_attn_func(q, k.astype(jnp.float16), v)
    with pytest.raises(TypeError, match="v must be a JAX array, got list"):
        jax_flash.flash_attn_func(q, k, [1.0])


def test_shape_mismatch_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k and v must have the same shape .*got k \(2, 23, 2, 32\) and v \(2, 22, 2, 32\)"):
        jax_flash.flash_attn_func(q, k, v[:, :22])
    with pytest.raises(ValueError, match=r"k must have batch 2 like q, got k \(1, 23, 2, 32\)"):
        jax_flash.flash_attn_func(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"headdim 32 like q \(2, 17, 4, 32\), got k \(2, 23, 2, 16\)"):
        jax_flash.flash_attn_func(q, k[..., :16], v[..., :16])
    q3, k3, v3 = _qkv(h=4, hk=3)
    with pytest.raises(ValueError, match=r"nheads of q \(4\) must be a multiple of nheads of k/v \(3\)"):
        jax_flash.flash_attn_func(q3, k3, v3)
    with pytest.raises(ValueError, match=r"q must have nheads >= 1, got q \(2, 17, 0, 32\)"):
        jax_flash.flash_attn_func(q[:, :, :0], k, v)


def test_packed_shape_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\), got \(2, 17, 4, 32\)"):
        jax_flash.flash_attn_qkvpacked_func(q)
    with pytest.raises(ValueError, match=r"kv must have shape \(batch, seqlen_k, 2, nheads_k, headdim\), got \(2, 23, 3, 2, 32\)"):
        jax_flash.flash_attn_kvpacked_func(q, jnp.stack([k, v, v], axis=2))


def test_packed_variants_equal_unpacked():
    q, k, v = _qkv(h=2, hk=2, sk=17)
    out = jax_flash.flash_attn_func(q, k, v, causal=True)
    _close(jax_flash.flash_attn_qkvpacked_func(jnp.stack([q, k, v], 2), causal=True), out, atol=0)
    _close(jax_flash.flash_attn_kvpacked_func(q, jnp.stack([k, v], 2), causal=True), out, atol=0)


def test_head_dim_limit():
    q, k, v = _qkv(sq=3, sk=3, d=264)
    with pytest.raises(ValueError, match=r"headdim must be in \[1, 256\], got 264"):
        jax_flash.flash_attn_func(q, k, v)


def test_option_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="softmax_scale must be a finite number > 0, got -1.0"):
        jax_flash.flash_attn_func(q, k, v, softmax_scale=-1.0)
    with pytest.raises(TypeError, match=r"window_size must be a pair of ints \(left, right\), got 3"):
        jax_flash.flash_attn_func(q, k, v, window_size=3)
    with pytest.raises(ValueError, match=r"window_size entries must be >= -1 .*got \(-2, 0\)"):
        jax_flash.flash_attn_func(q, k, v, window_size=(-2, 0))


def test_score_modifier_errors():
    q, k, v = _qkv()
    f = jax_flash.flash_attn_func
    with pytest.raises(ValueError, match=r"softcap must be a finite float >= 0 \(0: off\), got -1.0"):
        f(q, k, v, softcap=-1.0)
    with pytest.raises(TypeError, match="softcap must be a float >= 0, got 'x'"):
        f(q, k, v, softcap="x")
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(4,\) or \(2, 4\), got \(3,\)"):
        f(q, k, v, alibi_slopes=jnp.ones((3,), jnp.float32))
    with pytest.raises(TypeError, match="alibi_slopes must be float32, got bfloat16"):
        f(q, k, v, alibi_slopes=jnp.ones((4,), jnp.bfloat16))
    with pytest.raises(TypeError, match="alibi_slopes must be a float32 array .* got list"):
        f(q, k, v, alibi_slopes=[1.0] * 4)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        f(q, k, v, dropout_p=1.0, dropout_key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"dropout_key: expected a JAX PRNG key .* got None \(dropout_p=0.1\)"):
        f(q, k, v, dropout_p=0.1)
    with pytest.raises(TypeError, match=r"dropout_key must be one JAX PRNG key.*got dtype int32 shape \(2,\)"):
        f(q, k, v, dropout_p=0.1, dropout_key=jnp.zeros((2,), jnp.int32))
    with pytest.raises(TypeError, match=r"dropout_key must be one JAX PRNG key.*shape \(3,\)"):
        f(q, k, v, dropout_p=0.1, dropout_key=jax.random.split(jax.random.key(0), 3))


def test_dropout_key_without_dropout_is_ignored():
    q, k, v = _qkv()
    out = jax_flash.flash_attn_func(q, k, v, dropout_key=jax.random.key(3))
    _close(out, jax_flash.flash_attn_func(q, k, v), atol=0)


# ---- Composition (CPU: the reference path; GPU: the kernels) -------------------


def _close(a, b, atol=2e-2):
    # bf16 keeps 8 bits of mantissa: one ulp at 13.5 is 0.0625, hence rtol.
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol, rtol=1e-2
    )


@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_under_jit(causal):
    q, k, v = _qkv(sq=33, sk=20)
    out, lse, probs = jax.jit(
        lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    )(q, k, v)
    ref, ref_lse = reference.attention_ref(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 4, 33) and lse.dtype == jnp.float32
    assert probs.shape == (2, 4, 33, 20) and probs.dtype == jnp.float32
    _close(out, ref)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-3, atol=1e-3)
    # Rows sum to 1, or 0 where no key is visible; nothing negative without dropout.
    sums = np.asarray(probs).sum(-1)
    np.testing.assert_allclose(sums, np.where(np.isposinf(np.asarray(lse)), 0.0, 1.0), atol=1e-3)
    assert (np.asarray(probs) >= 0).all()
    if causal:  # 33 queries, 20 keys: the first 13 queries see nothing
        assert np.isposinf(np.asarray(lse)[:, :, :13]).all()
        assert (np.asarray(out, np.float32)[:, :13] == 0).all()


def test_odd_head_dim_and_custom_scale():
    q, k, v = _qkv(d=59)
    out = jax_flash.flash_attn_func(q, k, v, softmax_scale=0.3)
    _close(out, reference.attention_ref(q, k, v, softmax_scale=0.3)[0])


def test_vmap_over_extra_batch_dim():
    q, k, v = _qkv(b=3)
    qs, ks, vs = (jnp.stack([x, x[::-1]]) for x in (q, k, v))
    out = jax.vmap(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True))(qs, ks, vs)
    assert out.shape == (2, *q.shape)
    _close(out[1], jax_flash.flash_attn_func(q[::-1], k[::-1], v[::-1], causal=True))


def test_grad_matches_reference():
    q, k, v = _qkv(sq=9, sk=9)
    f = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2), (0, 1, 2))
    grads = f(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True))(q, k, v)
    refs = f(lambda q, k, v: reference.attention_ref(q, k, v, causal=True)[0])(q, k, v)
    for g, r in zip(grads, refs):
        assert np.isfinite(np.asarray(g, np.float32)).all()
        _close(g, r, atol=5e-2)


@pytest.mark.parametrize("seqlen_k,batch,nheads_k,options,expected", [
    (16384, 1, 16, {}, (1, True)),  # 8 slices' worth: ordered, one accumulator
    (8192, 2, 16, {}, (1, True)),
    (4096, 4, 16, {}, (2, False)),  # two slices or fewer: slices
    (2048, 8, 16, {}, (1, False)),
    (16384, 1, 16, {"local": True}, (8, False)),  # causal / a window
    (16384, 1, 16, {"segments": True}, (8, False)),
    (16384, 1, 16, {"softcap": True}, (8, False)),
    (16384, 1, 16, {"alibi": True}, (8, False)),
    (16384, 1, 16, {"dropout": True}, (8, False)),
    (16384, 1, 16, {"deterministic": False}, (1, False)),
])
def test_deterministic_backward_plan(seqlen_k, batch, nheads_k, options, expected):
    # Which deterministic backward runs (csrc/sm80/bwd_kernel.h, asked through
    # _C.plan): only the plain kernel can order its dQ additions, and the
    # handler refuses the others an ordered plan, so the policy must never
    # pick it for them.
    from jax_flash._src import extension, plan
    if not extension.has_kernels():
        pytest.skip("needs the compiled extension (_C.plan)")
    if expected[1] and "full" not in extension._C.build_info()["variants"]:
        pytest.skip("the ordered mode is the full variant's, not compiled in this build")
    p = plan.plan_for(
        batch, 128, seqlen_k, 16, nheads_k, extension.compiled_head_dims()[0], -1,
        options.get("local", False), options.get("softcap", False), options.get("alibi", False),
        options.get("dropout", False), options.get("segments", False),
        options.get("deterministic", True), 132)
    assert (p.dq_accum_splits, p.dq_ordered) == expected


# What each kernel variant handles, cheapest first (csrc/generate_kernels.py).
_VARIANT_FEATURES = {"full": set(), "local": {"local"}, "segs": {"segments"},
                     "mods": {"local", "mods"},
                     "dropout": {"local", "mods", "dropout", "segments"}}


@pytest.mark.parametrize("needs", [set(), {"local"}, {"segments"}, {"mods"}, {"local", "mods"},
                                   {"dropout"}, {"segments", "mods"}, {"local", "dropout"}],
                         ids=lambda n: "+".join(sorted(n)) or "plain")
def test_plan_runs_the_cheapest_compiled_variant(needs):
    # JAX_FLASH_VARIANTS may leave variants out: a call then runs the first
    # compiled one that covers its features (dropout's covers all).
    from jax_flash._src import extension, plan
    if not extension.has_kernels():
        pytest.skip("needs the compiled extension (_C.plan)")
    compiled = list(extension._C.build_info()["variants"])
    assert compiled[-1] == "dropout" and set(compiled) <= set(_VARIANT_FEATURES)
    expected = next(v for v in _VARIANT_FEATURES if v in compiled and needs <= _VARIANT_FEATURES[v])
    p = plan.plan_for(2, 128, 128, 4, 4, extension.compiled_head_dims()[0], -1,
                      "local" in needs and "segments" not in needs, "mods" in needs, False,
                      "dropout" in needs, "segments" in needs, False, 132)
    assert p.variant == expected, (needs, compiled)


_FORCED_PLAN = """
import json
from jax_flash._src import extension
d = extension.compiled_head_dims()[0]
out = {}
for name, needs in (("plain", (False, False, False, False)), ("window", (True, False, False, False)),
                    ("softcap", (False, True, False, False)), ("dropout", (False, False, True, False))):
    local, softcap, dropout, segs = needs
    try:
        out[name] = extension._C.plan(2, 128, 128, 4, 4, d, -1, local, softcap, False, dropout,
                                      segs, False, 132)["variant"]
    except Exception as e:
        out[name] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


@pytest.mark.parametrize("forced", ["local", "dropout", "fast"])
def test_a_forced_variant_runs_every_call_it_covers(forced):
    # JAX_FLASH_FORCE_VARIANT times a smaller build on this one: calls the
    # named variant covers run on it, the others as before; a name that is
    # not a compiled variant is an error naming the variable.
    from jax_flash._src import extension
    if not extension.has_kernels():
        pytest.skip("needs the compiled extension (_C.plan)")
    compiled = list(extension._C.build_info()["variants"])
    if forced != "fast" and forced not in compiled:
        pytest.skip(f"variant {forced} not compiled")
    proc = subprocess.run([sys.executable, "-c", _FORCED_PLAN], capture_output=True, text=True,
                          env={**os.environ, "JAX_FLASH_FORCE_VARIANT": forced},
                          cwd=tempfile.gettempdir(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    if forced == "fast":
        assert all("JAX_FLASH_FORCE_VARIANT must name a compiled variant" in v and "'fast'" in v
                   for v in got.values()), got
        return
    for call, needs in (("plain", set()), ("window", {"local"}), ("softcap", {"mods"}),
                        ("dropout", {"dropout"})):
        covered = needs <= _VARIANT_FEATURES[forced]
        cheapest = next(v for v in _VARIANT_FEATURES
                        if v in compiled and needs <= _VARIANT_FEATURES[v])
        assert got[call] == (forced if covered else cheapest), (call, got)


def test_packed_dtype_errors_name_the_packed_argument():
    with pytest.raises(TypeError, match="qkv must be float16 or bfloat16, got float32"):
        jax_flash.flash_attn_qkvpacked_func(jnp.ones((1, 5, 3, 2, 16), jnp.float32))
    with pytest.raises(TypeError, match="kv must be float16 or bfloat16, got float32"):
        jax_flash.flash_attn_kvpacked_func(jnp.ones((1, 5, 2, 16), jnp.bfloat16),
                                           jnp.ones((1, 5, 2, 2, 16), jnp.float32))
    with pytest.raises(TypeError, match="qkv must be float16 or bfloat16, got float32"):
        jax_flash.flash_attn_varlen_qkvpacked_func(
            jnp.ones((5, 3, 2, 16), jnp.float32), jnp.array([0, 5], jnp.int32), 5)
