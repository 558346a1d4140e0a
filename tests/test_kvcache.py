"""flash_attn_with_kvcache on CPU: the reference against an independent float64
NumPy loop, paged vs contiguous caches, the clamping rules, jit/vmap and every
validation message."""

import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import flash_attn_with_kvcache
from jax_flash._src import backend as backend_lib
from jax_flash._src import cuda_kvcache
from jax_flash._src import kvcache as kvcache_lib
from jax_flash._src import kvcache_ref

OUT_TOL = dict(atol=4e-3, rtol=4e-3)
LSE_TOL = dict(atol=2e-3, rtol=2e-3)
ROT_TOL = dict(atol=4e-3, rtol=4e-3)  # rotated rows: float32 vs float64 rounding to fp16

BATCH, SEQLEN_CACHE, HEAD_DIM = 3, 48, 32


def rand(rs, *shape, dtype=np.float16):
    return rs.standard_normal(shape).astype(dtype)


def rotary_tables(rs, seqlen_ro, rotary_dim):
    freq = rs.uniform(0.01, 1.0, rotary_dim // 2)
    angle = np.arange(seqlen_ro)[:, None] * freq[None, :] + rs.uniform(0, 1, rotary_dim // 2)
    return np.cos(angle).astype(np.float16), np.sin(angle).astype(np.float16)


def make_case(seed, *, nheads=4, nheads_k=2, seqlen_q=1, seqlen_new=0, rotary_dim=0,
              batch_cache=None, seqlen_cache=SEQLEN_CACHE):
    rs = np.random.RandomState(seed)
    batch_cache = BATCH if batch_cache is None else batch_cache
    case = dict(
        q=rand(rs, BATCH, seqlen_q, nheads, HEAD_DIM),
        k_cache=rand(rs, batch_cache, seqlen_cache, nheads_k, HEAD_DIM),
        v_cache=rand(rs, batch_cache, seqlen_cache, nheads_k, HEAD_DIM),
        cache_seqlens=rs.randint(0, seqlen_cache - seqlen_new + 1, BATCH).astype(np.int32),
    )
    case["cache_seqlens"][0] = seqlen_cache - seqlen_new  # one full after the append
    if seqlen_new:
        case["k"] = rand(rs, BATCH, seqlen_new, nheads_k, HEAD_DIM)
        case["v"] = rand(rs, BATCH, seqlen_new, nheads_k, HEAD_DIM)
    if rotary_dim:
        case["rotary_cos"], case["rotary_sin"] = rotary_tables(rs, seqlen_cache + 5, rotary_dim)
    return case


def call(case, **opts):
    """The public function, always as (out, lse, k_cache, v_cache)."""
    res = flash_attn_with_kvcache(**{n: jnp.asarray(x) if isinstance(x, np.ndarray) else x
                                     for n, x in case.items()}, return_softmax_lse=True, **opts)
    if "k" not in case:
        return (*res, case["k_cache"], case["v_cache"])
    return res


# ----------------------------------------------------------------------------
# Oracle: explicit positions, per batch element, head and query row, float64.
# ----------------------------------------------------------------------------


def rope(x, cos, sin, pos, interleaved):
    """x (d,) float64 rotated at position pos (clamped into the table)."""
    pos = min(max(pos, 0), cos.shape[0] - 1)
    half = cos.shape[1]
    y = x.copy()
    for j in range(half):
        a, b = (2 * j, 2 * j + 1) if interleaved else (j, j + half)
        c, s = float(cos[pos, j]), float(sin[pos, j])
        y[a] = x[a] * c - x[b] * s
        y[b] = x[a] * s + x[b] * c
    return y


def oracle(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
           cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
           rotary_interleaved=True, alibi_slopes=None, num_splits=0):
    dtype = q.dtype
    batch, seqlen_q, nheads, d = q.shape
    nheads_k = k_cache.shape[2]
    kc, vc = np.array(k_cache), np.array(v_cache)
    if block_table is not None:
        num_blocks, page_size = kc.shape[:2]
        seqlen_cache = block_table.shape[1] * page_size

        def slot(b, p):
            return min(max(int(block_table[b, p // page_size]), 0), num_blocks - 1), p % page_size
    else:
        seqlen_cache = kc.shape[1]

        def slot(b, p):
            row = b if cache_batch_idx is None else int(cache_batch_idx[b])
            return min(max(row, 0), kc.shape[0] - 1), p

    n = 0 if k is None else k.shape[1]
    if cache_seqlens is None:
        cache_seqlens = seqlen_cache
    seqlens = np.broadcast_to(np.asarray(cache_seqlens, np.int64), (batch,))
    c = [min(max(int(x), 0), seqlen_cache - n) for x in seqlens]
    lp = [0] * batch if cache_leftpad is None else [
        min(max(int(cache_leftpad[b]), 0), c[b]) for b in range(batch)]
    left, right = window_size
    if causal:
        right = 0
    per_row = any(0 <= w < seqlen_cache for w in (left, right))
    rotary = rotary_cos is not None
    for b in range(batch):
        for i in range(n):
            for hk in range(nheads_k):
                kn = k[b, i, hk].astype(np.float64)
                if rotary:
                    kn = rope(kn, rotary_cos, rotary_sin, c[b] - lp[b] + i, rotary_interleaved)
                kc[slot(b, c[b] + i) + (hk,)] = kn.astype(dtype)
                vc[slot(b, c[b] + i) + (hk,)] = v[b, i, hk]
    scale = 1 / math.sqrt(d) if softmax_scale is None else softmax_scale
    slopes = None if alibi_slopes is None else np.broadcast_to(alibi_slopes, (batch, nheads))
    out = np.zeros((batch, seqlen_q, nheads, d))
    lse = np.full((batch, nheads, seqlen_q), np.inf)
    for b in range(batch):
        length = c[b] + n
        keys = np.stack([kc[slot(b, p)] for p in range(seqlen_cache)]).astype(np.float64)
        values = np.stack([vc[slot(b, p)] for p in range(seqlen_cache)]).astype(np.float64)
        for h in range(nheads):
            hk = h // (nheads // nheads_k)
            for i in range(seqlen_q):
                qi = q[b, i, h].astype(np.float64)
                if rotary:
                    pos = c[b] - lp[b] + (i if per_row else 0)
                    qi = rope(qi, rotary_cos, rotary_sin, pos, rotary_interleaved)
                    qi = qi.astype(dtype).astype(np.float64)
                pos = length - seqlen_q + i
                cols = [j for j in range(lp[b], length)
                        if (left < 0 or j >= pos - left) and (right < 0 or j <= pos + right)]
                if not cols:
                    continue
                s = np.array([scale * np.dot(qi, keys[j, hk]) for j in cols])
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                if slopes is not None:
                    s = s - slopes[b, h] * np.abs(np.array(cols) - pos)
                m = s.max()
                p = np.exp(s - m)
                lse[b, h, i] = m + np.log(p.sum())
                out[b, i, h] = (p / p.sum()) @ values[cols, hk]
    return out, lse, kc, vc


def check(case, res=None, rot=False, **opts):
    out, lse, k_upd, v_upd = call(case, **opts) if res is None else res
    ref_out, ref_lse, ref_k, ref_v = oracle(**case, **opts)
    assert out.dtype == case["q"].dtype and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, **OUT_TOL)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    np.testing.assert_allclose(lse, ref_lse, **LSE_TOL)
    assert k_upd.shape == case["k_cache"].shape and k_upd.dtype == case["k_cache"].dtype
    if rot:
        np.testing.assert_allclose(np.asarray(k_upd, np.float64), ref_k, **ROT_TOL)
    else:
        np.testing.assert_array_equal(k_upd, ref_k)
    np.testing.assert_array_equal(v_upd, ref_v)
    return out, lse, k_upd, v_upd


# ----------------------------------------------------------------------------
# Against the oracle
# ----------------------------------------------------------------------------

OPTS = [
    dict(),
    dict(causal=True),
    dict(causal=True, window_size=(5, -1)),
    dict(window_size=(4, 0)),
    dict(softcap=3.0, alibi_slopes=np.array([0.1, 0.3, 0.05, 0.7], np.float32)),
    dict(causal=True, softmax_scale=0.3,
         alibi_slopes=np.random.RandomState(1).uniform(0, 0.5, (BATCH, 4)).astype(np.float32)),
]


@pytest.mark.parametrize("nheads_k", [4, 2, 1])
@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("seqlen_new", [0, 2])
@pytest.mark.parametrize("opt", range(len(OPTS)))
def test_oracle(nheads_k, seqlen_q, seqlen_new, opt):
    case = make_case(100 * opt + 10 * nheads_k + seqlen_q + seqlen_new, nheads_k=nheads_k,
                     seqlen_q=seqlen_q, seqlen_new=seqlen_new)
    check(case, **OPTS[opt])


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("leftpad", [False, True])
def test_rotary(interleaved, causal, seqlen_q, leftpad):
    case = make_case(7 + seqlen_q + 2 * causal + 4 * interleaved, seqlen_q=seqlen_q,
                     seqlen_new=3, rotary_dim=16)  # partial: headdim 32
    if leftpad:
        case["cache_leftpad"] = np.array([4, 0, 7], np.int32)
    check(case, rot=True, causal=causal, rotary_interleaved=interleaved)


def test_rotary_window_per_row_and_full_rotary_dim():
    case = make_case(3, seqlen_q=3, seqlen_new=2, rotary_dim=32)
    check(case, rot=True, window_size=(6, 2), rotary_interleaved=False)


def test_rotary_query_rows_past_the_table_clamp():
    # seqlen_q > seqlen_new: causal q rows reach positions past seqlen_ro.
    case = make_case(4, seqlen_q=9, seqlen_new=1, rotary_dim=16)
    case["rotary_cos"], case["rotary_sin"] = (x[:SEQLEN_CACHE] for x in
                                              (case["rotary_cos"], case["rotary_sin"]))
    case["cache_seqlens"][:] = SEQLEN_CACHE - 1
    check(case, rot=True, causal=True)


def test_bfloat16_runs_and_matches_float32_math():
    case = make_case(5, seqlen_q=2, seqlen_new=1)
    bf = {n: (jnp.asarray(x, jnp.bfloat16) if x.dtype == np.float16 else x)
          for n, x in case.items()}
    out, lse, k_upd, _ = call(bf, causal=True)
    assert out.dtype == jnp.bfloat16 and k_upd.dtype == jnp.bfloat16
    as64 = {n: (np.asarray(x, np.float32) if n in ("q", "k_cache", "v_cache", "k", "v") else x)
            for n, x in bf.items()}
    ref_out, ref_lse, _, _ = oracle(**as64, causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(lse, ref_lse, **LSE_TOL)


# ----------------------------------------------------------------------------
# Paged caches, cache_batch_idx, leftpad, num_splits
# ----------------------------------------------------------------------------


def to_paged(rs, cache, page_size, extra_pages=3):
    """A contiguous (batch, seqlen, h, d) cache as pages in a random order,
    plus garbage pages nobody owns; returns (pages, block_table)."""
    batch, seqlen = cache.shape[:2]
    per_seq = seqlen // page_size
    num_blocks = batch * per_seq + extra_pages
    order = rs.permutation(num_blocks)[:batch * per_seq].reshape(batch, per_seq)
    pages = rand(rs, num_blocks, page_size, *cache.shape[2:])
    for b in range(batch):
        for m in range(per_seq):
            pages[order[b, m]] = cache[b, m * page_size:(m + 1) * page_size]
    return pages, order.astype(np.int32)


def from_paged(pages, table):
    return np.concatenate([np.concatenate(list(pages[row]), axis=0)[None] for row in table])


@pytest.mark.parametrize("page_size", [1, 16, 48])
@pytest.mark.parametrize("seqlen_new,rotary", [(0, False), (2, False), (3, True)])
def test_paged_equals_contiguous(page_size, seqlen_new, rotary):
    case = make_case(page_size + seqlen_new, seqlen_q=2, seqlen_new=seqlen_new,
                     rotary_dim=16 if rotary else 0)
    opts = dict(causal=True, softcap=5.0)
    contiguous = call(case, **opts)
    rs = np.random.RandomState(page_size)
    k_pages, table = to_paged(rs, case["k_cache"], page_size)
    v_pages, _ = to_paged(np.random.RandomState(page_size), case["v_cache"], page_size)
    assert np.array_equal(from_paged(v_pages, table), case["v_cache"])
    paged = dict(case, k_cache=k_pages, v_cache=v_pages, block_table=table)
    out, lse, k_upd, v_upd = check(paged, rot=rotary, **opts)
    np.testing.assert_array_equal(out, contiguous[0])
    np.testing.assert_array_equal(lse, contiguous[1])
    np.testing.assert_array_equal(from_paged(np.asarray(k_upd), table), contiguous[2])
    np.testing.assert_array_equal(from_paged(np.asarray(v_upd), table), contiguous[3])
    unowned = np.setdiff1d(np.arange(k_pages.shape[0]), table)
    np.testing.assert_array_equal(np.asarray(k_upd)[unowned], k_pages[unowned])


def test_append_touches_only_the_new_rows():
    case = make_case(11, seqlen_new=2, batch_cache=5)
    case["cache_batch_idx"] = np.array([3, 0, 4], np.int32)
    _, _, k_upd, v_upd = check(case, causal=True)
    k_upd, v_upd = np.asarray(k_upd), np.asarray(v_upd)
    changed = np.zeros(case["k_cache"].shape[:2], bool)
    for b, row in enumerate(case["cache_batch_idx"]):
        start = case["cache_seqlens"][b]
        changed[row, start:start + 2] = True
        np.testing.assert_array_equal(k_upd[row, start:start + 2], case["k"][b])
        np.testing.assert_array_equal(v_upd[row, start:start + 2], case["v"][b])
    np.testing.assert_array_equal(k_upd[~changed], case["k_cache"][~changed])
    np.testing.assert_array_equal(v_upd[~changed], case["v_cache"][~changed])


@pytest.mark.parametrize("seqlen_new", [0, 1])
def test_cache_batch_idx_and_leftpad(seqlen_new):
    case = make_case(12 + seqlen_new, seqlen_q=3, seqlen_new=seqlen_new, batch_cache=4,
                     nheads_k=1)
    case["cache_batch_idx"] = np.array([2, 3, 0], np.int32)
    case["cache_leftpad"] = np.array([5, 0, 2], np.int32)
    case["cache_seqlens"] = np.array([40, 9, 2], np.int32)  # row 2: only padding
    # Slots before the padding may hold anything: they are never read.
    case["k_cache"][2, :5] = np.nan
    case["v_cache"][2, :5] = np.inf
    out, lse, _, _ = check(case, window_size=(7, -1),
                           alibi_slopes=np.array([0.2, 0.1, 0.3, 0.4], np.float32))
    assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_no_visible_key_gives_zero_and_inf():
    case = make_case(13, seqlen_q=2)
    case["cache_seqlens"] = np.array([0, 3, 5], np.int32)
    case["cache_leftpad"] = np.array([0, 3, 1], np.int32)
    out, lse, _, _ = check(case)
    assert np.all(np.asarray(out[:2]) == 0) and np.all(np.isinf(lse[:2]))


def test_num_splits_has_no_effect():
    case = make_case(14, seqlen_q=3, seqlen_new=2)
    results = [call(case, causal=True, num_splits=s) for s in (0, 1, 3)]
    for res in results[1:]:
        for x, y in zip(res, results[0]):
            np.testing.assert_array_equal(x, y)


def test_cache_seqlens_none_and_int():
    case = make_case(15, seqlen_q=2)
    del case["cache_seqlens"]
    check(case, causal=True)  # None: the whole cache
    check(dict(case, cache_seqlens=17), causal=True)
    check(dict(case, cache_seqlens=np.int32(9)), window_size=(3, 3))


def test_return_structure():
    case = {n: jnp.asarray(x) for n, x in make_case(16, seqlen_new=1).items()}
    out, k_upd, v_upd = flash_attn_with_kvcache(**case)
    assert out.shape == case["q"].shape and k_upd.shape == case["k_cache"].shape
    out2, lse, _, _ = flash_attn_with_kvcache(**case, return_softmax_lse=True)
    np.testing.assert_array_equal(out, out2)
    assert lse.shape == (BATCH, 4, 1)
    del case["k"], case["v"]
    out = flash_attn_with_kvcache(**case)
    assert isinstance(out, jax.Array) and out.shape == case["q"].shape
    out, lse = flash_attn_with_kvcache(**case, return_softmax_lse=True)
    assert lse.dtype == jnp.float32


def test_reference_function_and_backend_choice(monkeypatch):
    # The reference backend, bit for bit (on GPUs too, with the kernels off).
    monkeypatch.setenv("JAX_FLASH_KVCACHE_KERNELS", "0")
    case = make_case(17, seqlen_q=2, seqlen_new=1)
    res = jax_flash.reference.kvcache_attention_ref(**case, causal=True)
    for x, y in zip(res, call(case, causal=True)):
        np.testing.assert_array_equal(x, y)
    spec, _ = kvcache_lib.bind(**{n: jnp.asarray(x) for n, x in case.items()})
    assert spec.layout == "kvcache"
    assert backend_lib.select(spec, "gpu").name == "reference"
    assert hash(spec) == hash(kvcache_lib.bind(**case)[0])
    assert "JAX_FLASH_KVCACHE_KERNELS=0" in " ".join(flash_attn_with_kvcache.__doc__.split())


def test_decode_kernel_switch(monkeypatch):
    # On GPUs JAX_FLASH_KVCACHE_KERNELS=1 selects the decode kernels, "0" the
    # reference, unset the module's default; the CPU always runs the
    # reference.
    spec, _ = kvcache_lib.bind(**{n: jnp.asarray(x) for n, x in make_case(19).items()})
    monkeypatch.delenv("JAX_FLASH_KVCACHE_KERNELS", raising=False)
    assert cuda_kvcache.DEFAULT
    assert backend_lib.select(spec, "gpu").name == "cuda-sm80"
    monkeypatch.setenv("JAX_FLASH_KVCACHE_KERNELS", "1")
    assert backend_lib.select(spec, "gpu").name == "cuda-sm80"
    monkeypatch.setenv("JAX_FLASH_KVCACHE_KERNELS", "0")
    assert backend_lib.select(spec, "gpu").name == "reference"
    assert backend_lib.select(spec, "cpu").name == "reference"


@dataclasses.dataclass(frozen=True)
class _Switched:
    """The reference backend, its output scaled by 1 + the fold switch it
    is given, so a run shows which value reached it."""
    name: str = "switched"

    def kvcache_forward(self, spec, xs, operands, switches):
        out, *rest = backend_lib.ReferenceBackend().kvcache_forward(spec, xs, operands, switches)
        return (out * (1 + (switches.fold == "always")), *rest)


def test_switches_are_read_when_traced(monkeypatch):
    # A kv-cache call runs with the switches of its trace, even when the
    # environment changes before it is compiled: on a mesh (2 devices, K/V
    # heads split) XLA's partitioner traces the shards again at compile time.
    monkeypatch.setattr(backend_lib, "select", lambda spec, platform=None: _Switched())
    case = {n: jnp.asarray(x) for n, x in make_case(23).items()}
    placements = [lambda x: x]
    if jax.device_count() >= 2:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("model",))
        heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "model"))
        placements.append(lambda x: jax.device_put(x, heads) if x.ndim == 4 else x)
    for place in placements:
        placed = {n: place(x) for n, x in case.items()}
        outs = {}
        for traced, compiled in (("0", "1"), ("1", "0")):
            monkeypatch.setenv(cuda_kvcache.FOLD_ENV_VAR, traced)
            lowered = jax.jit(lambda case: flash_attn_with_kvcache(**case)).lower(placed)
            monkeypatch.setenv(cuda_kvcache.FOLD_ENV_VAR, compiled)
            outs[traced] = np.asarray(lowered.compile()(placed), np.float32)
        np.testing.assert_allclose(outs["1"], 2 * outs["0"], rtol=1e-3)
        assert np.abs(outs["0"]).max() > 0


def test_explicit_switches_override_the_environment(monkeypatch):
    fold = kvcache_lib.KVCacheSpec(batch=8, seqlen_q=1, nheads=32, nheads_k=8, head_dim=64,
                                   dtype="bfloat16", seqlen_cache=8192, batch_cache=8,
                                   softmax_scale=0.125)
    build = (64, 128)
    plan_of = lambda spec: types.SimpleNamespace(num_splits=1, blocks_per_sm=1)  # noqa: E731
    for env, mode in (("1", "never"), ("0", "auto"), ("0", "always")):
        monkeypatch.setenv(cuda_kvcache.FOLD_ENV_VAR, env)
        assert cuda_kvcache.kernel_spec_and_fold(fold, build, plan_of, mode)[1] == (
            1 if mode == "never" else 2)
        assert cuda_kvcache.kernel_spec_and_fold(fold, build, plan_of)[1] == (
            2 if env == "1" else 1)
    append = dataclasses.replace(fold, seqlen_new=1)
    for env, on in (("1", False), ("0", True)):
        monkeypatch.setenv(cuda_kvcache.APPEND_ENV_VAR, env)
        assert cuda_kvcache.append_in_kernel(append, on) == on
        assert cuda_kvcache.append_in_kernel(append) == (env == "1")


def test_append_kernel_switch_and_limits(monkeypatch):
    # On the decode kernels' path JAX_FLASH_KVCACHE_APPEND=1 runs appends on
    # the append kernel, "0" in JAX, unset the module's default. JAX keeps
    # head dims the kernels pad, and appends of many rows that may share
    # slots (the kernel compares each row's slot with every later row's).
    append = kvcache_lib.bind(**{n: jnp.asarray(x) for n, x in
                                 make_case(23, seqlen_new=2, rotary_dim=16).items()})[0]
    replace = dataclasses.replace
    monkeypatch.delenv(cuda_kvcache.APPEND_ENV_VAR, raising=False)
    assert cuda_kvcache.append_in_kernel(append) == cuda_kvcache.APPEND_DEFAULT
    monkeypatch.setenv(cuda_kvcache.APPEND_ENV_VAR, "0")
    assert not cuda_kvcache.append_in_kernel(append)
    monkeypatch.setenv(cuda_kvcache.APPEND_ENV_VAR, "1")
    assert cuda_kvcache.append_in_kernel(append)
    assert not cuda_kvcache.append_in_kernel(replace(append, seqlen_new=0, rotary_dim=0))
    assert not cuda_kvcache.append_in_kernel(replace(append, head_dim=60))
    limit = cuda_kvcache.APPEND_KERNEL_MAX_CHECKED_ROWS
    for shared in (dict(paged=True, page_size=16), dict(has_batch_idx=True)):
        assert cuda_kvcache.append_in_kernel(replace(append, batch=1, seqlen_new=limit, **shared))
        assert not cuda_kvcache.append_in_kernel(
            replace(append, batch=2, seqlen_new=limit, **shared))
    assert cuda_kvcache.append_in_kernel(replace(append, batch=2, seqlen_new=limit))
    assert not cuda_kvcache.append_in_kernel(replace(append, batch=2, seqlen_new=1 << 28))
    # The launch: a block per (new row, K/V head) and per (q row, head).
    big = dict(batch=1 << 12, seqlen_new=1 << 12, nheads=128)
    assert not cuda_kvcache.append_in_kernel(replace(append, nheads_k=128, **big))
    assert cuda_kvcache.append_in_kernel(replace(append, nheads_k=64, **big))


def test_low_precision_reference_is_close():
    case = make_case(20, seqlen_q=3, seqlen_new=1)
    hi = jax_flash.reference.kvcache_attention_ref(**case, causal=True)
    lo = jax_flash.reference.kvcache_attention_ref(**case, causal=True, upcast=False)
    np.testing.assert_allclose(np.asarray(lo[0], np.float32), np.asarray(hi[0], np.float32),
                               atol=2e-2)
    np.testing.assert_array_equal(lo[2], hi[2])  # the same append


@pytest.mark.parametrize("paged", [False, True])
def test_decode_loop_carries_the_caches_in_place(paged):
    # Eight appending steps in a fori_loop with the caches in the carry:
    # the compiled program aliases the donated caches to the outputs and
    # copies no cache, neither per step nor around the loop.
    case = make_case(24, seqlen_new=1)
    if paged:
        case["block_table"] = np.arange(BATCH, dtype=np.int32)[:, None]
    steps = 8
    rs = np.random.RandomState(5)
    qs = rand(rs, steps, *case["q"].shape)
    ks, vs = (rand(rs, steps, *case[n].shape) for n in ("k", "v"))

    def decode(k_cache, v_cache, qs, ks, vs):
        def step(i, carry):
            k_cache, v_cache, total = carry
            out, k_cache, v_cache = flash_attn_with_kvcache(
                qs[i], k_cache, v_cache, ks[i], vs[i], cache_seqlens=i + 3,
                block_table=case.get("block_table"), causal=True)
            return k_cache, v_cache, total + out.astype(jnp.float32).sum()
        return jax.lax.fori_loop(0, steps, step, (k_cache, v_cache, jnp.float32(0)))

    args = [jnp.asarray(x) for x in (case["k_cache"], case["v_cache"], qs, ks, vs)]
    compiled = jax.jit(decode, donate_argnums=(0, 1)).lower(*args).compile()
    text = compiled.as_text()
    assert "input_output_alias={ {0}: (0, {}, may-alias), {1}: (1, {}, may-alias) }" in text
    cache_type = "f16[" + ",".join(map(str, case["k_cache"].shape)) + "]"
    assert cache_type in text
    copies = [line for line in text.splitlines()
              if cache_type in line and ("copy(" in line or "copy-start(" in line)]
    assert not copies, copies
    k_cache, _, _ = compiled(*args)  # (one page per sequence when paged)
    np.testing.assert_array_equal(np.asarray(k_cache)[:, 3:3 + steps],
                                  np.swapaxes(ks[:, :, 0], 0, 1))


@pytest.mark.parametrize("paged", [False, True])
def test_donated_caches_alias_the_outputs(paged):
    # The append is one scatter into the caches: donated, the updated caches
    # are the input buffers (what the decode kernels' path relies on).
    case = make_case(21, seqlen_new=1)
    if paged:
        case["block_table"] = np.arange(BATCH, dtype=np.int32)[:, None]
    names = list(case)

    def step(*xs):
        return flash_attn_with_kvcache(**dict(zip(names, xs)))

    xs = [jnp.asarray(case[n]) for n in names]
    donate = (names.index("k_cache"), names.index("v_cache"))
    compiled = jax.jit(step, donate_argnums=donate).lower(*xs).compile()
    header = compiled.as_text().splitlines()[0]
    assert "input_output_alias={ {1}: (1, {}, may-alias), {2}: (2, {}, may-alias) }" in header
    assert compiled.memory_analysis().alias_size_in_bytes == 2 * case["k_cache"].nbytes


def test_existing_kvcache_ref_agrees(monkeypatch):
    monkeypatch.setenv("JAX_FLASH_KVCACHE_KERNELS", "0")  # bit for bit: the reference backend
    case = make_case(18, seqlen_q=2, seqlen_new=2)
    out, lse, k_upd, v_upd = jax_flash.reference.kvcache_ref(
        case["q"], case["k_cache"], case["v_cache"], case["cache_seqlens"], k_new=case["k"],
        v_new=case["v"], causal=True)
    res = call(case, causal=True)
    np.testing.assert_array_equal(out, res[0])
    np.testing.assert_allclose(lse, res[1], atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(k_upd, res[2])


# ----------------------------------------------------------------------------
# Clamping of inconsistent values
# ----------------------------------------------------------------------------


def test_clamped_cache_seqlens_and_leftpad():
    case = make_case(20, seqlen_q=3, seqlen_new=2, batch_cache=4)
    case["cache_seqlens"] = np.array([-7, 47, 2**31 - 1], np.int32)  # -> 0, 46, 46
    case["cache_leftpad"] = np.array([-3, 60, 9], np.int32)  # -> 0, 46, 9
    case["cache_batch_idx"] = np.array([-5, 9, 1], np.int32)  # -> 0, 3, 1
    res = check(case, causal=True)
    fixed = dict(case, cache_seqlens=np.array([0, 46, 46], np.int32),
                 cache_leftpad=np.array([0, 46, 9], np.int32),
                 cache_batch_idx=np.array([0, 3, 1], np.int32))
    for x, y in zip(res, call(fixed, causal=True)):
        np.testing.assert_array_equal(x, y)


def test_clamped_python_int_cache_seqlens():
    case = make_case(21, seqlen_new=3)
    for value, clamped in ((10**12, SEQLEN_CACHE - 3), (-10**12, 0)):
        res = call(dict(case, cache_seqlens=value))
        for x, y in zip(res, call(dict(case, cache_seqlens=clamped))):
            np.testing.assert_array_equal(x, y)


def test_clamped_block_table():
    case = make_case(22, seqlen_q=2, seqlen_new=1)
    case["cache_seqlens"][:] = SEQLEN_CACHE - 1  # every page is read
    rs = np.random.RandomState(0)
    k_pages, table = to_paged(rs, case["k_cache"], 16, extra_pages=0)
    v_pages, _ = to_paged(np.random.RandomState(0), case["v_cache"], 16, extra_pages=0)
    num_blocks = k_pages.shape[0]
    bad = table.copy()
    bad[table == 0] = -4
    bad[table == num_blocks - 1] = num_blocks + 100
    paged = dict(case, k_cache=k_pages, v_cache=v_pages, block_table=bad)
    res = check(paged, causal=True)
    for x, y in zip(res, call(dict(paged, block_table=table), causal=True)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("by_sort", [False, True])
def test_duplicate_writes_apply_in_batch_order(by_sort, monkeypatch):
    # Duplicates are found pairwise for few rows, by a sort for many: both.
    monkeypatch.setattr(kvcache_ref, "_PAIRWISE_MAX_ROWS", 0 if by_sort else 1024)
    case = make_case(23, seqlen_new=2, batch_cache=2)
    case["cache_batch_idx"] = np.array([1, 1, 0], np.int32)
    case["cache_seqlens"] = np.array([10, 11, 3], np.int32)
    _, _, k_upd, _ = check(case)  # the oracle writes in batch order too
    np.testing.assert_array_equal(k_upd[1, 10], case["k"][0, 0])
    np.testing.assert_array_equal(k_upd[1, 11:13], case["k"][1])


# ----------------------------------------------------------------------------
# jit, vmap
# ----------------------------------------------------------------------------


def test_jit_traced_cache_seqlens():
    case = make_case(30, seqlen_q=2, seqlen_new=2, rotary_dim=16)
    case["cache_leftpad"] = np.array([1, 0, 3], np.int32)
    fn = jax.jit(lambda c: flash_attn_with_kvcache(**c, causal=True, return_softmax_lse=True))
    arrays = {n: jnp.asarray(x) for n, x in case.items()}
    for seqlens in ([46, 0, 7], [3, 44, 50]):
        arrays["cache_seqlens"] = jnp.array(seqlens, jnp.int32)
        check(dict(case, cache_seqlens=np.array(seqlens, np.int32)), res=fn(arrays), rot=True,
              causal=True)


@pytest.mark.parametrize("layout", ["aligned", "batch_idx"])
def test_vmap(layout):
    # Caches whose rows are q's rows fold the mapped axis into the batch (one
    # call, no loop); with cache_batch_idx each element runs in turn.
    cases = [make_case(31 + i, seqlen_q=2, seqlen_new=1,
                       batch_cache=None if layout == "aligned" else BATCH + 1) for i in range(2)]
    if layout == "batch_idx":
        for case in cases:
            case["cache_batch_idx"] = np.array([2, 0, 3], np.int32)[:BATCH]
    stacked = {n: jnp.stack([jnp.asarray(c[n]) for c in cases]) for n in cases[0]}
    fn = jax.vmap(lambda c: flash_attn_with_kvcache(**c, causal=True, return_softmax_lse=True))
    res = fn(stacked)
    for i, case in enumerate(cases):
        for x, y in zip(res, call(case, causal=True)):
            np.testing.assert_array_equal(x[i], y)
    loops = jax.jit(fn).lower(stacked).as_text().count("stablehlo.while")
    assert (loops == 0) == (layout == "aligned"), loops


# ----------------------------------------------------------------------------
# Validation messages
# ----------------------------------------------------------------------------


def _base():
    case = {n: jnp.asarray(x) for n, x in make_case(40, seqlen_new=2, rotary_dim=16).items()}
    return case


def _paged():
    case = _base()
    del case["rotary_cos"], case["rotary_sin"]
    case["k_cache"] = case["k_cache"].reshape(9, 16, 2, HEAD_DIM)
    case["v_cache"] = case["v_cache"].reshape(9, 16, 2, HEAD_DIM)
    case["block_table"] = jnp.arange(9, dtype=jnp.int32).reshape(3, 3)
    return case


def _traced(name, value):
    """Calls with `name` traced under jit."""
    def fn(x):
        return flash_attn_with_kvcache(**_base(), **{name: x})
    return lambda: jax.jit(fn)(value)


f16 = jnp.float16
ERRORS = [
    # (change, exception, match)
    (dict(q=jnp.zeros((3, 4, HEAD_DIM), f16)), ValueError, r"q must have rank 4"),
    (dict(q=np.zeros((3, 1, 4, HEAD_DIM), np.float32)), TypeError,
     r"q must be float16 or bfloat16, got float32"),
    (dict(q=[1.0]), TypeError, r"q must be a JAX array"),
    (dict(k_cache=jnp.zeros((3, 48, 2), f16)), ValueError, r"k_cache must have rank 4"),
    (dict(k_cache=jnp.zeros((3, 48, 2, HEAD_DIM), jnp.bfloat16)), TypeError,
     r"k_cache must have q's dtype float16, got bfloat16"),
    (dict(v_cache=jnp.zeros((3, 40, 2, HEAD_DIM), f16)), ValueError,
     r"k_cache and v_cache must have the same shape"),
    (dict(k_cache=jnp.zeros((3, 48, 2, 16), f16), v_cache=jnp.zeros((3, 48, 2, 16), f16)),
     ValueError, r"k_cache must have headdim 32"),
    (dict(k_cache=jnp.zeros((3, 48, 3, HEAD_DIM), f16),
          v_cache=jnp.zeros((3, 48, 3, HEAD_DIM), f16)), ValueError,
     r"nheads of q \(4\) must be a multiple of nheads of k_cache/v_cache \(3\)"),
    (dict(k_cache=jnp.zeros((2, 48, 2, HEAD_DIM), f16),
          v_cache=jnp.zeros((2, 48, 2, HEAD_DIM), f16)), ValueError,
     r"k_cache must have batch 3 like q without cache_batch_idx"),
    (dict(v=None), ValueError, r"k and v must be given together, got k=set, v=None"),
    (dict(k=jnp.zeros((3, 2, 2), f16)), ValueError, r"k must have rank 4"),
    (dict(v=jnp.zeros((3, 2, 2, HEAD_DIM), jnp.bfloat16)), TypeError,
     r"v must have q's dtype float16, got bfloat16"),
    (dict(v=jnp.zeros((3, 1, 2, HEAD_DIM), f16)), ValueError,
     r"k and v must have the same shape"),
    (dict(k=jnp.zeros((3, 2, 1, HEAD_DIM), f16), v=jnp.zeros((3, 2, 1, HEAD_DIM), f16)),
     ValueError, r"k must have shape \(batch, seqlen_new, nheads_k, headdim\) = \(3, 2, 2, 32\)"),
    (dict(k=jnp.zeros((3, 49, 2, HEAD_DIM), f16), v=jnp.zeros((3, 49, 2, HEAD_DIM), f16),
          rotary_cos=None, rotary_sin=None), ValueError,
     r"k must have seqlen_new <= seqlen_cache \(48\)"),
    (dict(k=jnp.zeros((3, 0, 2, HEAD_DIM), f16), v=jnp.zeros((3, 0, 2, HEAD_DIM), f16)),
     ValueError, r"k and v must have seqlen_new >= 1 when given, got k \(3, 0, 2, 32\)"),
    (dict(q=jnp.zeros((3, 2, 0, HEAD_DIM), f16)), ValueError,
     r"q must have nheads >= 1, got q \(3, 2, 0, 32\)"),
    (dict(cache_seqlens=None), ValueError, r"cache_seqlens must be given when k/v are"),
    (dict(cache_seqlens=jnp.zeros((3,), jnp.int64) if jax.config.jax_enable_x64
          else np.zeros((3,), np.int64)), TypeError,
     r"cache_seqlens must be an int or int32, got int64"),
    (dict(cache_seqlens=jnp.zeros((2,), jnp.int32)), ValueError,
     r"cache_seqlens must have shape \(batch,\) = \(3,\), got \(2,\)"),
    (dict(cache_seqlens=2.0), TypeError, r"cache_seqlens must be an int or an int32 array"),
    (dict(cache_batch_idx=jnp.zeros((3,), jnp.uint32)), TypeError,
     r"cache_batch_idx must be int32, got uint32"),
    (dict(cache_batch_idx=jnp.zeros((3, 1), jnp.int32)), ValueError,
     r"cache_batch_idx must have shape \(batch,\) = \(3,\), got \(3, 1\)"),
    (dict(cache_leftpad=jnp.zeros((4,), jnp.int32)), ValueError,
     r"cache_leftpad must have shape \(batch,\) = \(3,\), got \(4,\)"),
    (dict(cache_leftpad=jnp.zeros((3,), jnp.float32)), TypeError,
     r"cache_leftpad must be int32, got float32"),
    (dict(rotary_sin=None), ValueError,
     r"rotary_cos and rotary_sin must be given together, got rotary_cos=set, rotary_sin=None"),
    (dict(k=None, v=None, cache_seqlens=3), ValueError, r"rotary_cos/rotary_sin need the new k"),
    (dict(rotary_cos=jnp.zeros((53,), f16)), ValueError, r"rotary_cos must have rank 2"),
    (dict(rotary_sin=jnp.zeros((53, 8), jnp.float32)), TypeError,
     r"rotary_sin must have q's dtype float16, got float32"),
    (dict(rotary_sin=jnp.zeros((52, 8), f16)), ValueError,
     r"rotary_cos and rotary_sin must have the same shape"),
    (dict(rotary_cos=jnp.zeros((53, 4), f16), rotary_sin=jnp.zeros((53, 4), f16)), ValueError,
     r"rotary_dim = 2 \* rotary_cos.shape\[1\] must be a multiple of 16 .* got 8"),
    (dict(rotary_cos=jnp.zeros((53, 24), f16), rotary_sin=jnp.zeros((53, 24), f16)),
     ValueError, r"must be a multiple of 16 in \[16, headdim=32\], got 48"),
    (dict(rotary_cos=jnp.zeros((40, 8), f16), rotary_sin=jnp.zeros((40, 8), f16)), ValueError,
     r"rotary_cos/rotary_sin must have seqlen_ro >= seqlen_cache \(48\), got \(40, 8\)"),
    (dict(rotary_interleaved=1), TypeError, r"rotary_interleaved must be a Python bool"),
    (dict(causal="yes"), TypeError, r"causal must be a Python bool"),
    (dict(window_size=(1,)), TypeError, r"window_size must be a pair of ints"),
    (dict(window_size=(-2, 0)), ValueError, r"window_size entries must be >= -1"),
    (dict(softmax_scale=-1.0), ValueError, r"softmax_scale must be a finite number > 0"),
    (dict(softcap=-1.0), ValueError, r"softcap must be a finite float >= 0"),
    (dict(alibi_slopes=jnp.zeros((5,), jnp.float32)), ValueError,
     r"alibi_slopes must have shape \(4,\) or \(3, 4\), got \(5,\)"),
    (dict(alibi_slopes=jnp.zeros((4,), f16)), TypeError, r"alibi_slopes must be float32"),
    (dict(num_splits=-1), ValueError, r"num_splits must be >= 0 \(0: automatic\), got -1"),
    (dict(num_splits=1.0), TypeError, r"num_splits must be a static Python int"),
    (dict(num_splits=True), TypeError, r"num_splits must be a static Python int"),
    (dict(return_softmax_lse=None), TypeError, r"return_softmax_lse must be a Python bool"),
]


@pytest.mark.parametrize("change,exc,match", ERRORS)
def test_errors(change, exc, match):
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(**{**_base(), **change})


PAGED_ERRORS = [
    (dict(block_table=jnp.zeros((3, 3), jnp.int64) if jax.config.jax_enable_x64
          else np.zeros((3, 3), np.int64)), TypeError, r"block_table must be int32, got int64"),
    (dict(block_table=jnp.zeros((2, 3), jnp.int32)), ValueError,
     r"block_table must have shape \(batch, max_blocks_per_seq\) with batch 3, got \(2, 3\)"),
    (dict(block_table=jnp.zeros((3,), jnp.int32)), ValueError,
     r"block_table must have shape \(batch, max_blocks_per_seq\)"),
    (dict(block_table=[[0]]), TypeError, r"block_table must be an int32 array"),
    (dict(k_cache=jnp.zeros((0, 16, 2, HEAD_DIM), f16),
          v_cache=jnp.zeros((0, 16, 2, HEAD_DIM), f16)), ValueError,
     r"k_cache must have num_blocks >= 1 and page_size >= 1 when paged"),
    (dict(cache_batch_idx=jnp.zeros((3,), jnp.int32)), ValueError,
     r"cache_batch_idx must be None with block_table"),
    (dict(cache_leftpad=jnp.zeros((3,), jnp.int32)), ValueError,
     r"cache_leftpad must be None with block_table"),
    (dict(k=jnp.zeros((3, 49, 2, HEAD_DIM), f16), v=jnp.zeros((3, 49, 2, HEAD_DIM), f16)),
     ValueError, r"k must have seqlen_new <= seqlen_cache \(48\)"),
]


@pytest.mark.parametrize("change,exc,match", PAGED_ERRORS)
def test_paged_errors(change, exc, match):
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(**{**_paged(), **change})


@pytest.mark.parametrize("name,value", [
    ("causal", True), ("softmax_scale", 0.5), ("softcap", 1.0), ("num_splits", 2),
    ("rotary_interleaved", False), ("return_softmax_lse", True)])
def test_traced_static_options(name, value):
    with pytest.raises(TypeError, match=f"{name} must be a static Python .*not a traced value"):
        _traced(name, value)()


def test_traced_window():
    with pytest.raises(TypeError, match="window_size must be a static Python int"):
        jax.jit(lambda w: flash_attn_with_kvcache(**_base(), window_size=(w, -1)))(3)


def test_jit_paged_traced_block_table():
    case = make_case(32, seqlen_q=3, seqlen_new=2)
    k_pages, table = to_paged(np.random.RandomState(1), case["k_cache"], 16)
    v_pages, _ = to_paged(np.random.RandomState(1), case["v_cache"], 16)
    paged = dict(case, k_cache=k_pages, v_cache=v_pages, block_table=table)
    fn = jax.jit(lambda c: flash_attn_with_kvcache(**c, window_size=(9, 0),
                                                   return_softmax_lse=True))
    check(paged, res=fn({n: jnp.asarray(x) for n, x in paged.items()}), window_size=(9, 0))


def test_batch_zero_returns_empty_results_and_the_caches():
    base = _base()
    case = {n: (x[:0] if n in ("q", "k_cache", "v_cache", "cache_seqlens", "k", "v") else x)
            for n, x in base.items()}
    out, lse, k_cache, v_cache = jax.jit(functools.partial(
        flash_attn_with_kvcache, return_softmax_lse=True, causal=True))(**case)
    assert out.shape == (0, 1, 4, HEAD_DIM) and out.dtype == case["q"].dtype
    assert lse.shape == (0, 4, 1) and lse.dtype == jnp.float32
    assert k_cache.shape == v_cache.shape == (0, 48, 2, HEAD_DIM)
