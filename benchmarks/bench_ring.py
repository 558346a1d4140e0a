"""Ring-attention benchmark: context parallelism over n GPUs vs one GPU.

For every n in --ngpus (default: all visible devices, and 1) and every total
sequence length T in --tokens (default 128k, 256k, 512k, 1M), causal
attention in bfloat16, batch 1, 32 query heads, 8 K/V heads (GQA), head dim
128 (all configurable), forward and forward+backward, four implementations:

  ring       jax_flash.ring.ring_attention(kv_exchange="ring") inside
             jax.shard_map, the sequence sharded over the n devices in the
             zigzag layout (device i holds chunks i and 2n-1-i of 2n), K/V
             blocks passed round the ring with collective-permutes.
  allgather  the same call with kv_exchange="allgather": one all-gather of
             K/V, the ring's per-step block calls on the gathered blocks, a
             reduce-scatter of dK/dV in the backward.
  allgather_varlen
             inside the same shard_map: all-gather K and V over the axis
             (tiled), then one local flash_attn_varlen_func. Exact causal
             masking in the zigzag layout: the device's two query chunks
             become two variable-length sequences whose keys are the
             natural-order prefixes the chunk may see (chunks 0..i and
             0..2n-1-i), gathered from the all-gathered K/V into one buffer of
             T + T/(2n) rows by one jnp.take; causal is bottom-right aligned
             per sequence, so every query sees exactly the keys at or before
             its global position. (That gather is timed too.)
  single     the one-GPU baseline: flash_attn_func(causal=True) on one GPU at
             the per-GPU sequence length L = T / n (same batch, heads).

Definitions (also stored in the JSON under "definitions"):

  F(S)            causal forward FLOPs of sequence length S:
                  2 * batch * S^2 * nheads * headdim (bench_attention's
                  fwd_flops: 4 * b * S^2 * h * d halved for causal);
                  forward+backward counts 3.5 * F(S).
  tokens/s/GPU    batch * T / time / n.
  TFLOP/s/GPU     F(T) / n / time (x3.5 for fwd_bwd): each GPU's share of
                  the whole sequence's causal FLOPs.
  work_ratio      (F(T) / n) / F(T / n) = n: a ring over n GPUs at total T
                  does n^2 times the work of one GPU at T / n in all, n times
                  it per GPU (the zigzag layout spreads it evenly).
  efficiency      single_time(T / n) * work_ratio / time(T, n): the one-GPU
                  call's time at the same per-GPU sequence length scaled to
                  the per-GPU work of the ring, over the measured time.
                  Equivalently the ring's TFLOP/s/GPU over the one-GPU
                  call's TFLOP/s at T / n. 1.0 = the ring runs each GPU's
                  share at the single-GPU kernel's rate (communication fully
                  hidden, no merge overhead); the ring's steps are mostly
                  non-causal half blocks, which can run a little faster per
                  FLOP than one causal call, so values slightly above 1 are
                  possible. Same definition for the all-gather rows.

Equality check (--check-tokens, default 4096, one ring over the largest n):
the ring's output and gradients (jax.vjp with a random cotangent) against
flash_attn_func on one GPU on the same global inputs, and both (and
both all-gathers) against jax_flash.reference.attention_ref in float32 by
FlashAttention's rule: max error vs float32 within 2x (out) / 3x (dq, dk,
dv) of the same reference computed in bfloat16, plus 1e-5. Stored under
"check" with every error and the verdict.

Timing: bench_attention.time_jax (compile, 3 warm-up calls, median of
--repeats loops of back-to-back calls, inputs alternating between two
random sets), except for calls over LONG_CALL_S seconds: those take the
median of min(--repeats, 3) single calls after one warm-up call. Per-row
errors (OOM, unsupported) are recorded and the run goes on; the JSON is
rewritten after every row. Rows whose per-GPU length exceeds --max-local
(default 262144; the 1M-token one-GPU causal fwd+bwd alone takes about a
minute a call) are recorded as skipped.

Usage:
  python benchmarks/bench_ring.py                               # all GPUs and 1
  python benchmarks/bench_ring.py --ngpus 8,4,2,1 --tokens 131072,1048576
  python benchmarks/bench_ring.py --smoke    # tiny sizes, 8 host CPU devices, < 1 min
                                             # (T 256, 4/2 heads, d 32, check at T 128)

Output: benchmarks/results/<gpu>_<YYYY-MM-DD>_ring[_<tag>].json and a
Markdown table beside it (.md); --smoke adds the tag "smoke".
"""

