"""jax_flash in a few lines: causal GQA attention under jit, checked against
the plain-JAX reference. Runs our CUDA kernel on a GPU, the reference elsewhere."""

import jax
import jax.numpy as jnp

import jax_flash

batch, seqlen, nheads, nheads_k, head_dim = 2, 1000, 8, 2, 128
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (batch, seqlen, nheads, head_dim), jnp.bfloat16)
k = jax.random.normal(kk, (batch, seqlen, nheads_k, head_dim), jnp.bfloat16)
v = jax.random.normal(kv, (batch, seqlen, nheads_k, head_dim), jnp.bfloat16)

attn = jax.jit(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True))
out, lse, _ = attn(q, k, v)
ref, ref_lse = jax_flash.reference.attention_ref(q, k, v, causal=True)

err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
print(f"backend={jax.default_backend()} kernels={jax_flash.has_kernels()} "
      f"compiled_head_dims={jax_flash.compiled_head_dims()}")
print(f"out {out.shape} {out.dtype}, lse {lse.shape}; max |out - reference| = {err:.3e}")
assert err < 5e-2, err
