"""What a smaller kernel build would cost: every call timed on every compiled
kernel variant that covers its features, on one build.

The build compiles five kernel variants per (pass, dtype, head dim), cheapest
first: full (no feature), local (windows, causal), segs (segment ids), mods
(local + softcap/ALiBi), dropout (every feature); a call runs the cheapest
compiled one that covers it (csrc/common/variants.h). Leaving a variant out of
the build (JAX_FLASH_VARIANTS) sends its calls to the next covering one.
This benchmark measures that without rebuilding: one child process per
compiled variant V runs with JAX_FLASH_FORCE_VARIANT=V, so every call V
covers runs on V (csrc/host/plan.cc), and times those calls. Each row gives
the time on every covering variant relative to the variant a full build
picks; the summary gives, per variant, the worst slowdown its calls would
see without it.

Shapes and timing as bench_attention.py (tokens = batch * seqlen, hidden =
nheads * headdim, bfloat16, median of --repeats samples).

Usage:
  python benchmarks/bench_variants.py [--headdims 64,128] [--seqlens 2048,8192]
      [--modes fwd,fwd_bwd] [--configs plain,causal,...]

Output: benchmarks/results/<gpu>_<YYYY-MM-DD>_variants.json plus a table.
"""

import argparse
import gc
import json
import os
import subprocess
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import jax_benchmark_fn, make_jax_inputs, short_error, time_jax  # noqa: E402,I001
from bench_modifiers import attention_fn  # noqa: E402
from results_io import header, result_stem, save_json  # noqa: E402

# name -> (flash_attn_func options, the features a kernel needs for them).
CONFIGS = {
    "plain": (dict(), set()),
    "causal": (dict(causal=True), {"local"}),
    "window256": (dict(window_size=(256, 256)), {"local"}),
    "segs4": (dict(segments=4), {"segs"}),
    "causal_segs4": (dict(causal=True, segments=4), {"segs"}),
    "softcap30": (dict(softcap=30.0), {"mods"}),
    "causal_softcap30": (dict(causal=True, softcap=30.0), {"local", "mods"}),
    "alibi": (dict(alibi=True), {"mods"}),
    "dropout0.1": (dict(dropout_p=0.1), {"dropout"}),
    "deterministic": (dict(deterministic=True), set()),
}
# What each variant covers (csrc/generate_kernels.py), cheapest first.
VARIANTS = {"full": set(), "local": {"local"}, "segs": {"segs"}, "mods": {"local", "mods"},
            "dropout": {"local", "mods", "dropout", "segs"}}


def covering(needs, compiled):
    """The compiled variants that cover `needs`, cheapest first."""
    return [v for v in VARIANTS if v in compiled and needs <= VARIANTS[v]]


