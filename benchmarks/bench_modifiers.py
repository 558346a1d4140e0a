"""Score-modifier benchmark: local windows, softcap, ALiBi and dropout against
the plain kernel, and cuDNN where it has the same feature.

Same shapes and timing as bench_attention.py (tokens = batch * seqlen = 16384,
hidden = nheads * headdim = 2048, bfloat16, head dim 128). For every
configuration the row gives the median time, the fraction of the
(seqlen x seqlen) score matrix the mask leaves visible, and the time relative
to the plain non-causal kernel of the same shape: a window's cost should
follow its visible fraction, not seqlen, and softcap should cost little.

Usage:
  python benchmarks/bench_modifiers.py [--seqlens 8192,16384] [--modes fwd,fwd_bwd]

Output: benchmarks/results/<gpu>_<YYYY-MM-DD>_modifiers.json plus a table.
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
from bench_attention import jax_benchmark_fn, make_jax_inputs, short_error, time_jax  # noqa: E402,I001
from results_io import header, result_stem, save_json  # noqa: E402

# name -> flash_attn_func options (cuDNN gets the same mask where it has one).
CONFIGS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window256": dict(window_size=(256, 256)),
    # Covers every key: the plain scores through the windowed kernel variant.
    "window_all": dict(window_size=(1 << 20, 1 << 20)),
    "causal_left1024": dict(causal=True, window_size=(1024, 0)),
    "softcap30": dict(softcap=30.0),
    "causal_softcap30": dict(causal=True, softcap=30.0),
    "alibi": dict(alibi=True),
    "dropout0.1": dict(dropout_p=0.1),
}


def visible_fraction(seqlen, opts):
    left, right = opts.get("window_size", (-1, -1))
    if opts.get("causal"):
        right = 0
    i = np.arange(seqlen)[:, None]
    j = np.arange(seqlen)[None, :]
    visible = np.ones((seqlen, seqlen), bool)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    return float(visible.mean())


def attention_fn(impl, opts, nheads):
    opts = dict(opts)
    if impl == "jax_flash":
        import jax_flash

        slopes = (jnp.asarray(2.0 ** (-8.0 * (np.arange(nheads) + 1) / nheads), jnp.float32)
                  if opts.pop("alibi", False) else None)
        p = opts.pop("dropout_p", 0.0)
        key = jax.random.key(0) if p else None
        return lambda q, k, v: jax_flash.flash_attn_func(
            q, k, v, alibi_slopes=slopes, dropout_p=p, dropout_key=key, **opts)
    if impl == "cudnn":
        if set(opts) - {"causal", "window_size"}:
            raise NotImplementedError("no such option in jax.nn.dot_product_attention")
        window = opts.get("window_size")
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=opts.get("causal", False), local_window_size=window,
            implementation="cudnn")
    raise ValueError(impl)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlens", default="8192,16384")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--impls", default="jax_flash,cudnn")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    a = p.parse_args()
    seqlens = [int(s) for s in a.seqlens.split(",")]
    path = result_stem(a.out, "modifiers") + ".json"
    result = {**header(), "headdim": a.headdim, "tokens": a.tokens, "hidden": a.hidden,
              "repeats": a.repeats, "rows": []}
    print(f"gpu={result['gpu']} jax={jax.__version__} -> {path}")
    nheads = a.hidden // a.headdim
    for mode in a.modes.split(","):
        for seqlen in seqlens:
            batch = max(1, a.tokens // seqlen)
            shape = (batch, seqlen, nheads, a.headdim)
            inputs = make_jax_inputs(0, shape)
            base = {}
            for name in a.configs.split(","):
                opts = CONFIGS[name]
                for impl in a.impls.split(","):
                    row = dict(mode=mode, seqlen=seqlen, batch=batch, nheads=nheads,
                               headdim=a.headdim, config=name, impl=impl,
                               visible=visible_fraction(seqlen, opts), ms=None)
                    try:
                        fn = jax_benchmark_fn(attention_fn(impl, opts, nheads), mode)
                        row["ms"] = time_jax(fn, inputs, a.repeats) * 1e3
                        base.setdefault(impl, row["ms"])  # "plain" runs first
                        row["vs_plain"] = row["ms"] / base[impl]
                    except Exception as e:  # noqa: BLE001 - record and continue
                        row["error"] = short_error(e)
                    result["rows"].append(row)
                    status = (f"{row['ms']:8.3f} ms  x{row['vs_plain']:.3f} of plain"
                              if row["ms"] is not None else f"ERROR {row['error'][:90]}")
                    print(f"{mode:7} s={seqlen:<5} {name:17} {impl:9} visible={row['visible']:.4f} "
                          f"{status}", flush=True)
                    save_json(path, result)
                    jax.clear_caches()
                    gc.collect()
            del inputs
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
