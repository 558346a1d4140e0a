"""A few launches of jax_flash's and PyTorch FlashAttention-2's kernels on the
same shape, for `ncu` to compare (scripts/gpu_check.sh profile).

    python scripts/profile_attention.py {jax,torch} HEAD_DIM {fwd,bwd,time}

`time` (jax only) prints the per-kernel forward time with and without JAX's
per-call dispatch (one jit call per kernel vs ten chained kernels in one).
"""

import sys
import time

which, d, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
b, s, h = 4, 4096, 2048 // d

if which == "jax":
    import jax
    import jax.numpy as jnp

    import jax_flash

    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in ks)
    fwd = jax.jit(lambda q, k, v: jax_flash.flash_attn_func(q, k, v))
    bwd = jax.jit(lambda q, k, v, do: jax.vjp(jax_flash.flash_attn_func, q, k, v)[1](do))
    for _ in range(3):
        jax.block_until_ready(fwd(q, k, v) if mode != "bwd" else bwd(q, k, v, do))
    if mode == "time":
        chain = jax.jit(lambda q, k, v: jax.lax.fori_loop(
            0, 10, lambda i, x: jax_flash.flash_attn_func(x, k, v), q))
        chain(q, k, v).block_until_ready()
        for name, fn, calls in (("per-call", fwd, 1), ("in-jit x10", chain, 10)):
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                for _ in range(5):
                    out = fn(q, k, v)
                out.block_until_ready()
                times.append((time.perf_counter() - t0) / (5 * calls))
            print(f"d={d} {name}: median {sorted(times)[5] * 1e3:.3f} ms per kernel")
else:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, do = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(4))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for _ in range(3):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            if mode == "bwd":
                torch.autograd.grad(out, (q, k, v), do)
    torch.cuda.synchronize()
