"""Packed-documents benchmark: variable-length attention and segment ids.

16384 tokens made of documents whose lengths are drawn uniformly from
[64, 4096] (the last one trimmed to fill the buffer), bfloat16, head dim 128,
16 heads, causal, forward and forward + backward, for:

  jax_flash_varlen    flash_attn_varlen_func on the packed (16384, 16, 128) buffers
  jax_flash_segments  flash_attn_func on (1, 16384, 16, 128) with segment ids
  cudnn_padded        jax.nn.dot_product_attention(implementation="cudnn") on the
                      padded batch (documents, longest document, 16, 128) with
                      query_seq_lengths / key_value_seq_lengths (padding and
                      unpadding not timed)
  xla_mask            jax.nn.dot_product_attention(implementation="xla") on the
                      packed row with an explicit document x causal mask

Each row: median time, tokens/s (16384 / time), the useful TFLOP/s (causal
FLOPs of the documents alone: sum 2 * L^2 * nheads * headdim per pass, x3.5
for fwd + bwd) and the speed-up over cudnn_padded.

Usage:
  python benchmarks/bench_varlen.py [--modes fwd,fwd_bwd] [--impls ...] [--seed 0]

Output: benchmarks/results/<gpu>_<YYYY-MM-DD>_varlen.json plus a table.
"""

import argparse
import gc
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import jax_benchmark_fn, short_error, time_jax  # noqa: E402,I001
from results_io import header, result_stem, save_json  # noqa: E402

IMPLS = ("jax_flash_varlen", "jax_flash_segments", "cudnn_padded", "xla_mask")


def document_lengths(tokens, low, high, seed):
    rng = np.random.RandomState(seed)
    lens = []
    while sum(lens) < tokens:
        lens.append(int(rng.randint(low, high + 1)))
    lens[-1] -= sum(lens) - tokens
    return lens


def make_case(impl, lens, nheads, headdim, seed):
    """(fn(q, k, v) -> out, [input sets (q, k, v, d_out)]) for one implementation."""
    tokens, max_len, ndocs = sum(lens), max(lens), len(lens)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    seg = jnp.asarray(np.repeat(np.arange(ndocs), lens), jnp.int32)[None]
    sets = []
    for i in range(2):
        keys = jax.random.split(jax.random.key(seed + i), 4)
        packed = [jax.random.normal(kk, (tokens, nheads, headdim), jnp.bfloat16) for kk in keys]
        if impl == "jax_flash_varlen":
            sets.append(tuple(packed))
        elif impl == "cudnn_padded":
            index = np.full((ndocs, max_len), tokens)
            for b, (start, n) in enumerate(zip(np.asarray(cu[:-1]), lens)):
                index[b, :n] = start + np.arange(n)
            pad = lambda x: jnp.take(x, jnp.asarray(index), axis=0, mode="fill", fill_value=0)
            sets.append(tuple(pad(x) for x in packed))
        else:
            sets.append(tuple(x[None] for x in packed))
    if impl == "jax_flash_varlen":
        import jax_flash

        fn = lambda q, k, v: jax_flash.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len,
                                                              causal=True)
    elif impl == "jax_flash_segments":
        import jax_flash

        fn = lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True,
                                                       segment_ids=(seg, seg))
    elif impl == "cudnn_padded":
        lengths = jnp.asarray(lens, jnp.int32)
        fn = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            implementation="cudnn")
    elif impl == "xla_mask":
        pos = jnp.arange(tokens)
        mask = (seg[0][:, None] == seg[0][None, :]) & (pos[None, :] <= pos[:, None])
        fn = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask[None, None], implementation="xla")
    else:
        raise ValueError(impl)
    return fn, sets


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--nheads", type=int, default=16)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    a = p.parse_args()
    lens = document_lengths(a.tokens, a.min_len, a.max_len, a.seed)
    path = result_stem(a.out, "varlen") + ".json"
    useful = sum(2.0 * n * n for n in lens) * a.nheads * a.headdim  # causal: half of 4 L^2
    result = {**header(), "tokens": a.tokens, "doc_lengths": lens, "nheads": a.nheads,
              "headdim": a.headdim, "causal": True, "repeats": a.repeats, "rows": []}
    print(f"gpu={result['gpu']} jax={jax.__version__} docs={len(lens)} max={max(lens)} -> {path}")
    for mode in a.modes.split(","):
        base = None
        for impl in a.impls.split(","):
            row = dict(mode=mode, impl=impl, ms=None)
            try:
                fn, sets = make_case(impl, lens, a.nheads, a.headdim, a.seed)
                row["ms"] = time_jax(jax_benchmark_fn(fn, mode), sets, a.repeats) * 1e3
                row["tokens_per_s"] = a.tokens / (row["ms"] * 1e-3)
                flops = useful * (3.5 if mode == "fwd_bwd" else 1.0)
                row["useful_tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                del sets
            except Exception as e:  # noqa: BLE001 - record and continue
                row["error"] = short_error(e)
            result["rows"].append(row)
            jax.clear_caches()
            gc.collect()
        base = next((r["ms"] for r in result["rows"]
                     if r["mode"] == mode and r["impl"] == "cudnn_padded" and r["ms"]), None)
        for r in result["rows"]:
            if r["mode"] == mode and r["ms"] and base:
                r["speedup_vs_cudnn_padded"] = base / r["ms"]
        for r in result["rows"]:
            if r["mode"] != mode:
                continue
            if r["ms"] is None:
                print(f"{mode:7} {r['impl']:19} ERROR {r['error'][:100]}")
            else:
                speed = r.get("speedup_vs_cudnn_padded")
                print(f"{mode:7} {r['impl']:19} {r['ms']:8.3f} ms  {r['tokens_per_s'] / 1e6:7.2f} "
                      f"Mtok/s  {r['useful_tflops']:6.1f} TFLOP/s"
                      + (f"  x{speed:.2f} vs cudnn_padded" if speed else ""), flush=True)
        save_json(path, result)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
