"""Folded K/V heads (jax_flash/_src/cuda_kvcache.py): when head dims 32 and
64 run as one head of dim 128, and that the folding is exact: the reference
run on folded q and caches, then unfolded, gives the reference's own result.
On CPU; tests/test_kvcache_gpu.py runs the kernels folded and not. Also
the values the kv-cache switches (fold, kernels, append kernel) take."""

import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash._src import cuda_kvcache
from jax_flash._src import kvcache as kvcache_lib
from jax_flash._src import kvcache_ref

from kvcache_cases import make_case

BUILD = (32, 64, 128, 256)  # head dims of a build, for fold_factor


def _spec(**kw):
    base = dict(batch=2, seqlen_q=1, nheads=32, nheads_k=8, head_dim=64, dtype="bfloat16",
                seqlen_cache=256, batch_cache=2, softmax_scale=0.125)
    return kvcache_lib.KVCacheSpec(**{**base, **kw})


@pytest.mark.parametrize("kw,fold", [
    (dict(), 2),                                   # GQA 4: 8 folded rows
    (dict(seqlen_q=2), 2),                         # 16 rows: still the narrow tile
    (dict(seqlen_q=3), 1),                         # 24 rows: not
    (dict(head_dim=32), 4),                        # 16 rows
    (dict(head_dim=32, nheads=8, nheads_k=8, seqlen_q=3), 4),
    (dict(head_dim=32, nheads=12, nheads_k=6), 1),  # 6 K/V heads: no group of 4
    (dict(nheads=16, nheads_k=1), 1),              # MQA: nothing to fold with
    (dict(head_dim=128), 1),
    (dict(head_dim=96), 1),
    (dict(head_dim=40), 1),
    (dict(paged=True, page_size=16), 2),
])
def test_fold_factor(monkeypatch, kw, fold):
    monkeypatch.delenv(cuda_kvcache.FOLD_ENV_VAR, raising=False)
    spec = _spec(**kw)
    auto = fold if spec.head_dim in cuda_kvcache.FOLD_AUTO_HEAD_DIMS else 1
    assert cuda_kvcache.fold_factor(spec, BUILD) == auto  # unset: "auto"
    assert cuda_kvcache.fold_factor(spec, BUILD, "auto") == auto
    assert cuda_kvcache.fold_factor(spec, BUILD, "always") == fold
    assert cuda_kvcache.fold_factor(spec, BUILD, "never") == 1
    monkeypatch.setenv(cuda_kvcache.FOLD_ENV_VAR, "1")
    assert cuda_kvcache.fold_factor(spec, BUILD) == fold
    assert cuda_kvcache.fold_factor(spec, (32, 64, 256)) == 1  # no d=128 kernel to run on
    folded = cuda_kvcache.fold_spec(spec, fold)
    assert (folded.nheads_k * fold, folded.head_dim) == (spec.nheads_k, spec.head_dim * fold)
    monkeypatch.setenv(cuda_kvcache.FOLD_ENV_VAR, "0")
    assert cuda_kvcache.fold_factor(spec, BUILD) == 1


