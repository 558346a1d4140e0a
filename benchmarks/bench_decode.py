"""Decode benchmark: flash_attn_with_kvcache's kernels vs cuDNN, XLA and Pallas.

All rows in one process, bfloat16, 32 query / 8 K/V heads (--nheads,
--nheads-k), head dim 128 (--headdims 64,128,256), full caches of `context`
keys (8k, 32k, 128k) for batch 1, 8, 32, 64. Kinds of rows:

  decode   one query token per sequence (seqlen_q 1), contiguous caches:
             jax_flash      flash_attn_with_kvcache on our decode kernels (the
                            script sets JAX_FLASH_KVCACHE_KERNELS=1)
             jax_flash_ref  the same call on the plain-JAX reference backend
             cudnn          jax.nn.dot_product_attention(implementation="cudnn"),
                            q (B, 1, 32, H), separate K and V (B, T, 8, H)
             xla            the same, implementation="xla"
             pallas_gqa     jax.experimental.pallas.ops.gpu.decode_attention.gqa
  paged    the same decode on paged caches, page sizes 16, 64, 256, pages in
           random order (--page-order sequential: each sequence's in order):
           jax_flash (our layout (pages, page_size, 8, H)) and pallas_paged
           (jax.experimental.pallas.ops.gpu.paged_attention, its
           (8, pages, page_size, H) layout holding the same bytes)
  append   jax_flash appending one new token with rotary (caches donated, so
           the append is in place and the call carries them on), next to the
           plain decode of the same shapes; --append-tokens 1,16 adds rows
           of 16 query tokens and 16 new keys (speculative decoding)
  prefill  chunked prefill: flash_attn_varlen_func with block_table +
           seqused_k (4 or 16 sequences of 512 or 4096 new tokens against 8k
           or 32k cached keys, pages of 64, causal) next to the same work as
           dense flash_attn_varlen_func (K/V packed contiguously)

Decode rows report GB/s = bytes of K and V read (2 * batch * context *
nheads_k * headdim * 2) / time: the kernels are memory-bound, so this is
the number to put next to the HBM bandwidth (H200: 4.8 TB/s). Prefill rows
report TFLOP/s of the useful causal work (4 * headdim * nheads * sum over
queries of the keys each sees).

Timing and output follow bench_attention.py: jitted, warmed up, median of
`--repeats` samples of back-to-back calls. Decode and paged rows (not the
reference) and append rows time `--chain` steps (default 8) in one
executable, each step's output the next step's query (an append row's
steps append at the next positions of the caches they carry): the
shortest decode calls (8k keys, batch 1 and 8) take 40-130 us, not much
more than dispatching a jitted call from Python, so one call per dispatch
times the host with the kernel. The chained steps rotate through copies
of K/V (other draws) totalling at least 256 MB, or as many copies as
steps, at most 8 (134 MB for the smallest default row, 8k x 1 at d=64),
so with 8 steps no step finds its K/V still in the L2 cache. `--chain 1`
times one call per dispatch, as the decode rows of 2026-12-06 and before
and the append rows of 2026-12-07 and before were. An implementation that
raises (unsupported shape, OOM, import error) gets a row with ms=None and
the reason; rows go to benchmarks/results/<gpu>_<date>_decode[_tag].json
after every configuration.

Usage:
  python benchmarks/bench_decode.py                        # everything (long)
  python benchmarks/bench_decode.py --kinds decode --headdims 128
  python benchmarks/bench_decode.py --kinds decode --headdims 64 --num-splits 4
                                                           # a fixed split count
  python benchmarks/bench_decode.py --smoke                # CPU, tiny, < 1 min
"""

import argparse
import functools
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ["JAX_FLASH_KVCACHE_KERNELS"] = "1"  # the kernels (reference_backend() switches)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import WARMUP, TARGET_LOOP_S, short_error, time_jax  # noqa: E402,I001
from results_io import header, result_stem, save_json  # noqa: E402

