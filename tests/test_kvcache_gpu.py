"""GPU: flash_attn_with_kvcache on the decode kernels (csrc/decode/,
JAX_FLASH_KVCACHE_KERNELS=1) against the reference's kv-cache
computation, FlashAttention's rule: the kernel's max error against the
float32 reference within 2x the low-precision reference's (+1e-5, +1e-4
with ALiBi); the LSE likewise (+ softcap * 1e-3 for tanh.approx); the same
empty rows (out 0, LSE +inf); the appended cache rows equal to the
reference's update (the append kernel's or JAX's).

The default grid is a fixed random sample of dtypes x head dims {64, 96,
128, 256} x seqlen_q {1, 3, 16} x contexts up to 32k x MHA/GQA/MQA x
causal / window / softcap / ALiBi x append x rotary (both styles, partial)
x contiguous / paged (page sizes 1, 16, 48, 256, random page order) x
cache_batch_idx x cache_leftpad x num_splits {0, 1, 3}; set
JAX_FLASH_KVCACHE_FULL=1 for a ten times larger sample and 32k contexts
for every dtype and head dim. Adversarial tables (lengths past the capacity
and negative, pages and batch rows out of range, left padding past the
length) must give the reference's clamped result;
scripts/sanitize_kvcache.py runs them under compute-sanitizer.
"""

import functools
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash._src import cuda_kvcache
from jax_flash._src import plan as plan_module
from jax_flash.reference import kvcache_attention_ref

from gpu_grid import requires_gpu, skip_if_not_compiled
from kvcache_cases import make_case

pytestmark = [
    requires_gpu,
    pytest.mark.skipif(not jax_flash.has_kernels(), reason="needs the compiled CUDA extension"),
]

FULL = os.environ.get("JAX_FLASH_KVCACHE_FULL") == "1"


@pytest.fixture(autouse=True)
def _decode_kernels(monkeypatch):
    """The kernels, the append kernel included, whatever the environment says
    (test_append_in_jax runs the other append)."""
    monkeypatch.setenv(cuda_kvcache.ENV_VAR, "1")
    monkeypatch.setenv(cuda_kvcache.APPEND_ENV_VAR, "1")


# ---- Running one case -----------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("opts",))
def _kernel(arrays, opts):
    """(out, lse, k_cache, v_cache) of the public function (decode kernels)."""
    res = jax_flash.flash_attn_with_kvcache(**arrays, **dict(opts), return_softmax_lse=True)
    return res if "k" in arrays else (*res, arrays["k_cache"], arrays["v_cache"])


@functools.partial(jax.jit, static_argnames=("opts",))
def _references(arrays, opts):
    """The float32 and the low-precision reference: (out, lse, k_cache, v_cache) each."""
    opts = dict(opts)
    opts.pop("num_splits", None)
    return (kvcache_attention_ref(**arrays, **opts),
            kvcache_attention_ref(**arrays, **opts, upcast=False))


def _check(case, num_splits=0, **opts):
    arrays, statics = case
    opts = tuple(sorted({**statics, **opts, "num_splits": num_splits}.items()))
    out, lse, k_cache, v_cache = _kernel(arrays, opts)
    (out32, lse32, k32, v32), (out_lo, lse_lo, _, _) = _references(arrays, opts)
    out, out32, out_lo = (np.asarray(x, np.float32) for x in (out, out32, out_lo))
    assert np.isfinite(out).all(), "kernel output has NaN/inf"
    atol = 1e-4 if "alibi_slopes" in arrays else 1e-5
    err, low_err = np.abs(out - out32).max(initial=0), np.abs(out_lo - out32).max(initial=0)
    assert err <= 2 * low_err + atol, ("out", err, low_err)
    lse, lse32, lse_lo = (np.asarray(x) for x in (lse, lse32, lse_lo))
    np.testing.assert_array_equal(np.isposinf(lse), np.isposinf(lse32))
    assert not np.isnan(lse).any() and not np.isneginf(lse).any()
    empty = np.isposinf(lse32)  # (batch, nheads, seqlen_q): rows with no visible key
    assert (out.transpose(0, 2, 1, 3)[empty] == 0).all(), "rows with no key must be 0"
    finite = ~empty
    lse_err = np.abs(lse[finite] - lse32[finite]).max(initial=0)
    lse_low = np.abs(lse_lo[finite] - lse32[finite]).max(initial=0)
    assert lse_err <= 2 * lse_low + 1e-4 + 1e-3 * dict(opts).get("softcap", 0.0), \
        ("lse", lse_err, lse_low)
    # The append kernel rotates in float32 and rounds once, as the reference
    # does; XLA may contract the reference's products into FMAs: equal up to
    # one rounding of the dtype.
    eps = float(jnp.finfo(arrays["q"].dtype).eps)
    for x, ref in ((k_cache, k32), (v_cache, v32)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(ref, np.float32),
                                   rtol=eps, atol=0)


