"""Training-step benchmark: one GPT training step with jax_flash vs cuDNN vs XLA attention.

The model is `examples/train_gpt.py`'s GPT (pre-norm blocks: RMSNorm,
causal self-attention with rotary, GELU MLP; byte vocabulary), here with
d_model 2048, 16 heads of head dim 128, `--layers` blocks (default 8), in
bfloat16 with float32 parameters. One step = forward, backward and the optax
AdamW update (global-norm clipping included), jitted as one function. The
three implementations are the same model with the same parameters; only the
attention call differs:

  jax_flash  jax_flash.flax.MultiHeadAttention (flash_attn_qkvpacked_func)
  cudnn      jax.nn.dot_product_attention(implementation="cudnn")
  xla        jax.nn.dot_product_attention(implementation="xla")

batch * seqlen is fixed (default 16384 tokens), seqlens 2048 and 8192 by
default. For each (seqlen, implementation) a row holds:

  step_ms       median time of one training step
  tokens_per_s  tokens per step / step time
  attn_ms       median time of the attention's forward + backward alone on the
                same shapes (batch, seqlen, 16, 128), causal, per layer
                (`bench_attention.py`'s functions: flash_attn_func for
                jax_flash, jax.nn for the others)
  attn_share    layers * attn_ms / step_ms: the attention's share of the step
and per seqlen the ratio of jax_flash's tokens/s to cuDNN's and to XLA's.

Timing is `bench_attention.py`'s (`time_jax`: jit, 3 warm-up calls, then the
median over `--repeats` samples of back-to-back calls). The timed step is
not donated (it is called again on the same state), so it runs with the old
and new parameters and optimizer state both in memory. An implementation
that cannot run gets a row with step_ms None and the reason (`error`; cuDNN
off an NVIDIA GPU: skipped, `skipped: true`); the run goes on.

Usage:
  python benchmarks/bench_train_step.py                 # full size, one GPU
  python benchmarks/bench_train_step.py --seqlens 2048 --impls jax_flash,cudnn
  python benchmarks/bench_train_step.py --smoke         # tiny shapes, CPU, < 1 min

`--smoke` runs d_model 64, 4 heads of 16, 2 layers, 256 tokens, seqlen 128
(batch 2), 3 repeats: it proves the script works, its numbers mean nothing
(on a CPU, jax_flash is the plain-JAX reference). Most of its time is XLA
compiling the step, once per (implementation, seqlen). Output:
benchmarks/results/<gpu>_<YYYY-MM-DD>_train_step[_smoke].json plus a Markdown
table (.md) beside it, also printed.
"""

import argparse
import gc
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from bench_attention import (  # noqa: E402
    jax_attention, jax_benchmark_fn, make_jax_inputs, short_error, time_jax)
from results_io import header, result_stem, save_json  # noqa: E402
from train_gpt import GPT, GPTConfig, loss_fn  # noqa: E402

import jax_flash  # noqa: E402

IMPLS = ("jax_flash", "cudnn", "xla")
FULL = dict(d_model=2048, heads=16, layers=8, tokens=16384, seqlens="2048,8192", repeats=10)
SMOKE = dict(d_model=64, heads=4, layers=2, tokens=256, seqlens="128", repeats=3)


def unavailable(impl):
    """Why impl cannot run here, or None."""
    if impl == "cudnn" and jax.default_backend() != "gpu":
        return (f"skipped: cuDNN attention needs an NVIDIA GPU (JAX backend: "
                f"{jax.default_backend()})")
    return None


def make_step(cfg, impl, seed):
    """(jitted step(state, x, y) -> (loss, new state), state): the model and
    its AdamW state, split for a functional step."""
    model = GPT(cfg, impl, rngs=nnx.Rngs(seed))  # same seed: same parameters for every impl
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b2=0.95,
                                                                 weight_decay=0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y, True)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    return jax.jit(step), state


def time_step(cfg, impl, batch, seqlen, repeats, seed):
    step, state = make_step(cfg, impl, seed)
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(2):  # two token sets, as bench_attention rotates its inputs
        t = rng.integers(0, cfg.vocab_size, (batch, seqlen + 1), dtype=np.int32)
        sets.append((state, jax.numpy.asarray(t[:, :-1]), jax.numpy.asarray(t[:, 1:])))
    try:
        return time_jax(step, sets, repeats)
    finally:
        del sets, state
        gc.collect()


def time_attention(impl, batch, seqlen, heads, head_dim, repeats, seed):
    """Median seconds of one causal attention forward + backward."""
    sets = make_jax_inputs(seed, (batch, seqlen, heads, head_dim))
    try:
        return time_jax(jax_benchmark_fn(jax_attention(impl, True), "fwd_bwd"), sets, repeats)
    finally:
        del sets
        gc.collect()


def _fmt(x, spec, scale=1.0, suffix=""):
    return "-" if x is None else format(x * scale, spec) + suffix


