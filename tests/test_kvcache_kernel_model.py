"""CPU: the decode kernels' decomposition (tests/kvcache_kernel_model.py, a
NumPy model of csrc/decode/ block by block) against the reference with
FlashAttention's rule, over splits, row blocks, pages and adversarial
tables; and the split plan of the compiled extension (csrc/host/plan.cc),
where one is built."""

import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flash._src import extension, kvcache_ref
from jax_flash._src import kvcache as kvcache_lib

import kvcache_kernel_model as model
from kvcache_cases import make_case

_update = jax.jit(kvcache_ref.update, static_argnums=0)
_attend = jax.jit(kvcache_ref.attend, static_argnums=(0, 5))


def _check(case, num_splits, block_m=64, **opts):
    kw, statics = case
    spec, ops = kvcache_lib.bind(**kw, **statics, **opts)
    xs = (kw["q"], kw["k_cache"], kw["v_cache"], kw.get("k"), kw.get("v"))
    q, k_cache, v_cache = _update(spec, xs, ops)
    out, lse = model.run(spec, ops, q, k_cache, v_cache, num_splits, block_m=block_m)
    out32, lse32 = _attend(spec, q, k_cache, v_cache, ops, True)
    out_lo, _ = _attend(spec, q, k_cache, v_cache, ops, False)
    out, out32, out_lo = (np.asarray(x, np.float32) for x in (out, out32, out_lo))
    assert np.isfinite(out).all()
    err, low_err = np.abs(out - out32).max(), np.abs(out_lo - out32).max()
    assert err <= 2 * low_err + 1e-5, (err, low_err)
    lse32 = np.asarray(lse32)
    np.testing.assert_array_equal(np.isposinf(lse), np.isposinf(lse32))
    finite = np.isfinite(lse32)
    np.testing.assert_allclose(lse[finite], lse32[finite], rtol=1e-4, atol=1e-4)


HEADS = [(4, 4), (6, 2), (8, 1), (32, 1)]
WINDOWS = [dict(), dict(causal=True), dict(window_size=(20, 0)), dict(window_size=(5, 3)),
           dict(window_size=(-1, 1)), dict(softcap=5.0), dict(causal=True, softcap=30.0)]


def _sample(n, seed=0):
    rnd = random.Random(seed)
    cases = []
    for i in range(n):
        seqlen_new = rnd.choice([0, 0, 1, 3])
        cases.append(dict(
            seed=i, dtype=rnd.choice([jnp.float16, jnp.bfloat16]), head_dim=rnd.choice([32, 64]),
            heads=rnd.choice(HEADS), seqlen_q=rnd.choice([1, 3, 16]),
            seqlen_cache=rnd.choice([1, 40, 130, 200]),
            page_size=rnd.choice([0, 0, 1, 16, 48, 64]), seqlen_new=seqlen_new,
            rotary=rnd.choice([None, (16, True), (32, False)]) if seqlen_new else None,
            batch_idx=rnd.random() < 0.3, leftpad=rnd.random() < 0.3, alibi=rnd.random() < 0.3,
            adversarial=rnd.random() < 0.3, num_splits=rnd.choice([1, 2, 3, 7]),
            block_m=rnd.choice([64, 32, 16]), opts=rnd.choice(WINDOWS)))
    return cases


# Each case compiles its own reference (a few seconds on the CI's 2 cores):
# a small sample by default, JAX_FLASH_MODEL_CASES=200 for a wider one.
@pytest.mark.parametrize("case", _sample(int(os.environ.get("JAX_FLASH_MODEL_CASES", "16"))),
                         ids=lambda c: f"case{c['seed']}")
def test_model_matches_reference(case):
    case = dict(case)
    num_splits, block_m, opts = case.pop("num_splits"), case.pop("block_m"), case.pop("opts")
    _check(make_case(**case), num_splits, block_m, **opts)


