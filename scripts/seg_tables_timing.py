"""Where the segment-id forward spends its time: the XLA-built segment tables
(jax_flash.flash_attn._segment_tables) versus the kernel fed precomputed
tables, on the bench_varlen documents (16384 tokens, 16 heads, d=128)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_attention import time_jax  # noqa: E402
from bench_varlen import document_lengths  # noqa: E402

from jax_flash import flash_attn  # noqa: E402

flash_attn._ffi.kernels_or_raise()
lens = document_lengths(16384, 64, 4096, 0)
seg = jnp.asarray(np.repeat(np.arange(len(lens)), lens), jnp.int32)[None]
rand_seg = jnp.asarray(np.random.RandomState(0).randint(0, 8, (1, 16384)), jnp.int32)
tables = jax.jit(lambda s: flash_attn._segment_tables(s, s, -1, 0))
for name, s in (("sorted", seg), ("random", rand_seg)):
    ms = time_jax(lambda x, *_: tables(x), [(s,)], 20) * 1e3
    print(f"segment tables ({name} ids): {ms:.3f} ms")
keys = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (1, 16384, 16, 128), jnp.bfloat16) for kk in keys)
seg_q, seg_k = tables(seg)
static = flash_attn._Static(1 / np.sqrt(128), -1, 0, segments=True)
mods = flash_attn._Mods.of(seg_q=seg_q, seg_k=seg_k)
kernel = jax.jit(lambda q, k, v: flash_attn._attention_gpu(static, (q, k, v), mods)[0])
full = jax.jit(lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=True,
                                                           segment_ids=(seg, seg)))
print(f"kernel with precomputed tables: {time_jax(kernel, [(q, k, v)], 20) * 1e3:.3f} ms")
print(f"flash_attn_func(segment_ids):   {time_jax(full, [(q, k, v)], 20) * 1e3:.3f} ms")
