"""Peak device memory of one attention training step (forward + backward),
jax_flash vs XLA's attention, from XLA's compiled memory analysis.

    python benchmarks/memory.py [--seqlens 4096,8192,16384] [--headdim 128]
                                [--causal yes|no|both]

Batch 1, hidden 2048, bf16. Prints one row per (impl, causal, seqlen): the
compiled step's temporary buffers and its total (arguments + outputs +
temporaries) in MiB. Needs a GPU backend for jax_flash's kernels. The
deterministic backward's scratch depends on its plan: dQ slices (causal, or
few slices) or one accumulator plus per-tile counters (ordered).
"""

import argparse

import jax
import jax.numpy as jnp

import jax_flash


def step_memory(attn, seqlen, head_dim):
    nheads = 2048 // head_dim
    shape = jax.ShapeDtypeStruct((1, seqlen, nheads, head_dim), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return m.temp_size_in_bytes, total


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlens", default="4096,8192,16384")
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--causal", choices=("yes", "no", "both"), default="yes")
    args = p.parse_args()
    impls = {
        "jax_flash": lambda causal: lambda q, k, v: jax_flash.flash_attn_func(
            q, k, v, causal=causal),
        "jax_flash_det": lambda causal: lambda q, k, v: jax_flash.flash_attn_func(
            q, k, v, causal=causal, deterministic=True),
        "xla": lambda causal: lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"),
    }
    causals = {"yes": (True,), "no": (False,), "both": (True, False)}[args.causal]
    print(f"{'impl':14s} {'causal':>6s} {'seqlen':>7s} {'temp MiB':>10s} {'total MiB':>10s}")
    for name, make in impls.items():
        for causal in causals:
            for s in (int(x) for x in args.seqlens.split(",")):
                temp, total = step_memory(make(causal), s, args.headdim)
                print(f"{name:14s} {'yes' if causal else 'no':>6s} {s:7d} "
                      f"{temp / 2**20:10.1f} {total / 2**20:10.1f}")


if __name__ == "__main__":
    main()