# ---- The sampled grid ----------------------------------------------------------------

DTYPES = [jnp.float16, jnp.bfloat16]
HEAD_DIMS = [64, 96, 128, 256]
HEADS = {"mha": (8, 8), "gqa": (32, 8), "mqa": (16, 1)}
LAYOUTS = [0, 0, 1, 16, 48, 256]  # page size; 0: contiguous
CONTEXTS = [1, 77, 1000, 4096, 8192]
MODS = [dict(), dict(causal=True), dict(window_size=(64, 0)), dict(window_size=(300, 16)),
        dict(softcap=30.0), dict(alibi=True), dict(causal=True, alibi=True),
        dict(window_size=(100, -1), softcap=5.0)]


def _sample(n, seed):
    rnd = random.Random(seed)
    cases = []
    for i in range(n):
        head_dim, page_size = rnd.choice(HEAD_DIMS), rnd.choice(LAYOUTS)
        seqlen_new = rnd.choice([0, 0, 1, 4])
        rotary = None
        if seqlen_new and rnd.random() < 0.6:
            rotary = (rnd.choice([16, 32, head_dim]), rnd.random() < 0.5)
        mods = dict(rnd.choice(MODS))
        context = rnd.choice(CONTEXTS + ([32768] if rnd.random() < 0.1 else []))
        cases.append(dict(
            case=dict(seed=1000 + i, dtype=rnd.choice(DTYPES), batch=rnd.choice([1, 2, 3]),
                      head_dim=head_dim, heads=HEADS[rnd.choice(list(HEADS))],
                      seqlen_q=rnd.choice([1, 3, 16]), seqlen_cache=context,
                      page_size=page_size, seqlen_new=seqlen_new, rotary=rotary,
                      batch_idx=not page_size and rnd.random() < 0.3,
                      leftpad=not page_size and rnd.random() < 0.3,
                      alibi=mods.pop("alibi", False)),
            num_splits=rnd.choice([0, 0, 1, 3]), opts=mods))
    return cases


def _case_id(c):
    k = c["case"]
    dt = "fp16" if k["dtype"] == jnp.float16 else "bf16"
    layout = f"page{k['page_size']}" if k["page_size"] else "contig"
    return (f"{c['case']['seed']}-{dt}-d{k['head_dim']}-h{k['heads'][0]}x{k['heads'][1]}"
            f"-q{k['seqlen_q']}-s{k['seqlen_cache']}-{layout}-new{k['seqlen_new']}"
            f"-splits{c['num_splits']}")


@pytest.mark.parametrize("sample", _sample(1200 if FULL else 120, seed=0), ids=_case_id)
def test_kernel_matches_reference(sample):
    skip_if_not_compiled(sample["case"]["head_dim"])
    _check(make_case(**sample["case"]), sample["num_splits"], **sample["opts"])


@pytest.mark.parametrize("head_dim", HEAD_DIMS if FULL else [128])
@pytest.mark.parametrize("dtype", DTYPES if FULL else [jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("page_size", [0, 16, 256])
def test_long_context(dtype, head_dim, page_size):
    skip_if_not_compiled(head_dim)
    case = make_case(7, dtype=dtype, batch=2, head_dim=head_dim, heads=HEADS["gqa"],
                     seqlen_q=1, seqlen_cache=32768, page_size=page_size, seqlen_new=1,
                     rotary=(head_dim, False))
    _check(case, 0, causal=True)


# ---- Targeted cases -----------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [0, 1, 16, 48])
@pytest.mark.parametrize("num_splits", [1, 3, 0])
def test_adversarial_tables_are_clamped(page_size, num_splits):
    skip_if_not_compiled(64)
    case = make_case(11, batch=4, head_dim=64, heads=HEADS["gqa"], seqlen_q=3,
                     seqlen_cache=300, page_size=page_size, seqlen_new=2, rotary=(32, True),
                     batch_idx=not page_size, leftpad=not page_size, adversarial=True)
    _check(case, num_splits, causal=True)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 17, 128])
