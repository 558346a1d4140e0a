"""Renders a benchmark JSON as a Markdown table. Three shapes:

- bench_attention.py: one row per (mode, headdim, seqlen, causal), TFLOP/s per
  implementation, and jax_flash's ratio to cuDNN and to PyTorch's
  FlashAttention-2;
- bench_modifiers.py: one row per (mode, seqlen, config), ms and the time
  relative to the same implementation's plain kernel, jax_flash and cuDNN;
- bench_varlen.py: one row per (mode, implementation);
- bench_decode.py: one row per (head dim, context, batch), GB/s of K/V read
  per (kind, implementation, page size or new tokens), and jax_flash's decode
  over cuDNN's.

    python benchmarks/results_table.py benchmarks/results/<file>.json
"""

import json
import sys


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _markdown(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def attention_table(data):
    impls = list(dict.fromkeys(r["impl"] for r in data["rows"]))
    cells = {}
    for r in data["rows"]:
        key = (r["mode"], r["headdim"], r["seqlen"], r["causal"])
        cells.setdefault(key, {})[r["impl"]] = r["tflops"]
    ratios = [o for o in ("cudnn", "torch_fa2") if o in impls and "jax_flash" in impls]
    head = ["mode", "headdim", "seqlen", "causal", *impls, *(f"jax_flash / {o}" for o in ratios)]
    rows = []
    for (mode, d, s, causal), row in sorted(cells.items()):
        ratio = lambda o: "-" if None in (row.get("jax_flash"), row.get(o)) else (  # noqa: E731
            f"{row['jax_flash'] / row[o]:.2f}")
        rows.append([mode, str(d), str(s), "yes" if causal else "no",
                     *(_fmt(row.get(i), ".0f") for i in impls), *(ratio(o) for o in ratios)])
    return _markdown(head, rows)


def modifiers_table(data):
    cells = {}
    for r in data["rows"]:
        cells.setdefault((r["mode"], r["seqlen"], r["config"]), {})[r["impl"]] = r
    head = ["mode", "seqlen", "config", "visible", "jax_flash ms", "jax_flash x plain",
            "cudnn ms", "cudnn x plain"]
    rows = []
    for (mode, s, config), by_impl in cells.items():
        jf, cu = by_impl.get("jax_flash", {}), by_impl.get("cudnn", {})
        rows.append([mode, str(s), config, _fmt(jf.get("visible"), ".3f"),
                     _fmt(jf.get("ms"), ".2f"), _fmt(jf.get("vs_plain"), ".2f"),
                     _fmt(cu.get("ms"), ".2f"), _fmt(cu.get("vs_plain"), ".2f")])
    return _markdown(head, rows)


def varlen_table(data):
    head = ["mode", "implementation", "ms", "Mtokens/s", "useful TFLOP/s", "x cudnn_padded"]
    rows = [[r["mode"], r["impl"], _fmt(r.get("ms"), ".3f"),
             _fmt(r.get("tokens_per_s") and r["tokens_per_s"] / 1e6, ".2f"),
             _fmt(r.get("useful_tflops"), ".1f"), _fmt(r.get("speedup_vs_cudnn_padded"), ".2f")]
            for r in data["rows"]]
    return _markdown(head, rows)


def decode_table(data):
    timed = [r for r in data["rows"] if r.get("gbps") and r["kind"] != "prefill"]

    def column(r):
        extra = r.get("page_size") or r.get("new_tokens")
        return f"{r['kind']} {r['impl']}" + (f" {extra}" if extra else "")

    columns = list(dict.fromkeys(column(r) for r in timed))
    cells = {}
    for r in timed:
        cells.setdefault((r["headdim"], r["context"], r["batch"]), {})[column(r)] = r["gbps"]
    head = ["d", "context", "batch", *(f"{c} GB/s" for c in columns), "jax_flash / cudnn"]
    rows = []
    for (d, c, b), row in sorted(cells.items()):
        jf, cu = row.get("decode jax_flash"), row.get("decode cudnn")
        rows.append([str(d), str(c), str(b), *(_fmt(row.get(k), ".0f") for k in columns),
                     f"{jf / cu:.2f}" if jf and cu else "-"])
    return _markdown(head, rows)


def table(path):
    data = json.load(open(path))
    if data["rows"] and "kind" in data["rows"][0]:
        return decode_table(data)
    if "doc_lengths" in data:
        return varlen_table(data)
    if any("config" in r for r in data["rows"]):
        return modifiers_table(data)
    return attention_table(data)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