import os
import sys

if "--smoke" in sys.argv:
    # 8 host devices for the CPU smoke run, and XLA's generated code built at
    # LLVM -O0 (compiling dominates at tiny sizes: 45 s instead of 80 s on 2
    # cores). XLA reads XLA_FLAGS once, at backend initialisation, so before
    # jax is imported. On a GPU machine the device count only affects the
    # unused host platform; -O0 only XLA's own fusions, not jax_flash's kernels.
    for _flag, _value in (("--xla_force_host_platform_device_count", "8"),
                          ("--xla_backend_optimization_level", "0")):
        if _flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}={_value}".strip()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_attention import (  # noqa: E402,I001
    fwd_flops, jax_benchmark_fn, parse_list, short_error, time_jax)
from results_io import header, result_stem, save_json  # noqa: E402

import jax_flash  # noqa: E402
from jax_flash import reference  # noqa: E402
from jax_flash.ring import ring_attention, zigzag_shard  # noqa: E402

IMPLS = ("ring", "allgather", "allgather_varlen", "single")
LONG_CALL_S = 1.0
AXIS = "sp"

DEFINITIONS = {
    "F(S)": "causal forward FLOPs at sequence length S: 2 * batch * S^2 * nheads * headdim "
            "(bench_attention.fwd_flops); fwd_bwd counts 3.5 * F(S)",
    "tokens_per_s_per_gpu": "batch * tokens / time / n",
    "tflops_per_gpu": "F(tokens) / n / time (x3.5 for fwd_bwd)",
    "work_ratio": "(F(tokens) / n) / F(tokens / n) = n: per-GPU work of the ring over n GPUs "
                  "at the total length vs one GPU's causal call at tokens / n",
    "efficiency": "single_ms(tokens / n) * work_ratio / ms: the one-GPU flash_attn_func "
                  "causal time at the same per-GPU sequence length, scaled by work_ratio, over "
                  "the measured time (= tflops_per_gpu / the one-GPU call's TFLOP/s); 1.0 = "
                  "the single-GPU rate, values slightly above 1 possible (the ring's steps are "
                  "mostly non-causal half blocks)",
    "ring": "ring_attention(causal=True, layout='zigzag', kv_exchange='ring')",
    "allgather": "ring_attention(causal=True, layout='zigzag', kv_exchange='allgather'): one "
                 "all-gather of K/V, the ring's per-step calls on the gathered blocks, a "
                 "reduce-scatter of dK/dV",
    "allgather_varlen": "exact causal: all-gather K/V (tiled) inside shard_map, one jnp.take into "
                 "per-query-chunk natural-order key prefixes (T + T/(2n) rows), "
                 "flash_attn_varlen_func(causal=True) with two sequences per batch element "
                 "(bottom-right aligned); the take is timed",
    "single": "flash_attn_func(causal=True) on one GPU at seqlen tokens / n (the baseline)",
    "temp_bytes_per_device": "the compiled program's temporary buffers on one device "
                             "(memory_analysis; arguments and outputs not included): linear in "
                             "the local sequence length for the ring",
    "collectives": "collective ops in the compiled program (name -> count)",
}


# ---- Implementations -------------------------------------------------------------


def make_mesh(n):
    devices = jax.devices()
    if len(devices) < n:
        raise RuntimeError(f"needs {n} devices, {len(devices)} visible")
    return jax.sharding.Mesh(np.asarray(devices[:n]), (AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))


def ring_fn(mesh, kv_exchange="ring"):
    """Global (b, T, h, d) arrays in zigzag order -> the output, zigzag order."""
    spec = P(None, AXIS)
    return jax.shard_map(
        lambda q, k, v: ring_attention(q, k, v, axis_name=AXIS, causal=True, layout="zigzag",
                                       kv_exchange=kv_exchange),
        mesh=mesh, in_specs=spec, out_specs=spec)


def zigzag_order(n, seqlen):
    """order[j] = the natural position at index j of the zigzag layout."""
    return np.asarray(zigzag_shard(np.arange(seqlen)[None], n))[0]