@pytest.mark.parametrize("head_dim", [64, 128, 256])  # the combine's columns: < 32, 32, 2 x 32
def test_num_splits_has_no_effect_beyond_rounding(num_splits, head_dim):
    skip_if_not_compiled(head_dim)
    case = make_case(12, batch=2, head_dim=head_dim, heads=HEADS["gqa"], seqlen_q=3,
                     seqlen_cache=5000, page_size=16)
    _check(case, num_splits, window_size=(2000, 0))
    arrays, _ = case
    one = _kernel(arrays, (("num_splits", 1),))[0]
    many = _kernel(arrays, (("num_splits", num_splits),))[0]
    np.testing.assert_allclose(np.asarray(one, np.float32), np.asarray(many, np.float32),
                               atol=2e-2, rtol=0)


@pytest.mark.parametrize("heads,seqlen_q", [((32, 1), 16), ((64, 4), 5), ((16, 16), 1)])
def test_many_rows_per_kv_head(heads, seqlen_q):
    # M = nheads / nheads_k * seqlen_q rows per K/V head: 512 and 80 need
    # several row blocks, 1 leaves most of a 16-row slab empty.
    for head_dim in (64, 256):
        skip_if_not_compiled(head_dim)
        _check(make_case(13, batch=2, head_dim=head_dim, heads=heads, seqlen_q=seqlen_q,
                         seqlen_cache=700), 0, causal=True)


@pytest.mark.parametrize("head_dim", [40, 59, 100])
def test_head_dims_padded_to_8(head_dim):
    skip_if_not_compiled(head_dim)
    _check(make_case(14, head_dim=head_dim, heads=HEADS["gqa"], seqlen_q=2, seqlen_cache=200,
                     seqlen_new=1), 0)


@pytest.mark.parametrize("fold", ["1", "0"])
@pytest.mark.parametrize("head_dim,heads,seqlen_q,page_size", [
    (64, (32, 8), 1, 0), (64, (8, 8), 2, 16), (32, (32, 8), 1, 0), (32, (16, 16), 3, 48)])
def test_folded_heads(monkeypatch, fold, head_dim, heads, seqlen_q, page_size):
    # Head dims 32 and 64 run on the d=128 kernel with K/V heads folded
    # (JAX_FLASH_KVCACHE_FOLD, read at trace time) or on their own.
    skip_if_not_compiled(head_dim)
    skip_if_not_compiled(128)
    monkeypatch.setenv(cuda_kvcache.FOLD_ENV_VAR, fold)
    jax.clear_caches()
    try:
        case = make_case(17, head_dim=head_dim, heads=heads, seqlen_q=seqlen_q, seqlen_cache=300,
                         page_size=page_size, seqlen_new=1, alibi=True)
        text = jax.jit(lambda a: jax_flash.flash_attn_with_kvcache(**a)).lower(case[0]).as_text()
        assert ("x128xbf16>" in text) == (fold == "1")
        for num_splits in (0, 1, 3):
            _check(case, num_splits, causal=True)
    finally:
        jax.clear_caches()


COPY_ENGINE_HEAD_DIMS = [64, 128, 192, 256]
COPY_ENGINE_PAGES = [0, 8, 16, 32, 64, 128, 256]


def _copy_engine_expected(head_dim, page_size):
    # By default contiguous caches and pages of a multiple of 64 keys;
    # JAX_FLASH_DECODE_COPY=tma every page it serves, =cp_async none.
    major = int(str(jax.devices()[0].compute_capability).split(".")[0])
    setting = os.environ.get("JAX_FLASH_DECODE_COPY")
    pages = (COPY_ENGINE_PAGES if setting == "tma" else [] if setting == "cp_async"
             else [p for p in COPY_ENGINE_PAGES if p % 64 == 0])
    return major >= 9 and head_dim in COPY_ENGINE_HEAD_DIMS and page_size in pages


@pytest.mark.parametrize("head_dim,page_size", [
    (64, 0), (64, 16), (128, 0), (128, 16), (128, 8), (256, 256), (128, 48), (128, 4), (128, 1),
    (96, 0), (120, 0)])
