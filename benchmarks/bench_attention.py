"""Attention benchmark: jax_flash vs cuDNN vs XLA (vs PyTorch FlashAttention-2).

All implementations run in one process on the same shapes, in bfloat16:

  jax_flash  jax_flash.flash_attn_func(q, k, v, causal=...)          (B, T, N, H)
  jax_flash_det  the same with deterministic=True (differs in fwd_bwd only)
  cudnn      jax.nn.dot_product_attention(..., implementation="cudnn") (B, T, N, H)
  xla        jax.nn.dot_product_attention(..., implementation="xla")   (B, T, N, H)
  torch_fa2  torch SDPA restricted to SDPBackend.FLASH_ATTENTION       (B, N, T, H)
             (only if torch with CUDA is importable; own random inputs)

Shapes follow the FlashAttention benchmark convention: the total number of
tokens batch * seqlen is fixed (default 16384) and the hidden size is fixed
(default 2048), so batch = tokens // seqlen and nheads = hidden // headdim.

FLOPs: forward = 4 * batch * seqlen^2 * nheads * headdim, halved when causal;
forward+backward = 3.5 * forward.  TFLOP/s = FLOPs / median time.

Timing: each function is jitted, compiled and warmed up (3 runs); then each of
`--repeats` samples times a loop of several back-to-back calls between two
device syncs, and the median per-call time is reported.  Inputs rotate between
two random-normal sets.  An implementation that raises (unsupported shape,
OOM, missing package) gets a row with ms=None and a shortened error; the run
goes on.  Rows are written to JSON after every configuration, so a killed run
keeps its partial results.

Usage:
  python benchmarks/bench_attention.py                      # full fwd sweep
  python benchmarks/bench_attention.py --modes fwd,fwd_bwd --headdims 128
  python benchmarks/bench_attention.py --quick --impls xla  # CPU smoke test

Output: benchmarks/results/<gpu>_<YYYY-MM-DD>[_<tag>].json plus a table.
"""

import argparse
import gc
import os
import statistics
import time

# Leave GPU memory to torch (and to XLA's big score matrices) instead of
# preallocating 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from results_io import header, result_stem, save_json  # noqa: E402

ALL_IMPLS = ("jax_flash", "jax_flash_det", "cudnn", "xla", "torch_fa2")
WARMUP = 3
# Each timed sample is about 50 ms of back-to-back calls (at most 100
# calls): the host's wait for
# the last call and its first dispatch (~0.3-0.5 ms a sample on the H200
# machine, scripts/dispatch_check.py) then stay under 1% of a sample. With
# 10 ms samples they took up to 15% of a 4 ms call (notes, entry 21).
TARGET_LOOP_S = 0.05


def short_error(e, limit=300):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:limit]


def fwd_flops(batch, seqlen, nheads, headdim, causal):
    flops = 4 * batch * seqlen * seqlen * nheads * headdim
    return flops / 2 if causal else flops


# ----------------------------------------------------------------------------
# JAX implementations
# ----------------------------------------------------------------------------

def jax_attention(impl, causal):
    """Return attn(q, k, v) -> out for a JAX implementation, (B, T, N, H)."""
    import jax_flash  # only when asked for: the other rows run without it

    if impl == "jax_flash":
        return lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=causal)
    if impl == "jax_flash_det":  # deterministic backward
        return lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=causal, deterministic=True)
    if impl in ("cudnn", "xla"):
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=impl)
    raise ValueError(f"unknown JAX impl {impl!r}")


def jax_benchmark_fn(attn, mode):
    if mode == "fwd":
        return jax.jit(lambda q, k, v, do: attn(q, k, v))

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(do)

    return jax.jit(fwd_bwd)


def make_jax_inputs(seed, shape, n_sets=2):
    sets = []
    for i in range(n_sets):
        keys = jax.random.split(jax.random.key(seed + i), 4)
        sets.append(tuple(jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys))
    return sets