def allgather_varlen_fn(mesh, n, batch, tokens, nheads, nheads_k, headdim):
    """All-gather + one varlen call; same layout as ring_fn."""
    local = tokens // n
    half = local // 2
    rows = tokens + half  # keys of both query chunks: (i + 1) + (2n - i) chunks
    # natural position -> its index in the all-gathered (device-order = zigzag) K/V
    zz_index = jnp.asarray(np.argsort(zigzag_order(n, tokens)), jnp.int32)
    cu_q = jnp.arange(2 * batch + 1, dtype=jnp.int32) * half

    def local_fn(q, k, v):
        i = jax.lax.axis_index(AXIS)
        split = (i + 1) * half  # keys of chunk i: natural 0 .. split - 1
        t = jnp.arange(rows, dtype=jnp.int32)
        index = zz_index[jnp.where(t < split, t, t - split)]
        gather = lambda x: jnp.take(jax.lax.all_gather(x, AXIS, axis=1, tiled=True), index,
                                    axis=1).reshape(batch * rows, nheads_k, headdim)
        starts = jnp.arange(batch, dtype=jnp.int32) * rows
        cu_k = jnp.concatenate([jnp.stack([starts, starts + split], axis=1).reshape(-1),
                                jnp.full((1,), batch * rows, jnp.int32)]).astype(jnp.int32)
        out = jax_flash.flash_attn_varlen_func(
            q.reshape(batch * local, nheads, headdim), gather(k), gather(v), cu_q, cu_k,
            half, tokens, causal=True)
        return out.reshape(batch, local, nheads, headdim)

    spec = P(None, AXIS)
    return jax.shard_map(local_fn, mesh=mesh, in_specs=spec, out_specs=spec)


def single_fn(q, k, v):
    return jax_flash.flash_attn_func(q, k, v, causal=True)


@functools.lru_cache(maxsize=None)
def _normal_draw(shapes, sharding):
    """Jitted keys -> bf16 random-normal arrays of `shapes`, laid out by
    `sharding`; one per (shapes, sharding), so each compiles once a run."""
    def draw(keys):
        return tuple(jax.random.normal(k, shape, jnp.bfloat16) for k, shape in zip(keys, shapes))
    return jax.jit(draw, out_shardings=(sharding,) * len(shapes))


def make_inputs(seed, batch, seqlen, nheads, nheads_k, headdim, sharding, n_sets=2):
    """n_sets random-normal (q, k, v, d_out) sets, created already sharded."""
    shapes = tuple((batch, seqlen, h, headdim) for h in (nheads, nheads_k, nheads_k, nheads))
    draw = _normal_draw(shapes, sharding)
    return [draw(jax.random.split(jax.random.key(seed + s), 4)) for s in range(n_sets)]


_COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce|"
                         r"reduce-scatter|collective-broadcast)(?:-start)?\(")


def compiled_facts(compiled):
    """Per-device temporary memory (bytes) and the collective ops (name ->
    count) of a compiled program."""
    counts = {}
    for m in _COLLECTIVE.finditer(compiled.as_text()):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    memory = compiled.memory_analysis()
    return {"temp_bytes_per_device": getattr(memory, "temp_size_in_bytes", None),
            "collectives": counts}


def timed(fn, input_sets, repeats):
    """Median seconds per call: time_jax, or for calls over LONG_CALL_S the
    median of min(repeats, 3) single calls after one warm-up."""
    jax.block_until_ready(fn(*input_sets[0]))  # compiles
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*input_sets[1 % len(input_sets)]))
    if time.perf_counter() - t0 <= LONG_CALL_S:
        return time_jax(fn, input_sets, repeats)
    samples = []
    for r in range(max(1, min(repeats, 3))):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*input_sets[r % len(input_sets)]))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


# ---- Equality check ------------------------------------------------------------------


def vjp(fn, q, k, v, d_out):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(d_out)