def test_the_plan_names_the_copy(head_dim, page_size):
    # sm_90's copy engine: narrow tiles of d = 64 * k, on the pages the
    # setting gives it (_copy_engine_expected).
    skip_if_not_compiled(head_dim)
    plan = plan_module.kvcache_plan_for(2, 1, 32, 8, head_dim, 4096, 0, page_size=page_size)
    assert plan.narrow
    assert plan.copy_engine == _copy_engine_expected(head_dim, page_size), plan
    if head_dim == 64:  # the two d=64 tiles (decode/tile.h)
        assert plan.stages == (6 if plan.copy_engine else 4), plan


@pytest.mark.parametrize("page_size", [0, 8, 32, 64, 128])
@pytest.mark.parametrize("head_dim", [64, 128, 192, 256])
def test_copy_engine_pages_and_edges(head_dim, page_size):
    # Boxes of a page or of 64 keys, tiles cut by lengths, left padding,
    # windows and splits on every head dim the copy engine serves (each
    # copy the plan says, on any device).
    skip_if_not_compiled(head_dim)
    for seed, (seqlen_q, heads, opts) in enumerate([
            (1, HEADS["gqa"], dict(causal=True)),
            (3, HEADS["mqa"], dict(window_size=(300, 16))),
            (16, (16, 16), dict(softcap=30.0))]):
        case = make_case(40 + seed, batch=3, head_dim=head_dim, heads=heads, seqlen_q=seqlen_q,
                         seqlen_cache=1000 + 37 * seed, page_size=page_size, seqlen_new=seed % 2,
                         batch_idx=not page_size, leftpad=not page_size)
        for num_splits in (0, 1, 3):
            _check(case, num_splits, **opts)


