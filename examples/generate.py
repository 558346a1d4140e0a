"""Batched generation with a paged KV cache, checked against a full recompute.

The model is `examples/train_gpt.py`'s byte-level GPT: the trained one with
`--params PATH` (the params.npz that `train_gpt.py --save` writes), else a
small randomly initialised one. Prompts of different lengths go through
together:

1. Cache: `model.init_cache(batch, max_len, page_size)`: in every layer a
   paged KV cache (pages of `--page-size` rows) with a block table, through
   `jax_flash.flax.MultiHeadAttention.init_cache`.
2. Prefill: the prompts, right-padded to the longest, in one call per layer
   with decode=True and `lengths` (the prompt lengths). The layer writes each
   prompt's keys and values into its own pages, packs the real rows of all
   prompts and runs one `flash_attn_varlen_func` against the paged caches
   (varlen queries, block_table, causal). Padded rows are neither written
   nor attended to, and each sequence's cache_seqlens advances by its own
   length: prompts of any lengths prefill together, in one attention call per
   layer, and nothing outside the layer touches its cache state. The
   next-token logits of a prompt are those of its last real row.
3. Decode: one token per sequence per call, decode=True, each sequence at its
   own position (cache_seqlens), rotary at that position.

Check: the prompts followed by the generated tokens run through the model
once more without any cache (a plain causal forward, decode=False); for each
of the first `--check` generated positions the greedy token of that forward
must equal the greedy token of the cached decode. It prints
`cached decode matches the full recompute: yes (N/N greedy tokens equal ...)`
with the largest logit difference, or `NO` and the differing positions, and
exits 1. A different pick where the full forward's two logits are within
`--tie` (0.05) is reported as a near-tie and still passes: two bfloat16
computations may round a near-tie either way. The comparison is teacher-forced
(the full forward sees the cached run's tokens), so one near-tie does not
derail the positions after it.

Usage (from the repository root):

  python examples/generate.py                       # random model, CPU: seconds
  python examples/generate.py --params /tmp/jax_flash_gpt/params.npz --tokens 200
  python examples/generate.py --prompt "MENENIUS:" --prompt "All:" --temperature 0.8

Measured on a 2-core CPU (jax 0.10.2, reference attention), random model
(2 layers, d_model 128, 4 heads / 2 KV heads), 3 prompts of 15, 36 and 73
bytes, 32 new tokens, pages of 16, three runs: 7.6-8.6 s wall for the whole
command (the script's own `total` 5.9-6.7 s, the rest importing), most of it
compiling: the prefill step 1.6-1.8 s and the first decode step 1.3-1.5 s,
compile included; then 0.7-0.8 ms per decode step for the batch. The greedy
tokens matched the full recompute (96/96, max |logit difference| 0.00195).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_gpt import GPT, GPTConfig, load_model  # noqa: E402

PROMPTS = ("First Citizen:\n", "MENENIUS:\nWhat work's, my countrymen",
           "CORIOLANUS:\nI will go wash;\nAnd when my face is fair, you shall perceive\n")
RANDOM_CONFIG = GPTConfig(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2)


def encode(prompts):
    """Right-padded int32 (batch, longest) bytes and the int32 lengths."""
    data = [np.frombuffer(p.encode(), np.uint8) for p in prompts]
    lens = np.array([len(d) for d in data], np.int32)
    tokens = np.zeros((len(data), lens.max()), np.int32)
    for b, d in enumerate(data):
        tokens[b, :len(d)] = d
    return tokens, lens


def make_generator(model):
    """Jitted prefill and decode steps on the split model.

    Both take the cache state (donated: updated in place) and the rest of the
    model state, and return the next-token logits (batch, vocab) and the new
    cache state.
    """
    graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)

    def prefill(cache, rest, tokens, lens):
        model = nnx.merge(graphdef, cache, rest)
        logits = model(tokens, decode=True, deterministic=True, lengths=lens)
        last = logits[jnp.arange(tokens.shape[0]), lens - 1]
        return last, nnx.state(model, nnx.Cache)

    def decode(cache, rest, token):
        model = nnx.merge(graphdef, cache, rest)
        logits = model(token[:, None], decode=True, deterministic=True)
        return logits[:, 0], nnx.state(model, nnx.Cache)

    return (cache, rest, jax.jit(prefill, donate_argnums=0),
            jax.jit(decode, donate_argnums=0))


def pick(logits, temperature, key):
    if temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature).astype(jnp.int32)


def generate(model, prompts, n_new, page_size, temperature=0.0, seed=0):
    """Returns (generated int32 (batch, n_new), cached logits float32 (batch,
    n_new, vocab), prompt tokens, prompt lengths, [prefill seconds, decode
    step seconds...]). The first call of each step includes its compile."""
    tokens, lens = encode(prompts)
    batch = len(prompts)
    model.init_cache(batch, tokens.shape[1] + n_new, page_size)
    cache, rest, prefill, decode = make_generator(model)
    key = jax.random.key(seed)

    t0 = time.perf_counter()
    logits, cache = prefill(cache, rest, jnp.asarray(tokens), jnp.asarray(lens))
    logits.block_until_ready()
    times = [time.perf_counter() - t0]  # seconds: prefill, then each decode step
    out, all_logits = [], []
    for i in range(n_new):
        key, sub = jax.random.split(key)
        token = pick(logits, temperature, sub)
        out.append(token)
        all_logits.append(logits)
        if i + 1 < n_new:
            t0 = time.perf_counter()
            logits, cache = decode(cache, rest, token)
            logits.block_until_ready()
            times.append(time.perf_counter() - t0)
    nnx.update(model, cache)  # the model's own cache arrays were donated to the steps
    generated = np.asarray(jnp.stack(out, 1))
    return generated, np.asarray(jnp.stack(all_logits, 1)), tokens, lens, times


def full_recompute(model, tokens, lens, generated):
    """Logits (batch, n_new, vocab) that predict each generated token, from one
    causal forward over prompt + generated tokens (no cache; right padding)."""
    batch, n_new = generated.shape
    full = np.zeros((batch, tokens.shape[1] + n_new), np.int32)
    for b in range(batch):
        full[b, :lens[b]] = tokens[b, :lens[b]]
        full[b, lens[b]:lens[b] + n_new] = generated[b]
    logits = np.asarray(nnx.jit(lambda m, t: m(t, deterministic=True))(model, full))
    rows = lens[:, None] - 1 + np.arange(n_new)  # position predicting generated token t
    return np.take_along_axis(logits, rows[:, :, None], 1)


def text(byte_ids) -> str:
    return bytes(int(t) for t in byte_ids).decode("utf-8", errors="replace")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", help="params.npz from train_gpt.py --save (default: random model)")
    p.add_argument("--prompt", action="append", help="repeat for a batch (default: 3 prompts)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--page-size", type=int, default=16, help="0: a contiguous cache")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--check", type=int, default=None,
                   help="generated positions checked against the full recompute (default all)")
    p.add_argument("--tie", type=float, default=0.05,
                   help="logit gap under which a different greedy pick is a near-tie")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    prompts = a.prompt or list(PROMPTS)
    if a.params:
        model = load_model(a.params)
        print(f"model: {a.params}, {model.config}")
    else:
        model = GPT(RANDOM_CONFIG, rngs=nnx.Rngs(a.seed))
        print(f"model: random, {RANDOM_CONFIG}")

    if a.tokens < 1:
        p.error(f"--tokens must be >= 1, got {a.tokens}")
    page_size = a.page_size or None
    generated, cached_logits, tokens, lens, times = generate(
        model, prompts, a.tokens, page_size, a.temperature, a.seed)
    cache = f"paged KV cache (pages of {page_size} rows)" if page_size else "contiguous KV cache"
    print(f"batch {len(prompts)}, prompt lengths {lens.tolist()}, {a.tokens} new tokens each, "
          f"{cache}")
    timing = f"prefill (compile + run) {times[0]:.2f} s"
    if len(times) > 1:
        timing += f"; decode: first step (compile + run) {times[1]:.2f} s"
    if len(times) > 2:
        per = float(np.median(times[2:]))
        timing += (f", then {per * 1e3:.1f} ms per step ({len(prompts) / per:,.0f} tokens/s "
                   f"for the batch)")
    print(timing)
    for b, prompt in enumerate(prompts):
        print(f"--- [{b}] {prompt!r} ->\n{text(generated[b])!r}")

    n = a.tokens if a.check is None else min(a.check, a.tokens)
    full_logits = full_recompute(model, tokens, lens, generated)[:, :n]
    cached_pick = np.argmax(cached_logits[:, :n], -1)
    same = cached_pick == np.argmax(full_logits, -1)
    # A different pick counts as a near-tie when the full forward rates the
    # cached pick within `tie` of its own best: two bfloat16 paths can round
    # a near-tie either way (bfloat16 spacing at |logit| 4-8 is 0.03).
    gap = full_logits.max(-1) - np.take_along_axis(full_logits, cached_pick[..., None], -1)[..., 0]
    ties = ~same & (gap <= a.tie)
    diff = float(np.max(np.abs(cached_logits[:, :n] - full_logits)))
    ok = bool((same | ties).all())
    print(f"cached decode matches the full recompute: {'yes' if ok else 'NO'} "
          f"({int(same.sum())}/{same.size} greedy tokens equal"
          + (f", {int(ties.sum())} near-ties within {a.tie}" if ties.any() else "")
          + f"; first {n} positions of each sequence), max |logit difference| {diff:.3g}")
    for b, t in zip(*np.nonzero(~same)):
        print(f"  sequence {b}, generated token {t}: cached picks {cached_pick[b, t]}, the full "
              f"forward {np.argmax(full_logits[b, t])} (logit gap {gap[b, t]:.3g})")
    print(f"total {time.perf_counter() - t_start:.1f} s wall")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
