"""Compare two or three bench_attention.py result files row by row.

    python benchmarks/compare_results.py BEFORE.json AFTER.json [BEFORE2.json] [--impl jax_flash]

Prints, per (head dim, seqlen, causal, mode) of the chosen implementation:
before ms, after ms and after/before. With BEFORE2 (the old code timed again
after the new one, ABA), "before" is the mean of the two old runs and the
before2/before column shows the drift between them. Ends with the worst
(largest) after/before ratio and the geometric mean. Rows missing from a
file or with an error are shown as "-". Always exits 0.
"""

import argparse
import json
import math


def load(path, impl):
    with open(path) as f:
        data = json.load(f)
    rows = {}
    for r in data["rows"]:
        if r.get("impl") == impl and "headdim" in r and "seqlen" in r:
            key = (r["headdim"], r["seqlen"], bool(r.get("causal", False)), r.get("mode", "?"))
            rows[key] = r.get("ms")
    return data, rows


def fmt(x, width, prec=3):
    return f"{x:>{width}.{prec}f}" if x is not None else f"{'-':>{width}}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("before2", nargs="?")
    p.add_argument("--impl", default="jax_flash")
    a = p.parse_args()

    runs = [load(a.before, a.impl), load(a.after, a.impl)]
    if a.before2:
        runs.append(load(a.before2, a.impl))
    for (data, rows), path in zip(runs, [a.before, a.after, a.before2]):
        print(f"{path}: {data.get('gpu')} jax {data.get('jax_version')}, "
              f"{len(rows)} {a.impl} rows, repeats {data.get('repeats')}")
    keys = sorted(set().union(*(rows for _, rows in runs)),
                  key=lambda k: (k[3], k[0], k[2], k[1]))

    three = len(runs) == 3
    header = (f"{'hdim':>4} {'seqlen':>6} {'causal':>6} {'mode':>7} {'before':>9}"
              + (f" {'before2':>9}" if three else "") + f" {'after':>9} {'after/before':>12}"
              + (f" {'before2/before':>14}" if three else ""))
    print(f"\n{a.impl}, ms (median per call)" + ("; before = mean of before and before2" if three else ""))
    print(header + "\n" + "-" * len(header))
    ratios, drifts = [], []
    for key in keys:
        b1 = runs[0][1].get(key)
        af = runs[1][1].get(key)
        b2 = runs[2][1].get(key) if three else None
        olds = [x for x in (b1, b2) if x is not None]
        before = sum(olds) / len(olds) if olds else None
        ratio = af / before if af is not None and before else None
        drift = b2 / b1 if three and b1 and b2 is not None else None
        if ratio is not None:
            ratios.append((ratio, key))
        if drift is not None:
            drifts.append(drift)
        line = (f"{key[0]:>4} {key[1]:>6} {str(key[2]):>6} {key[3]:>7} {fmt(before if three else b1, 9)}"
                + (f" {fmt(b2, 9)}" if three else "") + f" {fmt(af, 9)} {fmt(ratio, 12)}"
                + (f" {fmt(drift, 14)}" if three else ""))
        print(line)
    print()
    if ratios:
        worst, key = max(ratios)
        best, bkey = min(ratios)
        geo = math.exp(sum(math.log(r) for r, _ in ratios) / len(ratios))
        print(f"worst after/before: {worst:.3f} (d={key[0]} s={key[1]} causal={key[2]} {key[3]}); "
              f"best {best:.3f} (d={bkey[0]} s={bkey[1]} causal={bkey[2]} {bkey[3]}); "
              f"geomean {geo:.3f} over {len(ratios)} rows")
    else:
        print("no row was timed in both files")
    if drifts:
        print(f"drift before2/before: {min(drifts):.3f} .. {max(drifts):.3f}")


if __name__ == "__main__":
    main()