@pytest.mark.parametrize("page_size", [0, 16, 48, 256])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rows_never_seen_may_hold_nan(head_dim, page_size):
    # Cache rows outside [cache_leftpad, cache_seqlens) and pages the table
    # does not name hold NaN: the output is the reference's on a cache
    # without them (the kernels read such rows only to discard them).
    skip_if_not_compiled(head_dim)
    arrays, statics = make_case(50, batch=3, head_dim=head_dim, heads=HEADS["gqa"],
                                seqlen_cache=777, page_size=page_size, leftpad=not page_size)
    lengths = np.asarray(arrays["cache_seqlens"])
    seen = np.zeros(arrays["k_cache"].shape[:2], bool)  # (pages or batch rows, rows)
    for b, length in enumerate(lengths):
        if page_size:
            for j in range(length):
                seen[np.asarray(arrays["block_table"])[b, j // page_size], j % page_size] = True
        else:
            pad = min(int(np.asarray(arrays["cache_leftpad"])[b]), int(length))
            seen[b, pad:length] = True
    poisoned = dict(arrays)
    for name in ("k_cache", "v_cache"):
        x = np.asarray(arrays[name], np.float32).copy()
        x[~seen] = np.nan
        poisoned[name] = jnp.asarray(x, arrays[name].dtype)
    for num_splits in (0, 1, 3):
        opts = tuple(sorted({**statics, "num_splits": num_splits, "causal": True}.items()))
        out = np.asarray(_kernel(poisoned, opts)[0], np.float32)
        want = np.asarray(_kernel(arrays, opts)[0], np.float32)
        assert np.isfinite(out).all(), (num_splits, "NaN from rows never seen")
        np.testing.assert_array_equal(out, want)
    _check((arrays, statics), 0, causal=True)


def test_no_visible_key_gives_zero_and_inf():
    skip_if_not_compiled(64)
    arrays, _ = make_case(15, batch=2, head_dim=64, seqlen_cache=128)
    arrays = dict(arrays, cache_seqlens=jnp.zeros((2,), jnp.int32))
    out, lse = jax_flash.flash_attn_with_kvcache(**arrays, return_softmax_lse=True)
    assert (np.asarray(out, np.float32) == 0).all() and np.isposinf(np.asarray(lse)).all()


def test_the_switch_selects_the_kernel(monkeypatch):
    arrays, _ = make_case(16, head_dim=64, seqlen_cache=128)
    f = lambda a: jax_flash.flash_attn_with_kvcache(**a)
    assert "jax_flash_kvcache_fwd" in jax.jit(f).lower(arrays).as_text()
    monkeypatch.setenv(cuda_kvcache.ENV_VAR, "0")
    assert "jax_flash_kvcache_fwd" not in jax.jit(lambda a: f(a) + 0).lower(arrays).as_text()


def test_the_append_switch_selects_the_append_kernel(monkeypatch):
    skip_if_not_compiled(64)
    arrays, statics = make_case(16, head_dim=64, seqlen_cache=128, seqlen_new=1,
                                rotary=(32, False))
    f = lambda a: jax_flash.flash_attn_with_kvcache(**a, **statics)
    assert "jax_flash_kvcache_append" in jax.jit(f).lower(arrays).as_text()
    # The switch is read when a call is traced: drop the traces made with it on.
    jax.clear_caches()
    monkeypatch.setenv(cuda_kvcache.APPEND_ENV_VAR, "0")
    try:
        assert "jax_flash_kvcache_append" not in jax.jit(f).lower(arrays).as_text()
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("page_size", [0, 16])
def test_append_in_jax(monkeypatch, page_size):
    # JAX_FLASH_KVCACHE_APPEND=0: XLA's rotary and scatter before the decode
    # kernels. Traces made with the other switch are dropped before and after.
    skip_if_not_compiled(128)
    jax.clear_caches()
    monkeypatch.setenv(cuda_kvcache.APPEND_ENV_VAR, "0")
    try:
        _check(make_case(21, batch=3, head_dim=128, heads=HEADS["gqa"], seqlen_q=2,
                         seqlen_cache=500, page_size=page_size, seqlen_new=3,
                         rotary=(64, False), batch_idx=not page_size,
                         leftpad=not page_size), 0, causal=True)
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("page_size", [0, 16])
def test_shared_slots_keep_the_last_write(page_size):
    # Two sequences writing the same slots (one cache row by cache_batch_idx,
    # or the same pages by block_table): the later sequence's rows stay, as
    # in the reference, and both sequences read them.
    skip_if_not_compiled(64)
    arrays, statics = make_case(22, batch=4, head_dim=64, heads=HEADS["gqa"], seqlen_q=2,
                                seqlen_cache=64, page_size=page_size, seqlen_new=2,
                                rotary=(32, True), batch_idx=not page_size)
    if page_size:
        arrays["block_table"] = arrays["block_table"].at[2].set(arrays["block_table"][0])
    else:
        idx = arrays["cache_batch_idx"]
        arrays["cache_batch_idx"] = idx.at[3].set(idx[1])
    arrays["cache_seqlens"] = jnp.full((4,), 10, jnp.int32)
    _check((arrays, statics), 0, causal=True)


def test_donated_caches_are_updated_in_place():
    skip_if_not_compiled(128)
    arrays, _ = make_case(17, batch=8, head_dim=128, heads=HEADS["gqa"], seqlen_cache=16384,
                          seqlen_new=1, page_size=16)
    names = ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "block_table")

    def step(*xs):
        out, k_cache, v_cache = jax_flash.flash_attn_with_kvcache(**dict(zip(names, xs)))
        return out, k_cache, v_cache

    xs = [arrays[n] for n in names]
    compiled = jax.jit(step, donate_argnums=(1, 2)).lower(*xs).compile()
    stats = compiled.memory_analysis()
    cache_bytes = arrays["k_cache"].nbytes
    assert stats.alias_size_in_bytes >= 2 * cache_bytes
    # No copy of a cache: the scratch is the split buffers and the new rows.
    assert stats.temp_size_in_bytes < cache_bytes // 4, stats
    ref = _references(arrays, ())[0]
    out, k_cache, _ = compiled(*[jnp.array(x) for x in xs])
    np.testing.assert_array_equal(np.asarray(k_cache), np.asarray(ref[2]))


def test_decode_loop_copies_no_cache():
    # A fori_loop of appending decode steps with the caches in the carry:
    # no cache-sized scratch, and the caches hold every appended row.
    skip_if_not_compiled(128)
    steps = 4
    arrays, _ = make_case(19, batch=8, head_dim=128, heads=HEADS["gqa"], seqlen_cache=8192,
                          seqlen_new=1, page_size=64)
    rng = np.random.default_rng(0)
    new = {n: jnp.asarray(rng.standard_normal((steps, *arrays[n].shape)), arrays[n].dtype)
           for n in ("q", "k", "v")}
    start = jnp.minimum(arrays["cache_seqlens"], 8192 - steps)

    def decode(k_cache, v_cache, new):
        def step(i, carry):
            k_cache, v_cache, total = carry
            out, k_cache, v_cache = jax_flash.flash_attn_with_kvcache(
                new["q"][i], k_cache, v_cache, new["k"][i], new["v"][i],
                cache_seqlens=start + i, block_table=arrays["block_table"], causal=True)
            return k_cache, v_cache, total + out.astype(jnp.float32).sum()
        return jax.lax.fori_loop(0, steps, step, (k_cache, v_cache, jnp.float32(0)))

    args = (arrays["k_cache"], arrays["v_cache"], new)
    compiled = jax.jit(decode, donate_argnums=(0, 1)).lower(*args).compile()
    stats = compiled.memory_analysis()
    cache_bytes = arrays["k_cache"].nbytes
    assert stats.alias_size_in_bytes >= 2 * cache_bytes
    assert stats.temp_size_in_bytes < cache_bytes // 4, stats
    expect_k = np.asarray(arrays["k_cache"]).copy()
    k_cache, _, _ = compiled(jnp.array(arrays["k_cache"]), jnp.array(arrays["v_cache"]), new)
    table, page = np.asarray(arrays["block_table"]), arrays["k_cache"].shape[1]
    for b in range(8):
        for i in range(steps):
            pos = int(start[b]) + i
            row = np.clip(table[b, pos // page], 0, expect_k.shape[0] - 1)
            expect_k[row, pos % page] = np.asarray(new["k"][i, b, 0])
    np.testing.assert_array_equal(np.asarray(k_cache), expect_k)


def test_vmap_runs_each_element():
    skip_if_not_compiled(64)
    arrays, _ = make_case(18, batch=2, head_dim=64, seqlen_cache=100, seqlen_new=1)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x[::-1] if x.ndim else x]), arrays)
    outs = jax.vmap(lambda a: jax_flash.flash_attn_with_kvcache(**a))(stacked)
    for i in range(2):
        one = jax_flash.flash_attn_with_kvcache(**jax.tree.map(lambda x: x[i], stacked))
        for x, y in zip(outs, one):
            np.testing.assert_array_equal(np.asarray(x[i]), np.asarray(y))