# plan_splits, per_sm: what the plan gives the folded problem (as it does on
# an H100 for 8 K/V heads: one split from batch 32 at 8k, four at batch 8,
# one block per SM; on an H200 two blocks per SM and twice the splits).
@pytest.mark.parametrize("kw,plan_splits,per_sm,folds", [
    (dict(seqlen_cache=8192), 1, 1, True),     # one split
    (dict(seqlen_cache=32768), 4, 1, True),    # four of 8192 keys
    (dict(seqlen_cache=8192), 4, 1, False),    # four of 2048 keys: too short
    (dict(seqlen_cache=131072), 16, 1, False),  # too many splits (batch 1)
    (dict(seqlen_cache=32768), 8, 2, True),    # two blocks per SM: 4 per block
    (dict(seqlen_cache=32768), 8, 1, False),   # one: too many
    (dict(seqlen_cache=8192), 8, 2, False),    # 1024 keys each: too short
    (dict(seqlen_cache=131072), 16, 2, False),  # 8 per block
    (dict(seqlen_cache=32768, num_splits=3), 3, 1, True),  # asked for: kept
    (dict(seqlen_cache=32768, num_splits=8), 8, 1, False),
    (dict(seqlen_cache=128, num_splits=8), 2, 1, False),  # clamped by the plan to 2 tiles: too short
    (dict(seqlen_cache=32768, paged=True, page_size=64), 4, 1, True),
    (dict(seqlen_cache=32768, paged=True, page_size=16), 4, 1, False),  # pages too short
    (dict(seqlen_cache=32768, paged=True, page_size=16), 8, 2, True),  # not with two blocks
    (dict(seqlen_cache=32768, paged=True, page_size=8), 8, 2, False),  # too short for both
    (dict(seqlen_cache=32768, paged=True, page_size=48), 4, 1, False),
    (dict(seqlen_cache=32768, paged=True, page_size=48), 4, 2, True),
])
def test_folded_calls_split_as_the_plan_splits_the_folded_problem(monkeypatch, kw, plan_splits,
                                                                   per_sm, folds):
    monkeypatch.delenv(cuda_kvcache.FOLD_ENV_VAR, raising=False)  # "auto"
    spec = _spec(**kw)
    asked = []

    def plan_of(s):
        asked.append(s)
        return types.SimpleNamespace(num_splits=plan_splits, blocks_per_sm=per_sm)

    folded = cuda_kvcache.fold_spec(spec, 2)
    kernel_spec, fold = cuda_kvcache.kernel_spec_and_fold(spec, BUILD, plan_of)
    # 4 K/V heads of dim 128, the request as given, as if contiguous
    assert asked == [dataclasses.replace(folded, paged=False, page_size=0)]
    run = dataclasses.replace(folded, num_splits=plan_splits)
    assert (kernel_spec, fold) == ((run, 2) if folds else (spec, 1))
    # "always" folds whatever the splits and pages; "never" does not fold.
    assert cuda_kvcache.kernel_spec_and_fold(spec, BUILD, plan_of, "always") == (run, 2)
    assert cuda_kvcache.kernel_spec_and_fold(spec, BUILD, plan_of, "never") == (spec, 1)


def test_the_fold_asks_the_plan_of_the_device(monkeypatch):
    monkeypatch.delenv(cuda_kvcache.FOLD_ENV_VAR, raising=False)
    asked = []

    def plan(spec):
        asked.append(spec)
        return types.SimpleNamespace(num_splits=3, blocks_per_sm=1)

    monkeypatch.setattr(cuda_kvcache.plan_lib, "kvcache_plan", plan)
    spec = _spec(seqlen_cache=32768, num_splits=5)
    kernel_spec, fold = cuda_kvcache.kernel_spec_and_fold(spec, BUILD)
    assert asked == [cuda_kvcache.fold_spec(spec, 2)]
    assert (kernel_spec.num_splits, fold) == (3, 2)


