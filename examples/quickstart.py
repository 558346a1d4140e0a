"""jax_flash in a few lines: causal GQA attention under jit, then the same
rows packed as variable-length sequences, each checked against the plain-JAX
reference. Runs our CUDA kernels on a GPU, the reference elsewhere (where the
check then tests the public API's plumbing, not a kernel)."""

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash

info = jax_flash.info()  # `python -m jax_flash` prints all of it
if info["path"] == "cuda kernels":
    print(f"path: cuda kernels on {info['device']}")
elif info["path"].startswith("reference"):
    print(f"path: {info['path']} on {info['backend']} — no kernel runs here")
    print("the public functions ran the reference themselves: the comparisons below check "
          "the public API's plumbing (jit, arguments, packing), not a kernel")
else:  # a GPU whose kernels cannot run: the calls below raise
    print(f"path: {info['path']}: {info['why']}")

batch, seqlen, nheads, nheads_k, head_dim = 2, 1000, 8, 2, 128
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (batch, seqlen, nheads, head_dim), jnp.bfloat16)
k = jax.random.normal(kk, (batch, seqlen, nheads_k, head_dim), jnp.bfloat16)
v = jax.random.normal(kv, (batch, seqlen, nheads_k, head_dim), jnp.bfloat16)

attn = jax.jit(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True))
out, lse, _ = attn(q, k, v)
# The reference under jit too: run eagerly it is dozens of small programs,
# each compiled on its own (slow on a GPU).
ref, ref_lse = jax.jit(lambda q, k, v: jax_flash.reference.attention_ref(q, k, v, causal=True))(
    q, k, v)

err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
print(f"out {out.shape} {out.dtype}, lse {lse.shape}; max |out - reference| = {err:.3e} "
      "vs jax_flash.reference.attention_ref (float32 math)")
assert err < 5e-2, err

# Packed sequences: the first row holds 600 real tokens, the second 1000. Pack
# them into one (1600, nheads, head_dim) buffer, attend per sequence, unpack.
mask = jnp.arange(seqlen)[None, :] < jnp.array([[600], [1000]])
(q_p, indices, cu_seqlens, max_len), (k_p, *_), (v_p, *_) = (
    jax_flash.unpad_input(x, mask) for x in (q, k, v))
varlen = jax.jit(lambda q, k, v, cu: jax_flash.flash_attn_varlen_func(
    q, k, v, cu, cu, max_len, max_len, causal=True))
out_p = varlen(q_p, k_p, v_p, cu_seqlens)
cu_host = np.asarray(cu_seqlens)  # the varlen reference slices by concrete lengths
ref_p, _ = jax.jit(lambda q, k, v: jax_flash.reference.attention_varlen_ref(
    q, k, v, cu_host, cu_host, causal=True))(q_p, k_p, v_p)
err_p = float(jnp.max(jnp.abs(out_p.astype(jnp.float32) - ref_p.astype(jnp.float32))))
out_padded = jax_flash.pad_input(out_p, indices, batch, seqlen)
print(f"varlen: {len(cu_seqlens) - 1} sequences, {out_p.shape[0]} tokens, padded back to "
      f"{out_padded.shape}; max |out - reference| = {err_p:.3e} "
      "vs jax_flash.reference.attention_varlen_ref")
assert err_p < 5e-2, err_p