def time_jax(fn, input_sets, repeats):
    """Median per-call seconds of fn over loops of back-to-back calls."""
    for i in range(WARMUP):  # first call compiles
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*input_sets[0]))
    single = time.perf_counter() - t0
    inner = max(1, min(100, int(TARGET_LOOP_S / max(single, 1e-6))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(inner):
            out = fn(*input_sets[i % len(input_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
        del out
    return statistics.median(samples)


def run_jax(impl, mode, shape, causal, repeats, seed):
    input_sets = make_jax_inputs(seed, shape)
    try:
        fn = jax_benchmark_fn(jax_attention(impl, causal), mode)
        return time_jax(fn, input_sets, repeats)
    finally:
        del input_sets
        gc.collect()


# ----------------------------------------------------------------------------
# PyTorch FlashAttention-2 (SDPA flash backend)
# ----------------------------------------------------------------------------

def torch_available():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def run_torch(mode, shape, causal, repeats, seed):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, t, n, h = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    grad = mode == "fwd_bwd"

    def rand():
        return torch.randn((b, n, t, h), device="cuda", dtype=torch.bfloat16,
                           generator=gen, requires_grad=grad)

    input_sets = [tuple(rand() for _ in range(3)) + (rand().detach(),) for _ in range(2)]

    def call(q, k, v, do):
        if mode == "fwd":
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return torch.autograd.grad(out, (q, k, v), do)

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for i in range(WARMUP):
                call(*input_sets[i % 2])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call(*input_sets[0])
            torch.cuda.synchronize()
            single = time.perf_counter() - t0
            inner = max(1, min(100, int(TARGET_LOOP_S / max(single, 1e-6))))
            samples = []
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(inner):
                    call(*input_sets[i % 2])
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / inner)
        return statistics.median(samples)
    finally:
        del input_sets
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

def parse_list(s, typ=int):
    return [typ(x) for x in s.split(",") if x.strip()]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--headdims", default=None, help="default 64,128,256")
    p.add_argument("--seqlens", default=None,
                   help="default 512,1024,2048,4096,8192,16384")
    p.add_argument("--causal", default="both", choices=("both", "true", "false"))
    p.add_argument("--modes", default="fwd", help="fwd and/or fwd_bwd")
    p.add_argument("--impls", default="jax_flash,cudnn,xla,torch_fa2",
                   help=f"comma list of {ALL_IMPLS}")
    p.add_argument("--repeats", type=int, default=None, help="default 20")
    p.add_argument("--tokens", type=int, default=None, help="batch*seqlen, default 16384")
    p.add_argument("--hidden", type=int, default=None, help="nheads*headdim, default 2048")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="tiny subset (tokens 512, hidden 256, seqlens 128,256, headdim 64)")
    a = p.parse_args()
    quick = dict(headdims="64", seqlens="128,256", repeats=5, tokens=512, hidden=256)
    full = dict(headdims="64,128,256", seqlens="512,1024,2048,4096,8192,16384",
                repeats=20, tokens=16384, hidden=2048)
    for name, default in (quick if a.quick else full).items():
        if getattr(a, name) is None:
            setattr(a, name, default)
    a.headdims, a.seqlens = parse_list(a.headdims), parse_list(a.seqlens)
    a.modes, a.impls = parse_list(a.modes, str), parse_list(a.impls, str)
    a.causals = {"both": [False, True], "true": [True], "false": [False]}[a.causal]
    for m in a.modes:
        if m not in ("fwd", "fwd_bwd"):
            p.error(f"unknown mode {m!r}")
    for i in a.impls:
        if i not in ALL_IMPLS:
            p.error(f"unknown impl {i!r}; choose from {ALL_IMPLS}")
    return a


def print_table(rows, impls):
    tf = {(r["mode"], r["headdim"], r["seqlen"], r["causal"], r["impl"]): r["tflops"]
          for r in rows}
    keys = sorted({(r["mode"], r["headdim"], r["seqlen"], r["causal"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[3], k[2]))
    ratios = [o for o in ("cudnn", "torch_fa2") if "jax_flash" in impls and o in impls]
    header = f"{'mode':8} {'hdim':>4} {'seqlen':>6} {'causal':>6} " + " ".join(
        f"{i:>10}" for i in impls) + "".join(f" {'jf/' + o:>13}" for o in ratios)
    print("\nTFLOP/s (median)\n" + header + "\n" + "-" * len(header))
    for key in keys:
        vals = [tf.get(key + (i,)) for i in impls]
        line = f"{key[0]:8} {key[1]:>4} {key[2]:>6} {str(key[3]):>6} " + " ".join(
            f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in vals)
        for o in ratios:
            jf, other = tf.get(key + ("jax_flash",)), tf.get(key + (o,))
            line += f" {jf / other:>13.2f}" if jf and other else f" {'-':>13}"
        print(line)


def main():
    args = parse_args()
    path = result_stem(args.out, args.tag) + ".json"
    result = {**header(), "tokens": args.tokens, "hidden": args.hidden,
              "repeats": args.repeats, "rows": []}
    gpu = result["gpu"]
    has_torch = "torch_fa2" in args.impls and torch_available()
    if has_torch:
        import torch
        result["torch_version"] = torch.__version__
    print(f"gpu={gpu} jax={jax.__version__} -> {path}")

    for mode in args.modes:
        for headdim in args.headdims:
            nheads = args.hidden // headdim
            for seqlen in args.seqlens:
                batch = max(1, args.tokens // seqlen)
                shape = (batch, seqlen, nheads, headdim)
                for causal in args.causals:
                    flops = fwd_flops(batch, seqlen, nheads, headdim, causal)
                    if mode == "fwd_bwd":
                        flops *= 3.5
                    for impl in args.impls:
                        row = dict(impl=impl, headdim=headdim, seqlen=seqlen, batch=batch,
                                   nheads=nheads, causal=causal, mode=mode, ms=None,
                                   tflops=None, gpu=gpu)
                        try:
                            if impl == "torch_fa2":
                                if not has_torch:
                                    raise RuntimeError("torch with CUDA not available")
                                sec = run_torch(mode, shape, causal, args.repeats, args.seed)
                            else:
                                sec = run_jax(impl, mode, shape, causal, args.repeats,
                                              args.seed)
                            row["ms"] = sec * 1e3
                            row["tflops"] = flops / sec / 1e12
                        except Exception as e:  # noqa: BLE001 - record and continue
                            row["error"] = short_error(e)
                        result["rows"].append(row)
                        status = (f"{row['ms']:9.3f} ms {row['tflops']:8.2f} TFLOP/s"
                                  if row["ms"] is not None else f"ERROR {row['error'][:80]}")
                        print(f"{mode:7} d={headdim:<3} s={seqlen:<5} b={batch:<3} "
                              f"h={nheads:<3} causal={causal!s:5} {impl:9} {status}",
                              flush=True)
                    save_json(path, result)  # incremental: survive a killed run
                    jax.clear_caches()
                    gc.collect()

    print_table(result["rows"], args.impls)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