def test_fold_q_and_unfold_out_place_each_head():
    # Head i of K/V head k keeps its values in column block k % fold; the
    # output's block k % fold comes back as head i's output.
    b, s, nheads, nheads_k, d, fold = 2, 3, 8, 4, 4, 2
    q = jnp.arange(b * s * nheads * d, dtype=jnp.float32).reshape(b, s, nheads, d) + 1
    wide = np.asarray(cuda_kvcache.fold_q(q, fold, nheads_k))
    group = nheads // nheads_k
    for head in range(nheads):
        block = (head // group) % fold
        np.testing.assert_array_equal(wide[:, :, head, block * d:(block + 1) * d], q[:, :, head])
        others = np.delete(wide[:, :, head].reshape(b, s, fold, d), block, axis=2)
        assert (others == 0).all()
    np.testing.assert_array_equal(cuda_kvcache.unfold_out(wide, fold, nheads_k), q)
    # Traced without constants: the kernel call runs inside custom_partitioning,
    # whose body may close over none.
    for fn in (lambda x: cuda_kvcache.fold_q(x, fold, nheads_k),
               lambda x: cuda_kvcache.unfold_out(cuda_kvcache.fold_q(x, fold, nheads_k), fold,
                                                 nheads_k)):
        assert not jax.make_jaxpr(fn)(q).consts


CASES = [
    dict(head_dim=64, heads=(32, 8)),
    dict(head_dim=64, heads=(8, 8), seqlen_q=3, alibi=True),
    dict(head_dim=32, heads=(16, 4), page_size=16),
    dict(head_dim=32, heads=(8, 8), leftpad=True, batch_idx=True),
    dict(head_dim=64, heads=(16, 4), seqlen_q=2, page_size=7, seqlen_new=2, rotary=(32, False)),
]
OPTS = [dict(), dict(causal=True), dict(window_size=(20, 0), softcap=5.0)]


@pytest.mark.parametrize("opts", OPTS, ids=["plain", "causal", "window-softcap"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_folded_reference_equals_reference(case, opts):
    arrays, statics = make_case(7, dtype=jnp.float16, seqlen_cache=90, **case)
    spec, ops = kvcache_lib.bind(**arrays, **statics, **opts, return_softmax_lse=True)
    xs = tuple(arrays.get(n) for n in ("q", "k_cache", "v_cache", "k", "v"))
    q, k_cache, v_cache = kvcache_ref.update(spec, xs, ops)
    out, lse = kvcache_ref.attend(spec, q, k_cache, v_cache, ops)

    fold = 128 // spec.head_dim
    folded = cuda_kvcache.fold_spec(spec, fold)
    out_f, lse_f = kvcache_ref.attend(
        folded, cuda_kvcache.fold_q(q, fold, spec.nheads_k),
        cuda_kvcache.fold_cache(k_cache, fold), cuda_kvcache.fold_cache(v_cache, fold), ops)
    out_f = cuda_kvcache.unfold_out(out_f, fold, spec.nheads_k)
    # The same sums with zeros added: equal up to float32 summation order,
    # then one rounding to float16.
    np.testing.assert_allclose(np.asarray(out_f, np.float32), np.asarray(out, np.float32),
                               atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(np.asarray(lse_f), np.asarray(lse), atol=1e-5, rtol=1e-5)
    assert dataclasses.replace(folded, nheads_k=spec.nheads_k, head_dim=spec.head_dim) == spec


# ---- The kv-cache switches take "1", "0" or unset, nothing else ----

SWITCHES = [  # variable, reader, its value unset / "1" / "0"
    (cuda_kvcache.ENV_VAR, cuda_kvcache.enabled, (cuda_kvcache.DEFAULT, True, False)),
    (cuda_kvcache.APPEND_ENV_VAR, cuda_kvcache.append_enabled,
     (cuda_kvcache.APPEND_DEFAULT, True, False)),
    (cuda_kvcache.FOLD_ENV_VAR, cuda_kvcache.fold_mode, ("auto", "always", "never")),
]


@pytest.mark.parametrize("name,read,values", SWITCHES, ids=[s[0] for s in SWITCHES])
def test_switch_values(monkeypatch, name, read, values):
    monkeypatch.delenv(name, raising=False)
    got = [read()]
    for text in ("1", "0"):
        monkeypatch.setenv(name, text)
        got.append(read())
    assert tuple(got) == values
    for text in ("true", "on", "2", " 1", "auto"):
        monkeypatch.setenv(name, text)
        with pytest.raises(ValueError, match=re.escape(
                f"environment variable {name}: expected '1', '0' or unset, got {text!r}")):
            read()


@pytest.mark.parametrize("name", [s[0] for s in SWITCHES])
def test_a_misspelt_switch_stops_the_call_when_traced(monkeypatch, name):
    arrays, statics = make_case(3, head_dim=64, heads=(8, 2))
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=name):
        jax.jit(lambda a: jax_flash.flash_attn_with_kvcache(**a, **statics))(arrays)
    monkeypatch.delenv(name)
    out = jax.jit(lambda a: jax_flash.flash_attn_with_kvcache(**a, **statics))(arrays)
    assert out.shape == arrays["q"].shape