def equality_check(a, n):
    """Ring (and the all-gathers) over n devices vs flash_attn_func on one device
    and vs attention_ref in float32, by FlashAttention's rule."""
    tokens, b = a.check_tokens, a.batch
    result = dict(n=n, tokens=tokens, batch=b, nheads=a.nheads, nheads_k=a.nheads_k,
                  headdim=a.headdim, dtype="bfloat16", causal=True, layout="zigzag",
                  rule="max|x - ref32| <= factor * max|ref_bf16 - ref32| + atol, factor 2 "
                       "(out) / 3 (dq, dk, dv), atol 1e-5")
    if tokens % (2 * n):
        result["error"] = f"check tokens {tokens} not divisible by 2n = {2 * n}"
        return result
    rng = np.random.default_rng(a.seed)
    shapes = [(b, tokens, h, a.headdim) for h in (a.nheads, a.nheads_k, a.nheads_k, a.nheads)]
    host = [rng.standard_normal(s, np.float32).astype(jnp.bfloat16) for s in shapes]
    order = zigzag_order(n, tokens)
    inverse = np.argsort(order)
    mesh = make_mesh(n)
    sharded = NamedSharding(mesh, P(None, AXIS))
    zz = [jax.device_put(x[:, order], sharded) for x in host]
    results = {}
    impls = {"ring": ring_fn(mesh), "allgather": ring_fn(mesh, "allgather"),
             "allgather_varlen": allgather_varlen_fn(mesh, n, b, tokens, a.nheads, a.nheads_k,
                                                     a.headdim)}
    for name, fn in impls.items():
        try:
            out = jax.jit(lambda q, k, v, d, fn=fn: vjp(fn, q, k, v, d))(*zz)
            results[name] = jax.tree.map(lambda x: np.asarray(x, np.float32)[:, inverse], out)
        except Exception as e:  # noqa: BLE001 - record and continue
            result[f"{name}_error"] = short_error(e)
        gc.collect()
    one = [jax.device_put(x, jax.devices()[0]) for x in host]
    f32 = lambda x: x.astype(jnp.float32)
    ref = lambda up: lambda q, k, v: reference.attention_ref(q, k, v, causal=True,
                                                            upcast=up)[0]
    results["single"] = jax.jit(lambda q, k, v, d: vjp(single_fn, q, k, v, d))(*one)
    results["ref32"] = jax.jit(lambda q, k, v, d: vjp(ref(True), f32(q), f32(k), f32(v),
                                                      f32(d)))(*one)
    results["ref_bf16"] = jax.jit(lambda q, k, v, d: vjp(ref(False), q, k, v, d))(*one)
    flat = {name: [np.asarray(x, np.float32) for x in (r[0], *r[1])]
            for name, r in results.items()}
    errors, ok = {}, True
    for j, (what, factor) in enumerate((("out", 2.0), ("dq", 3.0), ("dk", 3.0), ("dv", 3.0))):
        r32, low = flat["ref32"][j], flat["ref_bf16"][j]
        low_err = float(np.abs(low - r32).max())
        entry = {"ref_bf16_err": low_err}
        for name in (*impls, "single"):
            if name not in flat:
                continue
            x = flat[name][j]
            err = float(np.abs(x - r32).max())
            passed = bool(np.isfinite(x).all() and err <= factor * low_err + 1e-5)
            entry[f"{name}_err"], entry[f"{name}_pass"] = err, passed
            ok &= passed
            if name != "single":
                entry[f"{name}_vs_single_max_abs"] = float(np.abs(x - flat["single"][j]).max())
        errors[what] = entry
    result["errors"] = errors
    result["pass"] = bool(ok and all(name in flat for name in impls))
    return result