import jax_flash  # noqa: E402
from jax_flash._src import cuda_kvcache  # noqa: E402

KINDS = ("decode", "paged", "append", "prefill")
IMPLS = ("jax_flash", "jax_flash_ref", "cudnn", "xla", "pallas_gqa", "pallas_paged")
# The reference gathers the whole cache and materialises the scores: past
# this many K/V bytes it is skipped (recorded), not run out of memory.
REF_MAX_BYTES = 8 << 30
# Chained rows (--chain) rotate through K/V copies of at least this many
# bytes together, and at most this many copies.
ROTATE_BYTES = 256 << 20
MAX_COPIES = 8


def kv_bytes(batch, context, nheads_k, headdim, itemsize=2):
    return 2 * batch * context * nheads_k * headdim * itemsize


# Jitted, so the float32 draw fuses into the cast: only `dtype` bytes are ever
# allocated (a 32 GiB bf16 cache would otherwise pass through 64 GiB). One
# function for the whole run, so each (shape, dtype) compiles once.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def random_inputs(seed, shapes, dtype):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [_draw(k, tuple(s), dtype) for k, s in zip(keys, shapes)]


def page_table(rng, batch, blocks, order="random"):
    """A block table of `blocks` pages per sequence, all pages in random order
    (order "sequential": sequence b's pages in order, after b - 1's)."""
    pages = np.arange(batch * blocks) if order == "sequential" else rng.permutation(batch * blocks)
    return jnp.asarray(pages.reshape(batch, blocks), jnp.int32)


class reference_backend:
    """Forces the kv-cache calls traced inside onto the reference backend."""

    def __enter__(self):
        self.saved = os.environ.get(cuda_kvcache.ENV_VAR)
        os.environ[cuda_kvcache.ENV_VAR] = "0"

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(cuda_kvcache.ENV_VAR)
        else:
            os.environ[cuda_kvcache.ENV_VAR] = self.saved


# ----------------------------------------------------------------------------
# Decode cases: (fn, [input sets]) per implementation
# ----------------------------------------------------------------------------