def markdown(result):
    """The rows as a Markdown table, with the run's configuration above it."""
    rows = result["rows"]
    head = ["seqlen", "batch", "impl", "step ms", "Mtokens/s", "attn fwd+bwd ms / layer",
            "attention share", "jax_flash / this (tokens/s)", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        jf = next((o.get("tokens_per_s") for o in rows
                   if o["seqlen"] == r["seqlen"] and o["impl"] == "jax_flash"), None)
        ratio = jf / r["tokens_per_s"] if jf and r.get("tokens_per_s") else None
        lines.append("| " + " | ".join([
            str(r["seqlen"]), str(r["batch"]), r["impl"], _fmt(r.get("step_ms"), ".2f"),
            _fmt(r.get("tokens_per_s"), ".3f", 1e-6), _fmt(r.get("attn_ms"), ".3f"),
            _fmt(r.get("attn_share"), ".1f", 100, "%"), _fmt(ratio, ".2f"),
            r.get("error", "")[:80]]) + " |")
    c = result["config"]
    return (f"Training step: {c['layers']} layers, d_model {c['d_model']}, {c['heads']} heads "
            f"x {c['head_dim']}, {c['tokens']} tokens per step, bf16, causal, AdamW "
            f"({result['gpu']}, jax {result['jax_version']}, jax_flash path: "
            f"{result['jax_flash_path']})\n\n" + "\n".join(lines) + "\n")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (xla, jax_flash)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--seqlens", default=None, help="default 2048,8192")
    p.add_argument("--layers", type=int, default=None, help="default 8")
    p.add_argument("--d-model", type=int, default=None, help="default 2048")
    p.add_argument("--heads", type=int, default=None, help="default 16")
    p.add_argument("--tokens", type=int, default=None, help="batch * seqlen, default 16384")
    p.add_argument("--repeats", type=int, default=None, help="default 10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--tag", default="")
    a = p.parse_args()
    for name, default in (SMOKE if a.smoke else FULL).items():
        if getattr(a, name) is None:
            setattr(a, name, default)
    a.seqlens = [int(s) for s in a.seqlens.split(",")]
    a.impls = [i for i in a.impls.split(",") if i]
    for i in a.impls:
        if i not in IMPLS:
            p.error(f"unknown impl {i!r}; choose from {IMPLS}")
    if a.d_model % a.heads:
        p.error(f"--d-model {a.d_model} must be a multiple of --heads {a.heads}")
    return a


def main():
    a = parse_args()
    stem = result_stem(a.out, "train_step", "smoke" if a.smoke else "", a.tag)
    path, md = stem + ".json", stem + ".md"
    cfg = GPTConfig(d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                    num_kv_heads=a.heads)
    head_dim = a.d_model // a.heads
    info = jax_flash.info()
    result = {**header(), "jax_flash_path": info["path"], "smoke": a.smoke, "repeats": a.repeats,
              "config": {"d_model": a.d_model, "heads": a.heads, "head_dim": head_dim,
                         "layers": a.layers, "tokens": a.tokens, "vocab": cfg.vocab_size,
                         "mlp_ratio": cfg.mlp_ratio, "dtype": "bfloat16", "causal": True,
                         "optimizer": "adamw + clip_by_global_norm"},
              "rows": []}
    print(f"gpu={result['gpu']} jax={jax.__version__} jax_flash path={info['path']} -> {path}")
    for seqlen in a.seqlens:
        batch = max(1, a.tokens // seqlen)
        for impl in a.impls:
            row = dict(impl=impl, seqlen=seqlen, batch=batch, step_ms=None)
            why = unavailable(impl)
            try:
                if why:
                    row.update(error=why, skipped=True)
                else:
                    sec = time_step(cfg, impl, batch, seqlen, a.repeats, a.seed)
                    attn = time_attention(impl, batch, seqlen, a.heads, head_dim, a.repeats,
                                          a.seed)
                    row.update(step_ms=sec * 1e3, tokens_per_s=batch * seqlen / sec,
                               attn_ms=attn * 1e3, attn_share=a.layers * attn / sec)
            except Exception as e:  # noqa: BLE001 - record and continue
                row["error"] = short_error(e)
            result["rows"].append(row)
            if row["step_ms"] is None:
                print(f"s={seqlen:<5} b={batch:<3} {impl:9} {row['error'][:100]}", flush=True)
            else:
                print(f"s={seqlen:<5} b={batch:<3} {impl:9} step {row['step_ms']:9.2f} ms "
                      f"{row['tokens_per_s']:12,.0f} tokens/s  attention "
                      f"{row['attn_ms']:8.3f} ms/layer = {100 * row['attn_share']:5.1f}% "
                      "of the step", flush=True)
            save_json(path, result)  # incremental: survive a killed run
            jax.clear_caches()
            gc.collect()
        by_impl = {r["impl"]: r.get("tokens_per_s") for r in result["rows"]
                   if r["seqlen"] == seqlen}
        for other in ("cudnn", "xla"):
            if by_impl.get("jax_flash") and by_impl.get(other):
                ratio = by_impl["jax_flash"] / by_impl[other]
                result.setdefault("ratios", []).append(
                    dict(seqlen=seqlen, impl="jax_flash", vs=other, tokens_per_s_ratio=ratio))
                print(f"s={seqlen:<5} jax_flash / {other}: {ratio:.2f}x tokens/s")
    save_json(path, result)
    table = markdown(result)
    with open(md, "w") as f:
        f.write(table)
    print("\n" + table + f"\nwrote {path}\nwrote {md}")


if __name__ == "__main__":
    main()
