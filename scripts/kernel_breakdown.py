"""Per-kernel times of one jax_flash training step (forward + backward of one
vjp), for `ncu` to time kernel by kernel:

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \\
        python scripts/kernel_breakdown.py run BATCH SEQLEN NHEADS HEAD_DIM > log.csv
    python scripts/kernel_breakdown.py table log.csv

`run` executes the step REPEATS (4) times after compiling it; `table` takes
the last REPEATS launches of every kernel from ncu's CSV and prints their
median time, so the backward's preprocess, main and convert kernels can be
weighed against each other and against the forward.
"""

import csv
import statistics
import sys

REPEATS = 4  # with the compile run, 5 launches per step kernel; the 4 inputs differ


def run(batch, seqlen, nheads, head_dim):
    import os

    import jax

    import jax_flash

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "benchmarks"))
    from bench_attention import jax_benchmark_fn, make_jax_inputs

    q, k, v, do = make_jax_inputs(0, (batch, seqlen, nheads, head_dim), n_sets=1)[0]
    step = jax_benchmark_fn(jax_flash.flash_attn_func, "fwd_bwd")
    jax.block_until_ready(step(q, k, v, do))
    for _ in range(REPEATS):
        jax.block_until_ready(step(q, k, v, do))


def table(path):
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    times = {}
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"].split("<")[0].split("(")[0]
        times.setdefault(name, []).append(float(row["Metric Value"].replace(",", "")))
    if not times:
        sys.exit(f"no gpu__time_duration rows in {path}")
    total = 0.0
    for name, ts in times.items():
        if len(ts) % (REPEATS + 1):
            continue  # one-off launches (input generation), not part of a step
        last = ts[-REPEATS:]
        us = statistics.median(last) / 1e3
        total += us * len(ts) / (REPEATS + 1)
        print(f"{name:40s} {us:10.1f} us  (launches {len(ts)})")
    print(f"{'per step, all kernels':40s} {total:10.1f} us")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "run":
        run(*(int(x) for x in sys.argv[2:6]))
    elif len(sys.argv) == 3 and sys.argv[1] == "table":
        table(sys.argv[2])
    else:
        sys.exit(__doc__)