def call(opts, nheads, seqlen):
    """attn(q, k, v) for one configuration (segment ids: equal documents)."""
    opts = dict(opts)
    docs = opts.pop("segments", 0)
    if not docs:
        return attention_fn("jax_flash", opts, nheads)
    import jax_flash

    ids = jnp.minimum(jnp.arange(seqlen, dtype=jnp.int32) * docs // seqlen, docs - 1)[None]
    return lambda q, k, v: jax_flash.flash_attn_func(
        q, k, v, segment_ids=(jnp.broadcast_to(ids, q.shape[:2]),) * 2, **opts)


def child(a, variant):
    """Times the configurations `variant` covers; one JSON row per line."""
    from jax_flash._src import extension

    assert os.environ.get("JAX_FLASH_FORCE_VARIANT") == variant
    extension.kernels_or_raise()
    for headdim in a.headdims:
        nheads = a.hidden // headdim
        for seqlen in a.seqlens:
            batch = max(1, a.tokens // seqlen)
            shape = (batch, seqlen, nheads, headdim)
            inputs = make_jax_inputs(0, shape)
            for mode in a.modes:
                for name in a.configs:
                    opts, needs = CONFIGS[name]
                    if not needs <= VARIANTS[variant]:
                        continue
                    if opts.get("deterministic") and mode == "fwd":
                        continue  # the forward does not depend on it
                    row = dict(mode=mode, headdim=headdim, seqlen=seqlen, batch=batch,
                               nheads=nheads, config=name, variant=variant, ms=None)
                    try:
                        fn = jax_benchmark_fn(call(opts, nheads, seqlen), mode)
                        row["ms"] = time_jax(fn, inputs, a.repeats) * 1e3
                    except Exception as e:  # noqa: BLE001 - record and continue
                        row["error"] = short_error(e)
                    print("ROW " + json.dumps(row), flush=True)
                    jax.clear_caches()
                    gc.collect()
            del inputs


def summarize(rows, compiled):
    """Each row's ratios to the default variant, and per variant the worst
    ratio of its calls on the next covering variant."""
    by_key = {}
    for r in rows:
        key = (r["mode"], r["headdim"], r["seqlen"], r["config"])
        by_key.setdefault(key, {})[r["variant"]] = r["ms"]
    table, worst = [], {}
    for key, times in sorted(by_key.items()):
        mode, headdim, seqlen, name = key
        order = covering(CONFIGS[name][1], compiled)
        default = times.get(order[0])
        ratios = {v: (times[v] / default if default and times.get(v) else None) for v in order}
        table.append(dict(mode=mode, headdim=headdim, seqlen=seqlen, config=name,
                          default=order[0], default_ms=default, ratios=ratios))
        if len(order) > 1 and ratios[order[1]] is not None:
            w = worst.setdefault(order[0], dict(ratio=0.0))
            if ratios[order[1]] > w["ratio"]:
                worst[order[0]] = dict(ratio=ratios[order[1]], instead=order[1], mode=mode,
                                       headdim=headdim, seqlen=seqlen, config=name)
    return table, worst


def markdown(table, worst, compiled):
    lines = ["| mode | d | seqlen | config | default | ms | " +
             " | ".join(f"on {v}" for v in compiled) + " |",
             "|---" * (6 + len(compiled)) + "|"]
    for t in table:
        cells = [f"{t['ratios'][v]:.3f}" if t["ratios"].get(v) else "" for v in compiled]
        ms = f"{t['default_ms']:.3f}" if t["default_ms"] else "error"
        lines.append(f"| {t['mode']} | {t['headdim']} | {t['seqlen']} | {t['config']} | "
                     f"{t['default']} | {ms} | " + " | ".join(cells) + " |")
    lines.append("")
    for v, w in worst.items():
        lines.append(f"- without `{v}`: worst x{w['ratio']:.3f} ({w['config']}, {w['mode']}, "
                     f"d={w['headdim']}, s={w['seqlen']}, on `{w['instead']}`)")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--headdims", default="128")
    p.add_argument("--seqlens", default="2048,8192")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)  # the variant this process times
    a = p.parse_args()
    a.headdims = [int(s) for s in a.headdims.split(",")]
    a.seqlens = [int(s) for s in a.seqlens.split(",")]
    a.modes = a.modes.split(",")
    a.configs = a.configs.split(",")
    for name in a.configs:
        if name not in CONFIGS:
            p.error(f"--configs: unknown configuration {name!r} (known: {', '.join(CONFIGS)})")
    if a.child:
        return child(a, a.child)

    from jax_flash._src import extension

    extension.kernels_or_raise()
    compiled = [str(v) for v in extension._C.build_info()["variants"]]
    path = result_stem(a.out, "variants") + ".json"
    result = {**header(), "compiled": compiled, "tokens": a.tokens, "hidden": a.hidden,
              "repeats": a.repeats, "rows": []}
    print(f"gpu={result['gpu']} jax={jax.__version__} variants={compiled} -> {path}", flush=True)
    failed = []
    for variant in compiled:
        argv = [sys.executable, os.path.abspath(__file__), "--child", variant,
                "--headdims", ",".join(map(str, a.headdims)),
                "--seqlens", ",".join(map(str, a.seqlens)), "--modes", ",".join(a.modes),
                "--configs", ",".join(a.configs), "--tokens", str(a.tokens),
                "--hidden", str(a.hidden), "--repeats", str(a.repeats)]
        env = {**os.environ, "JAX_FLASH_FORCE_VARIANT": variant}
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if not line.startswith("ROW "):
                continue
            row = json.loads(line[4:])
            result["rows"].append(row)
            status = f"{row['ms']:8.3f} ms" if row["ms"] is not None else f"ERROR {row['error']}"
            print(f"{row['mode']:7} d={row['headdim']:<3} s={row['seqlen']:<5} "
                  f"{row['config']:17} on {variant:8} {status}", flush=True)
            save_json(path, result)
        if proc.wait():
            print(f"child for {variant} exited with {proc.returncode}", flush=True)
            failed.append(variant)
    table, worst = summarize(result["rows"], compiled)
    result["table"], result["worst_without"] = table, worst
    save_json(path, result)
    md = markdown(table, worst, compiled)
    with open(path[:-5] + ".md", "w") as f:
        f.write(md)
    print("\n" + md + f"wrote {path}")
    if failed or any(r["ms"] is None for r in result["rows"]):
        sys.exit(f"failed: children {failed}, "
                 f"{sum(r['ms'] is None for r in result['rows'])} rows with errors")


if __name__ == "__main__":
    main()
