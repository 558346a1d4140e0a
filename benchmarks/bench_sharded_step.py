"""Sharded attention step: weak scaling of jax_flash over the GPUs of one host.

One "step" is attention forward + backward (jax.vjp with a cotangent)
under `jax.jit`, with q/k/v sharded over a 1-D mesh of n devices along the
batch ("batch" split) or the heads ("heads" split). Each device always holds
the same work (`--batch` sequences per device for the batch split; all
`--batch` sequences and `--heads` heads per device for the head split, i.e.
n x the heads in all), so with perfect scaling the step time stays that of
one device. Per (split, n, seqlen) a row holds:

  ms           median step time (bench_attention.time_jax)
  efficiency   one device's step time at 1x the work / this row's time
               (goal: >= 0.95)
  collectives  the collective ops in the compiled step (all-gather,
               all-to-all, collective-permute, all-reduce, reduce-scatter);
               jax_flash's partitioning rules promise none for these
               splits (MHA, or K/V heads split like the query heads)

Defaults: bf16, head dim 128, 16 heads (16 K/V heads), causal, seqlens 2048
and 8192, 8 x 2048 tokens per device; n = 1, 2, 4, ... up to the visible
GPUs. Usage:

  python benchmarks/bench_sharded_step.py               # all visible GPUs
  python benchmarks/bench_sharded_step.py --devices 1,2 --seqlens 8192
  python benchmarks/bench_sharded_step.py --smoke       # 8 CPU host devices, tiny

`--smoke` sets XLA_FLAGS for 8 host devices (before JAX starts) and runs tiny
shapes on the plain-JAX reference: it proves the script and the collective
check work; its times mean nothing. Output:
benchmarks/results/<gpu>_<YYYY-MM-DD>_sharded_step[_smoke].json and .md.
"""

import argparse
import datetime
import os
import re
import sys

if "--smoke" in sys.argv and "xla_force_host_platform_device_count" not in \
        os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_flash  # noqa: E402
from bench_attention import short_error, time_jax  # noqa: E402
from results_io import gpu_name, result_stem, save_json  # noqa: E402

COLLECTIVES = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce|"
                         r"reduce-scatter)(-start)?\b")


def step_fn(causal):
    def step(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=causal),
                           q, k, v)
        return (out, *vjp(d_out))
    return step


def run(split, n, seqlen, args):
    """One row: time and collectives of the step on n devices."""
    devices = np.array(jax.devices()[:n])
    mesh = jax.sharding.Mesh(devices, ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    batch, heads = args.batch, args.heads
    if split == "batch":
        batch *= n
        spec = P("x")
    else:
        heads *= n
        spec = P(None, None, "x")
    sharding = NamedSharding(mesh, spec)
    rng = np.random.default_rng(args.seed)
    shape = (batch, seqlen, heads, args.head_dim)

    def array():
        x = rng.standard_normal(shape, np.float32).astype(jnp.bfloat16)
        return jax.device_put(x, sharding)

    inputs = [tuple(array() for _ in range(4)) for _ in range(2)]
    fn = jax.jit(step_fn(args.causal), out_shardings=(sharding,) * 4)
    text = fn.lower(*inputs[0]).compile().as_text()
    found = sorted({m.group(1) for m in COLLECTIVES.finditer(text)})
    seconds = time_jax(fn, inputs, args.repeats)
    return dict(split=split, devices=n, seqlen=seqlen, batch=batch, heads=heads,
                head_dim=args.head_dim, causal=args.causal, ms=seconds * 1e3,
                collectives=found)


def markdown(rows):
    lines = ["| split | devices | seqlen | batch | heads | ms | efficiency | collectives |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ms = "-" if r.get("ms") is None else f"{r['ms']:.3f}"
        eff = "-" if r.get("efficiency") is None else f"{r['efficiency']:.3f}"
        coll = r.get("error") or (", ".join(r["collectives"]) or "none")
        lines.append(f"| {r['split']} | {r['devices']} | {r['seqlen']} | {r['batch']} | "
                     f"{r['heads']} | {ms} | {eff} | {coll} |")
    return "\n".join(lines)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="8 CPU host devices, tiny shapes")
    p.add_argument("--devices", default=None, help="device counts, default 1,2,4,.. <= visible")
    p.add_argument("--splits", default="batch,heads")
    p.add_argument("--seqlens", default="2048,8192")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per device")
    p.add_argument("--heads", type=int, default=16, help="heads per device")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args()
    if args.smoke:
        args.seqlens, args.tokens, args.heads, args.head_dim, args.repeats = "64", 128, 2, 32, 3
    args.causal = bool(args.causal)
    return args


def main():
    args = parse_args()
    visible = len(jax.devices())
    if args.devices:
        counts = [int(c) for c in args.devices.split(",") if int(c) <= visible]
    else:
        counts = [c for c in (1, 2, 4, 8) if c <= visible]
    rows = []
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        args.batch = max(1, args.tokens // seqlen)
        for split in args.splits.split(","):
            base = None
            for n in counts:
                try:
                    row = run(split, n, seqlen, args)
                except Exception as e:  # noqa: BLE001 - a row records the failure
                    row = dict(split=split, devices=n, seqlen=seqlen, batch=args.batch,
                               heads=args.heads, ms=None, collectives=[],
                               error=short_error(e))
                if n == 1 and row["ms"] is not None:
                    base = row["ms"]
                row["efficiency"] = (base / row["ms"]) if base and row["ms"] else None
                rows.append(row)
                print(markdown([row]).splitlines()[-1], flush=True)
    result = dict(
        benchmark="sharded_step", device=gpu_name(), devices_visible=visible,
        date=datetime.date.today().isoformat(), jax=jax.__version__, smoke=args.smoke,
        definitions=dict(
            step="jit(jax.vjp(flash_attn_func)) forward + backward, inputs sharded",
            efficiency="ms of one device at 1x the work / ms of this row (same per-device "
                       "work)"),
        rows=rows)
    stem = result_stem(args.out, "sharded_step", "smoke" if args.smoke else "")
    save_json(stem + ".json", result)
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows) + "\n")
    print(markdown(rows))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