@pytest.mark.parametrize("change,match", [
    (dict(lse=(2, 4, 2)), r"lse must be float32 \(batch, nheads, seqlen_q\)"),
    (dict(splits=1), r"the split scratch must be float32 out_accum"),
    (dict(paged=False), r"block_table must be empty for a contiguous cache"),
    (dict(seqlen_new=10 ** 6), r"seqlen_new must be in \[0, seqlen_cache"),
])
def test_handler_errors_name_the_argument(change, match):
    # The FFI handler checks what Python sized (host/kvcache.cc); called
    # directly, a wrong shape or attribute is an error naming it.
    from jax_flash._src import extension

    skip_if_not_compiled(64)
    extension.kernels_or_raise()
    arrays, _ = make_case(19, batch=2, head_dim=64, seqlen_q=1, seqlen_cache=64, page_size=16)
    batch, seqlen_q, nheads, _ = arrays["q"].shape
    splits = change.get("splits", 0)
    scratch = ((splits, batch, nheads, seqlen_q, 64), (splits, batch, nheads, seqlen_q)) \
        if splits else ((0,), (0,))
    out_types = (jax.ShapeDtypeStruct(arrays["q"].shape, arrays["q"].dtype),
                 jax.ShapeDtypeStruct(change.get("lse", (batch, nheads, seqlen_q)), jnp.float32),
                 jax.ShapeDtypeStruct(scratch[0], jnp.float32),
                 jax.ShapeDtypeStruct(scratch[1], jnp.float32))
    empty = jnp.zeros((0,), jnp.int32)
    call = jax.ffi.ffi_call("jax_flash_kvcache_fwd", out_types)
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(call(
            arrays["q"], arrays["k_cache"], arrays["v_cache"], arrays["cache_seqlens"], empty,
            empty, arrays["block_table"], jnp.zeros((0,), jnp.float32),
            softmax_scale=np.float32(0.125), window_left=np.int32(-1),
            window_right=np.int32(-1), softcap=np.float32(0),
            seqlen_new=np.int32(change.get("seqlen_new", 0)), paged=change.get("paged", True)))