def test_splits_see_disjoint_tiles():
    # Every visible key's tile lies in exactly one split, whatever the split
    # count and the key range.
    for begin in range(0, 200, 7):
        for end in range(begin + 1, 400, 13):
            for splits in (1, 2, 3, 5, 64):
                first, last = begin // 64, -(-end // 64)
                per = -(-(last - first) // splits)
                covered = []
                for s in range(splits):
                    lo = min(first + s * per, last)
                    covered += range(lo, min(lo + per, last))
                assert covered == list(range(first, last))


requires_extension = pytest.mark.skipif(not extension.has_kernels(),
                                        reason="needs the compiled extension (jax_flash._C)")


@requires_extension
def test_split_plan():
    plan = extension._C.kvcache_plan
    h200 = dict(num_sms=132, smem_per_sm=233472, smem_per_block=232448, cc_major=9)
    d = extension.compiled_head_dims()[0]
    # Few blocks, long cache: split, at least 256 keys each, equal runs of
    # tiles, and no more blocks than fill their rounds of resident blocks.
    p = plan(1, 1, 32, 8, d, 32768, 0, **h200)
    assert 1 < p["num_splits"] <= 128 and p["m_blocks"] == 1
    tiles = 32768 // p["block_n"]
    per = -(-tiles // p["num_splits"])
    assert per * p["block_n"] >= 256 and -(-tiles // per) == p["num_splits"]
    assert p["out_accum_shape"] == (p["num_splits"], 1, 32, 1, d)
    assert p["lse_accum_shape"] == (p["num_splits"], 1, 32, 1)
    one_per_sm = dict(num_sms=100, smem_per_sm=1)  # rounds of 100 resident blocks
    for batch in (1, 2, 3, 8, 16):
        blocks = batch * 8 * plan(batch, 1, 32, 8, d, 32768, 0, **one_per_sm)["num_splits"]
        assert blocks / (-(-blocks // 100) * 100) > 0.9, (batch, blocks)
    # A grid that fills its rounds: no split, no scratch.
    p = plan(64, 1, 32, 8, d, 8192, 0, **h200)
    assert p["num_splits"] == 1 and p["out_accum_shape"] == (0,) == p["lse_accum_shape"]
    # Short caches are not split below 256 keys a split.
    assert plan(1, 1, 32, 8, d, 300, 0, **h200)["num_splits"] == 1
    # A request is honoured up to the tiles and kMaxSplits, with or without
    # a device to ask.
    assert plan(2, 1, 8, 8, d, 1000, 3, **h200)["num_splits"] == 3
    assert plan(2, 1, 8, 8, d, 100, 9, **h200)["num_splits"] == 2
    assert plan(2, 1, 8, 8, d, 10 ** 6, 1000, **h200)["num_splits"] == 128
    assert plan(2, 1, 8, 8, d, 1000, 3)["num_splits"] == 3
    # Tiles: narrow (one 16-row slab, >= 2 stages) up to 16 rows per K/V
    # head when its shared memory fits the block, else wide (32 or 64 rows
    # per block).
    p = plan(1, 1, 32, 8, d, 64, 1, **h200)
    assert p["narrow"] and p["block_m"] == 16 and p["stages"] >= 2 and p["m_blocks"] == 1
    assert plan(1, 4, 32, 8, d, 64, 1, **h200)["narrow"]  # 16 rows
    p = plan(1, 16, 32, 1, d, 64, 1, **h200)
    assert not p["narrow"] and p["block_m"] in (32, 64) and p["m_blocks"] == 512 // p["block_m"]
    assert not plan(1, 1, 32, 8, d, 64, 1, **dict(h200, smem_per_block=16384))["narrow"]
    assert plan(1, 1, 4, 4, d - 4, 64, 1, **h200)["head_dim_padded"] == d
    with pytest.raises(ValueError, match="headdim"):
        plan(1, 1, 4, 4, 300, 64, 0, **h200)


@requires_extension
def test_split_plan_resident_blocks_by_head_dim():
    # A narrow d=128 block on a contiguous cache takes an H100 SM's share of
    # bandwidth alone: the automatic count fills the SMs one block each.
    # d=64 blocks, and d=128 ones on pages, gain from a second one on the
    # SM: their count fills two a SM.
    plan = extension._C.kvcache_plan
    h100 = dict(num_sms=132, smem_per_sm=233472, smem_per_block=232448, dram_gbps=3352,
                cc_major=9)
    compiled = extension.compiled_head_dims()
    if 128 not in compiled and 64 not in compiled:
        pytest.skip("needs head dim 64 or 128 compiled")
    for batch, context in ((1, 8192), (1, 32768), (1, 131072), (4, 8192), (8, 32768)):
        if 128 in compiled:
            p = plan(batch, 1, 32, 8, 128, context, 0, **h100)
            assert p["narrow"] and 66 < batch * 8 * p["num_splits"] <= 132, (batch, context, p)
            assert p["blocks_per_sm"] == 1
            # Paged: two a SM (the page lookups want the second block).
            p = plan(batch, 1, 32, 8, 128, context, 0, **h100, page_size=16)
            assert p["narrow"] and 132 < batch * 8 * p["num_splits"] <= 264, (batch, context, p)
            assert p["blocks_per_sm"] == 2
        if 64 in compiled:
            p = plan(batch, 1, 32, 8, 64, context, 0, **h100)
            assert p["narrow"] and 132 < batch * 8 * p["num_splits"] <= 264, (batch, context, p)
            assert p["blocks_per_sm"] == 2


@requires_extension
def test_split_plan_keeps_two_blocks_where_one_cannot_take_the_bandwidth():
    # An H200 SM's share of DRAM (4.9 TB/s on 132 SMs) is more than one
    # narrow d=128 block reads: two a SM, as on a device of unknown bandwidth.
    if 128 not in extension.compiled_head_dims():
        pytest.skip("needs head dim 128 compiled")
    plan = extension._C.kvcache_plan
    h200 = dict(num_sms=132, smem_per_sm=233472, smem_per_block=232448)
    for bandwidth in (4915, 0):
        for batch, context in ((1, 8192), (1, 32768), (1, 131072), (4, 8192), (8, 32768)):
            p = plan(batch, 1, 32, 8, 128, context, 0, **h200, dram_gbps=bandwidth)
            assert p["narrow"] and p["dram_gbps"] == bandwidth and p["blocks_per_sm"] == 2
            assert 132 < batch * 8 * p["num_splits"] <= 264, (bandwidth, batch, context, p)


@requires_extension
def test_d64_tiles_by_copy():
    # sm_90's copy engine keeps the d=64 tile of 6 stages (two blocks a SM);
    # pages shorter than a tile, and devices before sm_90, copy by cp.async
    # with 4 stages: three blocks a SM of 228 KB, two of an A100's 164 KB,
    # and a tile that fits the 99 KB block of sm_86.
    if 64 not in extension.compiled_head_dims():
        pytest.skip("needs head dim 64 compiled")
    plan = extension._C.kvcache_plan
    h100 = dict(num_sms=132, smem_per_sm=233472, smem_per_block=232448, dram_gbps=3352,
                cc_major=9)
    p = plan(8, 1, 32, 8, 64, 32768, 0, **h100)
    assert p["narrow"] and p["copy_engine"] and p["stages"] == 6 and p["blocks_per_sm"] == 2
    for page_size in (1, 16, 48):
        p = plan(8, 1, 32, 8, 64, 32768, 0, **h100, page_size=page_size)
        assert p["narrow"] and not p["copy_engine"], page_size
        assert p["stages"] == 4 and p["blocks_per_sm"] == 3, page_size
    a100 = dict(num_sms=108, smem_per_sm=167936, smem_per_block=166912, cc_major=8)
    p = plan(8, 1, 32, 8, 64, 32768, 0, **a100)
    assert p["narrow"] and not p["copy_engine"] and p["stages"] == 4 and p["blocks_per_sm"] == 2
    sm86 = dict(num_sms=84, smem_per_sm=102400, smem_per_block=101376, cc_major=8)
    p = plan(8, 1, 32, 8, 64, 32768, 0, **sm86)
    assert p["narrow"] and p["blocks_per_sm"] == 1
    if 128 in extension.compiled_head_dims():
        assert not plan(8, 1, 32, 8, 128, 32768, 0, **sm86)["narrow"]