def decode_case(impl, batch, context, nheads, nheads_k, headdim, page_size, dtype, seed,
                num_splits=0, page_order="random"):
    rng = np.random.RandomState(seed)
    q_shape = (batch, 1, nheads, headdim)
    kv_shape = (batch, context, nheads_k, headdim)
    if impl in ("jax_flash", "jax_flash_ref"):
        if page_size:
            blocks = -(-context // page_size)
            q, k, v = random_inputs(seed, [q_shape, (batch * blocks, page_size, nheads_k, headdim),
                                           (batch * blocks, page_size, nheads_k, headdim)], dtype)
            table = page_table(rng, batch, blocks, page_order)
            fn = lambda q, k, v: jax_flash.flash_attn_with_kvcache(
                q, k, v, cache_seqlens=context, block_table=table, num_splits=num_splits)
        else:
            q, k, v = random_inputs(seed, [q_shape, kv_shape, kv_shape], dtype)
            fn = lambda q, k, v: jax_flash.flash_attn_with_kvcache(
                q, k, v, cache_seqlens=context, num_splits=num_splits)
        return fn, [(q, k, v)]
    if impl in ("cudnn", "xla"):
        q, k, v = random_inputs(seed, [q_shape, kv_shape, kv_shape], dtype)
        fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)
        return fn, [(q, k, v)]
    if impl == "pallas_gqa":
        from jax.experimental.pallas.ops.gpu import decode_attention

        q, k, v = random_inputs(seed, [(batch, nheads, headdim), kv_shape, kv_shape], dtype)
        return (lambda q, k, v: decode_attention.gqa(q, k, v)), [(q, k, v)]
    if impl == "pallas_paged":
        from jax.experimental.pallas.ops.gpu import paged_attention

        blocks = -(-context // page_size)
        pages = (nheads_k, batch * blocks, page_size, headdim)
        q, k, v = random_inputs(seed, [(batch, nheads, headdim), pages, pages], dtype)
        table = page_table(rng, batch, blocks, page_order)
        lengths = jnp.full((batch,), context, jnp.int32)
        return (lambda q, k, v: paged_attention.paged_attention(q, k, v, table, lengths)), \
            [(q, k, v)]
    raise ValueError(impl)


def time_append(batch, context, nheads, nheads_k, headdim, dtype, seed, repeats, new_tokens=1,
                steps=1):
    """Median seconds of one appending step with rotary (`new_tokens` query
    tokens and as many new keys, as in speculative decoding), the caches
    donated and carried from call to call (as a decoding loop does). With
    `steps` > 1 one executable runs that many steps, each step's output the
    next step's query, rotating through cache copies as the chained decode
    rows rotate through K/V copies (each copy appended at its next
    positions), and the time is per step. Returns that time and the number
    of cache copies."""
    copies = kv_copies(kv_bytes(batch, context, nheads_k, headdim), steps)
    rounds = -(-steps // copies)  # appends into one copy
    if rounds * new_tokens > context:
        raise ValueError(f"{rounds} appends of {new_tokens} tokens exceed the context {context}")
    q, k_new, v_new = random_inputs(
        seed, [(batch, new_tokens, nheads, headdim), (batch, new_tokens, nheads_k, headdim),
               (batch, new_tokens, nheads_k, headdim)], dtype)
    cache_shape = (batch, context, nheads_k, headdim)
    caches = [tuple(random_inputs(seed + 1 + j, [cache_shape, cache_shape], dtype))
              for j in range(copies)]
    angle = jnp.arange(context)[:, None] * jnp.linspace(1e-3, 1, headdim // 2)[None, :]
    cos, sin = jnp.cos(angle).astype(dtype), jnp.sin(angle).astype(dtype)
    # A copy's last append fills it: every step reads about `context` keys,
    # as the decode rows do.
    seqlens = jnp.full((batch,), context - rounds * new_tokens, jnp.int32)

    def run(caches, q, k_new, v_new):
        caches = list(caches)
        for i in range(steps):
            j = i % copies
            out, k_cache, v_cache = jax_flash.flash_attn_with_kvcache(
                q, *caches[j], k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                cache_seqlens=seqlens + (i // copies) * new_tokens, causal=True,
                rotary_interleaved=False)
            caches[j] = (k_cache, v_cache)
            q = out.astype(q.dtype)
        return q, caches

    fn = jax.jit(run, donate_argnums=0)
    for _ in range(WARMUP):
        out, caches = fn(caches, q, k_new, v_new)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    out, caches = fn(caches, q, k_new, v_new)
    jax.block_until_ready(out)
    inner = max(1, min(100, int(TARGET_LOOP_S / max(time.perf_counter() - t0, 1e-6))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out, caches = fn(caches, q, k_new, v_new)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner / steps)
    return statistics.median(samples), copies


# ----------------------------------------------------------------------------
# Chunked prefill
# ----------------------------------------------------------------------------

def prefill_case(impl, seqs, new, context, nheads, nheads_k, headdim, dtype, seed, page=64):
    """Sequences of `context` cached keys and `new` new tokens (their K/V
    already in the cache): the new queries attend causally to context + new keys."""
    rng = np.random.RandomState(seed)
    keys = context + new
    cu_q = jnp.asarray(np.arange(seqs + 1) * new, jnp.int32)
    if impl == "jax_flash_paged":
        blocks = -(-keys // page)
        q, k, v = random_inputs(seed, [(seqs * new, nheads, headdim),
                                       (seqs * blocks, page, nheads_k, headdim),
                                       (seqs * blocks, page, nheads_k, headdim)], dtype)
        table = page_table(rng, seqs, blocks)
        used = jnp.full((seqs,), keys, jnp.int32)
        fn = lambda q, k, v: jax_flash.flash_attn_varlen_func(
            q, k, v, cu_q, None, new, keys, causal=True, block_table=table, seqused_k=used)
    elif impl == "jax_flash_dense":
        q, k, v = random_inputs(seed, [(seqs * new, nheads, headdim),
                                       (seqs * keys, nheads_k, headdim),
                                       (seqs * keys, nheads_k, headdim)], dtype)
        cu_k = jnp.asarray(np.arange(seqs + 1) * keys, jnp.int32)
        fn = lambda q, k, v: jax_flash.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, new, keys, causal=True)
    else:
        raise ValueError(impl)
    flops = 4.0 * headdim * nheads * seqs * (new * context + new * (new + 1) / 2)
    return fn, [(q, k, v)], flops


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

def parse_list(s, typ=int):
    return [typ(x) for x in str(s).split(",") if x.strip()]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--headdims", default="128,64,256")
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--page-sizes", default="16,64,256")
    p.add_argument("--page-order", default="random", choices=("random", "sequential"),
                   help="paged rows: the pages of all sequences in random order, or each "
                        "sequence's in order (locality against page lookups)")
    p.add_argument("--append-tokens", default="1",
                   help="new tokens per append row (query tokens too), e.g. 1,16")
    p.add_argument("--nheads", type=int, default=32)
    p.add_argument("--nheads-k", type=int, default=8)
    p.add_argument("--prefill", default="4x512x8192,4x4096x32768,16x512x32768,16x4096x8192",
                   help="sequences x new tokens x cached keys, comma separated")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--chain", type=int, default=8,
                   help="decode and paged rows: steps per timed executable (1: one call per "
                        "dispatch, as the other benchmarks time)")
    p.add_argument("--num-splits", type=int, default=0,
                   help="jax_flash decode and paged rows: flash_attn_with_kvcache's num_splits "
                        "(0: the plan's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, reference and XLA only: proves the script runs (CPU)")
    a = p.parse_args()
    if a.chain < 1:
        p.error(f"--chain must be >= 1, got {a.chain}")
    if a.num_splits < 0:
        p.error(f"--num-splits must be >= 0, got {a.num_splits}")
    if a.smoke:
        a.headdims, a.contexts, a.batches, a.page_sizes = "64", "256", "1,2", "16"
        a.nheads, a.nheads_k, a.repeats, a.prefill = 4, 2, 1, "2x32x128"
        a.impls = "jax_flash,jax_flash_ref,xla"
    a.kinds, a.impls = parse_list(a.kinds, str), parse_list(a.impls, str)
    a.headdims, a.contexts = parse_list(a.headdims), parse_list(a.contexts)
    a.batches, a.page_sizes = parse_list(a.batches), parse_list(a.page_sizes)
    a.append_tokens = parse_list(a.append_tokens)
    a.prefill = [tuple(int(n) for n in c.split("x")) for c in parse_list(a.prefill, str)]
    for k in a.kinds:
        if k not in KINDS:
            p.error(f"unknown kind {k!r}; choose from {KINDS}")
    return a


def record(result, path, row, fn):
    """Runs fn() -> (seconds, extra fields), stores the row, prints it."""
    try:
        sec, extra = fn()
        row.update(ms=sec * 1e3, **extra)
    except Exception as e:  # noqa: BLE001 - record and continue
        row.update(ms=None, error=short_error(e))
    result["rows"].append(row)
    keys = ("kind", "impl", "batch", "context", "headdim", "page_size", "new_tokens", "seqs",
            "new")
    head = " ".join(f"{k}={row[k]}" for k in keys if row.get(k) is not None)
    if row["ms"] is None:
        print(f"{head:70} ERROR {row['error'][:90]}", flush=True)
    else:
        metric = (f"{row['gbps']:8.1f} GB/s" if "gbps" in row
                  else f"{row['tflops']:8.2f} TFLOP/s")
        print(f"{head:70} {row['ms']:9.3f} ms {metric}", flush=True)
    save_json(path, result)  # incremental: survive a killed run
    jax.clear_caches()
    gc.collect()


def bandwidth(fn, sets, nbytes, repeats):
    sec = time_jax(jax.jit(fn), sets, repeats)
    return sec, {"gbps": nbytes / sec / 1e9}


def kv_copies(nbytes, steps):
    """How many K/V sets a chained row of `steps` steps rotates through:
    enough that no step's K/V is still in the L2 cache (50 MB on H100 and
    H200) from the last time it was read, and no more than it reads."""
    return max(1, min(MAX_COPIES, steps, -(-ROTATE_BYTES // nbytes)))


def chained_bandwidth(fn, sets, nbytes, repeats, steps):
    """Per-step time of `steps` decode steps in one executable, each step's
    output the next one's query and its K/V the next of `sets`' copies: the
    device's time per step, without a host dispatch per call."""
    q = sets[0][0]
    kvs = [x for _, k, v in sets for x in (k, v)]

    def run(q, *kvs):
        for i in range(steps):
            j = i % len(sets)
            q = fn(q, kvs[2 * j], kvs[2 * j + 1]).astype(q.dtype)
        return q

    sec = time_jax(jax.jit(run), [(q, *kvs)], repeats) / steps
    return sec, {"gbps": nbytes / sec / 1e9, "chain": steps, "kv_copies": len(sets)}


def run_decode_row(a, impl, batch, context, headdim, page_size, dtype):
    nbytes = kv_bytes(batch, context, a.nheads_k, headdim)
    if impl == "jax_flash_ref" and nbytes > REF_MAX_BYTES:
        raise MemoryError(f"skipped: the reference gathers {nbytes / 2**30:.0f} GiB of K/V")
    fn, sets = decode_case(impl, batch, context, a.nheads, a.nheads_k, headdim, page_size,
                           dtype, a.seed, a.num_splits, a.page_order)
    if impl == "jax_flash_ref":
        with reference_backend():
            return bandwidth(fn, sets, nbytes, a.repeats)
    if impl == "jax_flash" and jax.default_backend() == "gpu":
        # The kernels must serve it, not the reference.
        if "jax_flash_kvcache_fwd" not in jax.jit(fn).lower(*sets[0]).as_text():
            raise RuntimeError("the decode kernels did not run")
    if a.chain == 1:
        return bandwidth(fn, sets, nbytes, a.repeats)
    for i in range(1, kv_copies(nbytes, a.chain)):  # same shapes, other draws (fn's block table kept)
        sets += decode_case(impl, batch, context, a.nheads, a.nheads_k, headdim, page_size,
                            dtype, a.seed + i)[1]
    return chained_bandwidth(fn, sets, nbytes, a.repeats, a.chain)


def main():
    a = parse_args()
    path = result_stem(a.out, "decode", a.tag) + ".json"
    result = {**header(), "nheads": a.nheads, "nheads_k": a.nheads_k, "dtype": "bfloat16",
              "repeats": a.repeats, "num_splits": a.num_splits, "page_order": a.page_order,
              "kernels_enabled": cuda_kvcache.enabled(),
              "append_kernel": cuda_kvcache.append_enabled(), "rows": []}
    gpu = result["gpu"]
    print(f"gpu={gpu} jax={jax.__version__} append kernel={result['append_kernel']} -> {path}")
    dtype = jnp.bfloat16
    base = dict(gpu=gpu, nheads=a.nheads, nheads_k=a.nheads_k)

    for headdim in a.headdims:
        for context in a.contexts:
            for batch in a.batches:
                shape = dict(base, headdim=headdim, context=context, batch=batch,
                             kv_bytes=kv_bytes(batch, context, a.nheads_k, headdim))
                if "decode" in a.kinds:
                    for impl in (i for i in a.impls if i != "pallas_paged"):
                        row = dict(shape, kind="decode", impl=impl, page_size=None)
                        record(result, path, row, lambda: run_decode_row(
                            a, impl, batch, context, headdim, 0, dtype))
                if "paged" in a.kinds:
                    for page in a.page_sizes:
                        for impl in ("jax_flash", "pallas_paged"):
                            if impl not in a.impls:
                                continue
                            row = dict(shape, kind="paged", impl=impl, page_size=page)
                            record(result, path, row, lambda: run_decode_row(
                                a, impl, batch, context, headdim, page, dtype))
                for n in a.append_tokens if "append" in a.kinds and "jax_flash" in a.impls else ():
                    row = dict(shape, kind="append", impl="jax_flash_append_rotary",
                               new_tokens=n)

                    def append_row(n=n):
                        sec, copies = time_append(batch, context, a.nheads, a.nheads_k,
                                                  headdim, dtype, a.seed, a.repeats, n, a.chain)
                        return sec, {"gbps": shape["kv_bytes"] / sec / 1e9, "chain": a.chain,
                                     "kv_copies": copies}

                    record(result, path, row, append_row)
    if "prefill" in a.kinds:
        for seqs, new, context in a.prefill:
            for headdim in a.headdims:
                for impl in ("jax_flash_paged", "jax_flash_dense"):
                    row = dict(base, kind="prefill", impl=impl, seqs=seqs, new=new,
                               context=context, headdim=headdim, page_size=64)

                    def prefill_row():
                        fn, sets, flops = prefill_case(impl, seqs, new, context, a.nheads,
                                                       a.nheads_k, headdim, dtype, a.seed)
                        sec = time_jax(jax.jit(fn), sets, a.repeats)
                        return sec, {"tflops": flops / sec / 1e12}

                    record(result, path, row, prefill_row)
    print_table(result["rows"])
    print(f"\nwrote {path}")


def print_table(rows):
    """Decode GB/s per shape and implementation, and jax_flash / cudnn."""
    decode = [r for r in rows if r["kind"] in ("decode", "paged", "append") and r["ms"]]
    if decode:
        def column(r):  # kind, implementation, page size (paged) or new tokens (append)
            return r["kind"], r["impl"], r.get("page_size") or r.get("new_tokens")

        impls = sorted({column(r) for r in decode},
                       key=lambda k: (KINDS.index(k[0]), k[1], k[2] or 0))
        shapes = sorted({(r["headdim"], r["context"], r["batch"]) for r in decode})
        gb = {(r["headdim"], r["context"], r["batch"]) + column(r): r["gbps"] for r in decode}
        names = [i.replace("jax_flash_append_rotary", "jf_append")
                 + (f"/{'p' if k == 'paged' else 't'}{n}" if n else "") for k, i, n in impls]
        print("\nGB/s of K/V read (median)\n" + f"{'d':>4} {'context':>7} {'batch':>5} "
              + " ".join(f"{n[:14]:>14}" for n in names) + f" {'jf/cudnn':>9}")
        for d, c, b in shapes:
            vals = [gb.get((d, c, b) + k) for k in impls]
            jf, cu = gb.get((d, c, b, "decode", "jax_flash", None)), \
                gb.get((d, c, b, "decode", "cudnn", None))
            print(f"{d:>4} {c:>7} {b:>5} " + " ".join(
                f"{v:>14.1f}" if v else f"{'-':>14}" for v in vals)
                + (f" {jf / cu:>9.2f}" if jf and cu else f" {'-':>9}"))
    prefill = [r for r in rows if r["kind"] == "prefill" and r["ms"]]
    if prefill:
        print("\nChunked prefill TFLOP/s (median)")
        for r in prefill:
            print(f"  {r['impl']:16} seqs={r['seqs']:<3} new={r['new']:<5} "
                  f"context={r['context']:<6} d={r['headdim']:<3} {r['tflops']:8.2f}")


if __name__ == "__main__":
    main()