# ---- Driver ------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ngpus", default=None, help="comma list; default: all visible devices,1")
    p.add_argument("--tokens", default=None,
                   help="total sequence lengths T, default 131072,262144,524288,1048576")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    p.add_argument("--batch", type=int, default=None, help="default 1")
    p.add_argument("--nheads", type=int, default=None, help="default 32")
    p.add_argument("--nheads-k", type=int, default=None, help="default 8")
    p.add_argument("--headdim", type=int, default=None, help="default 128")
    p.add_argument("--max-local", type=int, default=None,
                   help="skip rows whose per-GPU length T/n exceeds this (default 262144)")
    p.add_argument("--check-tokens", type=int, default=None,
                   help="T of the equality check, default 4096 (0: no check)")
    p.add_argument("--repeats", type=int, default=None, help="default 10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on whatever backend (CPU: 8 host devices), ~1 min")
    a = p.parse_args()
    smoke = dict(tokens="256", batch=1, nheads=4, nheads_k=2, headdim=32, max_local=1 << 20,
                 check_tokens=128, repeats=2)
    full = dict(tokens="131072,262144,524288,1048576", batch=1, nheads=32, nheads_k=8,
                headdim=128, max_local=262144, check_tokens=4096, repeats=10)
    for name, default in (smoke if a.smoke else full).items():
        if getattr(a, name) is None:
            setattr(a, name, default)
    if a.smoke and not a.tag:
        a.tag = "smoke"
    if a.ngpus is None:
        a.ngpus = sorted({len(jax.devices()), 1}, reverse=True)
    else:
        a.ngpus = parse_list(a.ngpus)
    a.tokens, a.modes, a.impls = parse_list(a.tokens), parse_list(a.modes, str), parse_list(
        a.impls, str)
    for m in a.modes:
        if m not in ("fwd", "fwd_bwd"):
            p.error(f"unknown mode {m!r}")
    for i in a.impls:
        if i not in IMPLS:
            p.error(f"unknown impl {i!r}; choose from {IMPLS}")
    return a


