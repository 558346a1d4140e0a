"""Renders a benchmark JSON (benchmarks/bench_attention.py) as a Markdown table:
one row per (mode, headdim, seqlen, causal), TFLOP/s per implementation, and
jax_flash's ratio to cuDNN and to PyTorch's FlashAttention-2.

    python benchmarks/results_table.py benchmarks/results/<file>.json
"""

import json
import sys


def table(path):
    data = json.load(open(path))
    impls = list(dict.fromkeys(r["impl"] for r in data["rows"]))
    cells = {}
    for r in data["rows"]:
        key = (r["mode"], r["headdim"], r["seqlen"], r["causal"])
        cells.setdefault(key, {})[r["impl"]] = r["tflops"]
    ratios = [o for o in ("cudnn", "torch_fa2") if o in impls and "jax_flash" in impls]
    head = ["mode", "headdim", "seqlen", "causal", *impls, *(f"jax_flash / {o}" for o in ratios)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (mode, d, s, causal), row in sorted(cells.items()):
        fmt = lambda x: "-" if x is None else f"{x:.0f}"
        ratio = lambda o: "-" if None in (row.get("jax_flash"), row.get(o)) else (
            f"{row['jax_flash'] / row[o]:.2f}")
        vals = [mode, str(d), str(s), "yes" if causal else "no",
                *(fmt(row.get(i)) for i in impls), *(ratio(o) for o in ratios)]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
