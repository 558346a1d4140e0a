"""The append kernel's own source on the CPU (tests/kvcache_append_emulation.cc,
built with nvcc; skipped without it) against the reference's append
(`kvcache_ref.update`): the rotated q and the updated caches equal up to one
rounding of the dtype, over contiguous, cache_batch_idx and paged caches,
both rotary styles and several widths, q positions per row or not, left
padding, adversarial tables, shared slots and more rows than a block has
threads. The GPU tests (test_kvcache_gpu.py) run the compiled kernel."""

import ctypes
import itertools
import os
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from jax_flash._src import kvcache as kvcache_lib
from jax_flash._src import kvcache_ref

from kvcache_cases import make_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    lib_path = tmp_path_factory.mktemp("append") / "kvcache_append_emulation.so"
    subprocess.run(["nvcc", "-std=c++20", "-O1", "-Xcompiler", "-fPIC", "-shared",
                    "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "tests", "kvcache_append_emulation.cc"),
                    "-o", str(lib_path)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.run_append.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int)]
    return lib


def _run(lib, spec, ops, q, k_cache, v_cache, k, v):
    """(q_out, k_cache, v_cache) from the emulated kernel, with the
    parameters csrc/host/kvcache.cc's kvcache_append fills."""
    host = lambda x: None if x is None or x.size == 0 else np.ascontiguousarray(np.asarray(x))
    q, k, v = host(q), host(k), host(v)
    k_out, v_out = host(k_cache).copy(), host(v_cache).copy()
    rotary = spec.rotary_dim > 0
    q_out = np.zeros_like(q) if rotary else None
    tables = [host(ops.rotary_cos), host(ops.rotary_sin), host(ops.cache_seqlens),
              host(ops.cache_batch_idx), host(ops.cache_leftpad),
              host(ops.block_table) if spec.paged else None]
    arrays = [q if rotary else None, q_out, k, v, k_out, v_out, *tables]
    ptrs = (ctypes.c_void_p * 12)(*[None if a is None else a.ctypes.data for a in arrays])
    sizes = (ctypes.c_int * 16)(
        spec.batch, spec.seqlen_q, spec.seqlen_new, spec.nheads, spec.nheads_k, spec.head_dim,
        spec.rotary_dim, ops.rotary_cos.shape[0] if rotary else 0, spec.seqlen_cache,
        spec.batch_cache, spec.page_size if spec.paged else spec.seqlen_cache,
        ops.block_table.shape[1] if spec.paged else 1, spec.dtype == "bfloat16",
        spec.rotary_interleaved, spec.rotary_q_per_row, spec.paged or spec.has_batch_idx)
    assert lib.run_append(ptrs, sizes) == 0
    return (q_out if rotary else q), k_out, v_out


def _check(lib, case, share=None, **opts):
    kw, statics = case
    if share == "batch_idx":  # sequences 1 and 3 write one cache row
        kw["cache_batch_idx"] = kw["cache_batch_idx"].at[3].set(kw["cache_batch_idx"][1])
    elif share == "pages":  # sequences 0 and 2 write the same pages
        kw["block_table"] = kw["block_table"].at[2].set(kw["block_table"][0])
    if share:
        kw["cache_seqlens"] = jnp.full_like(kw["cache_seqlens"], 10)
    spec, ops = kvcache_lib.bind(**kw, **statics, **opts)
    xs = (kw["q"], kw["k_cache"], kw["v_cache"], kw["k"], kw["v"])
    want = kvcache_ref.update(spec, xs, ops)
    got = _run(lib, spec, ops, *xs)
    eps = float(jnp.finfo(kw["q"].dtype).eps)
    for name, g, w in zip(("q", "k_cache", "v_cache"), got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=eps, atol=0, err_msg=name)


LAYOUTS = {"contig": dict(), "batch_idx": dict(batch_idx=True),
           "leftpad": dict(leftpad=True, batch_idx=True), "page1": dict(page_size=1),
           "page16": dict(page_size=16)}
ROTARY = [None, (16, True), (32, False), (64, True), (64, False)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rotary", ROTARY, ids=str)
@pytest.mark.parametrize("dtype,causal,adversarial",
                         [(jnp.bfloat16, True, False), (jnp.float16, False, True)],
                         ids=["bf16-causal", "fp16-adversarial"])
def test_append_matches_reference(kernel, layout, rotary, dtype, causal, adversarial):
    seed = 100 + list(LAYOUTS).index(layout) * 10 + ROTARY.index(rotary)
    case = make_case(seed, dtype=dtype, batch=3, head_dim=64, heads=(4, 2), seqlen_q=2,
                     seqlen_cache=48, seqlen_new=3, rotary=rotary, adversarial=adversarial,
                     **LAYOUTS[layout])
    _check(kernel, case, causal=causal)


@pytest.mark.parametrize("share,layout", [("batch_idx", "batch_idx"), ("pages", "page16")])
def test_shared_slots_keep_the_last_write(kernel, share, layout):
    case = make_case(7, batch=4, head_dim=64, heads=(4, 2), seqlen_q=1, seqlen_cache=64,
                     seqlen_new=2, rotary=(32, True), **LAYOUTS[layout])
    _check(kernel, case, share=share)


@pytest.mark.parametrize("layout,window", list(itertools.product(["page16", "contig"],
                                                                 [(-1, -1), (8, 0)])))
def test_more_rows_than_threads(kernel, layout, window):
    # 2 x 90 new rows: each row's shared-slot check takes two strides.
    case = make_case(9, batch=2, head_dim=32, heads=(2, 1), seqlen_q=3, seqlen_cache=256,
                     seqlen_new=90, rotary=(16, False), **LAYOUTS[layout])
    _check(kernel, case, window_size=window)