def markdown(rows):
    head = ["mode", "n", "tokens", "local", "impl", "ms", "Mtok/s/GPU", "TFLOP/s/GPU",
            "1-GPU ms @ local", "efficiency", "temp MiB/GPU", "collectives"]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["impl"] == "single":
            continue
        ms = r.get("ms")
        status = "skipped" if "skipped" in r else "error"
        cells = [r["mode"], str(r["n"]), str(r["tokens"]), str(r["local_seqlen"]), r["impl"],
                 fmt(ms, ".3f") if ms is not None else status,
                 fmt(r.get("tokens_per_s_per_gpu") and r["tokens_per_s_per_gpu"] / 1e6, ".3f"),
                 fmt(r.get("tflops_per_gpu"), ".1f"), fmt(r.get("single_ms"), ".3f"),
                 fmt(r.get("efficiency"), ".3f"),
                 fmt(r.get("temp_bytes_per_device") and r["temp_bytes_per_device"] / 2**20,
                     ".1f"),
                 " ".join(f"{k} {v}" for k, v in sorted(r.get("collectives", {}).items()))
                 or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    a = parse_args()
    stem = result_stem(a.out, "ring", a.tag)
    path = stem + ".json"
    result = {**header(), "devices": len(jax.devices()), "ngpus": a.ngpus, "tokens": a.tokens,
              "batch": a.batch, "nheads": a.nheads, "nheads_k": a.nheads_k,
              "headdim": a.headdim, "dtype": "bfloat16", "causal": True, "layout": "zigzag",
              "allgather_causal": "exact", "repeats": a.repeats, "max_local": a.max_local,
              "smoke": a.smoke, "definitions": DEFINITIONS, "rows": []}
    print(f"gpu={result['gpu']} devices={len(jax.devices())} jax={jax.__version__} -> {path}",
          flush=True)

    shape = dict(batch=a.batch, nheads=a.nheads, nheads_k=a.nheads_k, headdim=a.headdim)
    singles = {}  # (mode, local) -> ms of the one-GPU baseline

    def single_ms(mode, local):
        if (mode, local) not in singles:
            row = dict(mode=mode, impl="single", n=1, tokens=local, local_seqlen=local,
                       ms=None, **shape)
            try:
                sets = make_inputs(a.seed, a.batch, local, a.nheads, a.nheads_k, a.headdim,
                                   jax.sharding.SingleDeviceSharding(jax.devices()[0]))
                sec = timed(jax_benchmark_fn(single_fn, mode), sets, a.repeats)
                row["ms"] = sec * 1e3
                flops = fwd_flops(a.batch, local, a.nheads, a.headdim, True) * (
                    3.5 if mode == "fwd_bwd" else 1.0)
                row["tflops_per_gpu"] = flops / sec / 1e12
                row["tokens_per_s_per_gpu"] = a.batch * local / sec
                del sets
            except Exception as e:  # noqa: BLE001 - record and continue
                row["error"] = short_error(e)
            result["rows"].append(row)
            singles[(mode, local)] = row["ms"]
            print(f"{mode:7} single    n=1 local={local:<8} "
                  + (f"{row['ms']:10.3f} ms" if row["ms"] is not None
                     else f"ERROR {row['error'][:90]}"), flush=True)
            jax.clear_caches()
            gc.collect()
            save_json(path, result)
        return singles[(mode, local)]

    for mode in a.modes:
        for n in a.ngpus:
            for tokens in a.tokens:
                local = tokens // n
                for impl in (i for i in a.impls if i != "single"):
                    row = dict(mode=mode, impl=impl, n=n, tokens=tokens, local_seqlen=local,
                               ms=None, **shape)
                    if tokens % (2 * n):
                        row["skipped"] = f"tokens not divisible by 2n = {2 * n}"
                    elif local > a.max_local:
                        row["skipped"] = f"local seqlen {local} > --max-local {a.max_local}"
                    elif n > len(jax.devices()):
                        row["skipped"] = f"needs {n} devices, {len(jax.devices())} visible"
                    if "skipped" not in row:
                        try:
                            mesh = make_mesh(n)
                            fn = (allgather_varlen_fn(mesh, n, a.batch, tokens, a.nheads,
                                                      a.nheads_k, a.headdim)
                                  if impl == "allgather_varlen" else ring_fn(mesh, impl))
                            sets = make_inputs(a.seed, a.batch, tokens, a.nheads, a.nheads_k,
                                               a.headdim, NamedSharding(mesh, P(None, AXIS)))
                            compiled = jax_benchmark_fn(fn, mode).lower(*sets[0]).compile()
                            row.update(compiled_facts(compiled))
                            sec = timed(compiled, sets, a.repeats)
                            del sets
                            factor = 3.5 if mode == "fwd_bwd" else 1.0
                            flops = fwd_flops(a.batch, tokens, a.nheads, a.headdim, True)
                            local_flops = fwd_flops(a.batch, local, a.nheads, a.headdim, True)
                            row["ms"] = sec * 1e3
                            row["tokens_per_s_per_gpu"] = a.batch * tokens / sec / n
                            row["tflops_per_gpu"] = flops * factor / n / sec / 1e12
                            row["work_ratio"] = flops / n / local_flops
                        except Exception as e:  # noqa: BLE001 - record and continue
                            row["error"] = short_error(e)
                        jax.clear_caches()
                        gc.collect()
                    result["rows"].append(row)
                    if row["ms"] is not None and "single" in a.impls:
                        base = single_ms(mode, local)
                        row["single_ms"] = base
                        if base is not None:
                            row["efficiency"] = base * row["work_ratio"] / row["ms"]
                    status = (f"{row['ms']:10.3f} ms {row['tokens_per_s_per_gpu'] / 1e6:8.3f} "
                              f"Mtok/s/GPU {row['tflops_per_gpu']:7.1f} TFLOP/s/GPU"
                              + (f"  eff {row['efficiency']:.3f}" if "efficiency" in row
                                 else "")
                              if row["ms"] is not None else
                              f"SKIPPED {row['skipped']}" if "skipped" in row else
                              f"ERROR {row['error'][:90]}")
                    print(f"{mode:7} {impl:9} n={n:<2} T={tokens:<8} {status}", flush=True)
                    save_json(path, result)

    if a.check_tokens:
        n = max(x for x in a.ngpus if x <= len(jax.devices()))
        try:
            result["check"] = equality_check(a, n)
        except Exception as e:  # noqa: BLE001 - record it
            result["check"] = {"n": n, "tokens": a.check_tokens, "error": short_error(e)}
        check = result["check"]
        print(f"\nequality check n={n} T={a.check_tokens}: "
              + ("PASS" if check.get("pass") else f"FAIL {check.get('error', '')}"))
        for what, entry in check.get("errors", {}).items():
            print(f"  {what}: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else
                                            f"{k}={v}" for k, v in entry.items()))
        save_json(path, result)

    table = markdown(result["rows"])
    with open(stem + ".md", "w") as f:
        f.write(f"Ring attention, {result['gpu']}, {result['date']}: causal, zigzag, bf16, "
                f"batch {a.batch}, {a.nheads}/{a.nheads_k} heads, head dim {a.headdim}. "
                f"Efficiency: {DEFINITIONS['efficiency']}.\n\n{table}\n")
    print("\n" + table)
    print(f"\nwrote {path} and {stem}.md")


if __name__ == "__main__":
    main()
